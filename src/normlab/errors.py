"""Errors that mean "the configuration is wrong", reported as one line by the entry points."""


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key and what is allowed."""
