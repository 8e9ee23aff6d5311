"""Errors that mean "the configuration is wrong", reported as one line by the entry points."""


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key and what is allowed."""


class DataError(ConfigError):
    """A dataset file or annotation that cannot be used as it is; the message names it (file,
    COCO image or annotation id), says what is wrong and how to go on (often
    ``data.on_bad_sample=skip``). A ConfigError so that the entry points report it as one line."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message says where it stopped and
    what was kept. The entry points report it as one line and exit with code 3."""


class JobFailed(RuntimeError):
    """A job of a multirun that stopped; the message is the one line reported for it. Raised to
    Hydra, which records the job as failed, while the sweep goes on with the next job."""
