"""Exceptions raised by diffusers-hprune.

All of them subclass :class:`ValueError` so that callers who already catch
``ValueError`` around Diffusers calls keep working; each message says what was
wrong and what to do about it.
"""


class HPruneError(ValueError):
    """Base class of every error raised by diffusers-hprune."""


class PlanError(HPruneError):
    """A prune plan is malformed, or does not fit the model it is applied to."""


class UnsupportedModelError(HPruneError):
    """The transformer (or config) is not of a model family diffusers-hprune supports."""


class CheckpointMismatchError(HPruneError):
    """The weights on disk do not match the structure that the prune plan describes."""
