"""Shared command-line plumbing for the job scripts: logging and one-line failures."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable

from pipeline.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def setup_logging(verbose: bool) -> str:
    """Quiet console (INFO for us, WARNING for libraries) plus a full DEBUG log file."""
    log_path = os.path.join(tempfile.gettempdir(), f"pipeline-{os.getpid()}.log")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    file = logging.FileHandler(log_path)
    file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers[:] = [console, file]
    for noisy in ("ray", "urllib3", "botocore", "s3fs", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    return log_path


def run_main(main: Callable[[], int], verbose: bool, log_path: str) -> int:
    """Run ``main``; a known user error prints one clear line (stack trace in the log file)."""
    from pipeline.data.fs import StorageError
    from pipeline.data.reader import InputError
    from pipeline.data.sources import SourceError

    errors = USER_ERRORS + (StorageError, InputError, SourceError)
    try:
        return main()
    except errors as exc:
        logging.getLogger(__name__).debug("failure", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        if verbose:
            raise
        print(f"(details in {log_path})", file=sys.stderr)
        return 2
