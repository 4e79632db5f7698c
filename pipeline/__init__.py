"""Distributed deep image clustering on Ray."""

__version__ = "0.1.0"
