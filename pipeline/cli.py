"""Shared command-line plumbing for the job scripts: logging and one-line failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable

from pipeline.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def setup_logging(verbose: bool) -> str:
    """Quiet console (INFO for us, WARNING for libraries) plus a full DEBUG log file."""
    from pipeline.distributed.runtime import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
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


def add_address(parser: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster to join. Without it (and without ``RAY_ADDRESS``, which
    ``ray job submit`` sets) a job starts a private local cluster that dies with it."""
    parser.add_argument("--address", help="Ray cluster to join (host:port, ray://host:port "
                        "or auto); default: RAY_ADDRESS, else a private local cluster")


def job_main(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """The whole ``main`` of a job script: logging per ``args.verbose``, then ``body(args)``
    under :func:`run_main`. ``--address`` is handed to Ray as ``RAY_ADDRESS``."""
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address
    log_path = setup_logging(args.verbose)
    return run_main(lambda: body(args), args.verbose, log_path)


def run_main(main: Callable[[], int], verbose: bool, log_path: str) -> int:
    """Run ``main``; any failure prints one clear line (the stack trace goes to the log file).

    Known user errors (bad config, unreachable or malformed input) exit with 2, anything
    else with 1; ``--verbose`` re-raises so the full trace shows.
    """
    from pipeline.data.fs import s3_error
    from pipeline.errors import ClusterError, InputError, SourceError, StorageError

    errors = USER_ERRORS + (StorageError, InputError, SourceError, ClusterError)
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        logging.getLogger(__name__).debug("failure", exc_info=True)  # log file only
        # A user error as raised, or an S3 failure from deep inside Ray (a Data task, Train's
        # controller) as one line naming its s3:// URI; anything else as its root cause.
        known = exc if isinstance(exc, errors) else s3_error(exc)
        print(f"error: {known if known is not None else one_line(exc)}", file=sys.stderr)
        if verbose:
            raise
        print(f"(details in {log_path})", file=sys.stderr)
        return 2 if known is not None else 1


def root_cause(exc: BaseException) -> BaseException:
    """Follow Ray's ``.cause`` and Python's ``__cause__`` links to the original error."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def one_line(exc: BaseException) -> str:
    """``Type: message`` of the root cause; Ray embeds remote tracebacks in messages, whose
    last line is the remote error itself."""
    root = root_cause(exc)
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[-1] if lines else '(no message)'}"[:500]
