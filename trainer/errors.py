"""Typed, picklable errors. Ray re-raises them across processes, so each takes one message string."""


class SelfDistillError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(SelfDistillError, ValueError):
    """A config file or override is invalid: the message names the file, line, field and value."""


class DataError(SelfDistillError, ValueError):
    """A dataset record is invalid: the message names the file, line (or row) and field."""
