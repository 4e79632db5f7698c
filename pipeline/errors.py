"""Errors that name what the user must fix (a leaf module: everything may import it)."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the dotted field."""


class StorageError(RuntimeError):
    """A path or URI cannot be reached or read. The message names it."""


class SourceError(ValueError):
    """The source is missing, empty or malformed. The message names it."""


class InputError(ValueError):
    """The input shards are missing, unreachable or do not follow the data contract."""


class ClusterError(RuntimeError):
    """The Ray cluster to join cannot be reached or joined. The message names its address."""
