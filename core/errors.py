"""Typed, picklable errors, shared by every layer. Ray re-raises them across processes, so each
takes one message string."""


class SelfDistillError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(SelfDistillError, ValueError):
    """A config file or override is invalid: the message names the file, line, field and value."""


class DataError(SelfDistillError, ValueError):
    """A dataset record is invalid: the message names the file, line (or row) and field."""


class WeightSyncError(SelfDistillError, TimeoutError):
    """A weight sync did not finish in time; the message names the engines that did not answer."""


class StaleRolloutError(SelfDistillError, RuntimeError):
    """A rollout came from other weights than the ones the driver last synced."""


class EngineDiedError(SelfDistillError, RuntimeError):
    """A rollout engine died and could not be restarted (or died more often than allowed)."""


class LearnerDiedError(SelfDistillError, RuntimeError):
    """A learner rank died; the message names the rank. The last checkpoint is the place to resume from."""


class DivergedError(SelfDistillError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class ToyWorldError(SelfDistillError, RuntimeError):
    """A toy world was built, but its base model breaks a promise the recipes rely on."""
