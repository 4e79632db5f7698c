"""Errors that name what the user must fix (a leaf module: everything may import it)."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the dotted field."""
