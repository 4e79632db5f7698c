"""Benchmarks: ``python -m bench <name> [--quick]`` writes bench/results/<name>.json."""
