"""Errors a user can act on.

Each is raised with the offending key or file and the fix, caught once in ``cli.py`` and
printed as one line (``--debug`` shows the traceback).
"""


class ClipTaoError(Exception):
    """Base class of every error that is the user's to fix."""


class ConfigError(ClipTaoError):
    """A spec key is unknown, has the wrong type, or an invalid value."""


class DataError(ClipTaoError):
    """A dataset folder, list file or shard cannot be used."""


class ModelError(ClipTaoError):
    """A model type, weight file or checkpoint cannot be used."""


class NotAvailableError(ClipTaoError):
    """A task or backend that this installation cannot run."""


class TrainingError(ClipTaoError):
    """Training cannot go on (the loss or the weights became NaN or infinite)."""


class OutputError(ClipTaoError):
    """An output cannot be written: the disk is full, the folder is read-only, or another run holds it."""
