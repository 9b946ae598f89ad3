"""What can go wrong when loading an official InternVideo2 checkpoint: the errors and the warning
raised by :func:`~iv2_lightning.models.official.load_official` and ``iv2 convert``.

An :class:`UnsafeCheckpointError` is the refusal to unpickle Python objects (the product never does:
``torch.load(weights_only=True)``), kept apart so that callers can tell it from a layout problem.
"""

from __future__ import annotations


class OfficialCheckpointError(ValueError):
    """The checkpoint cannot be mapped onto a :class:`VideoEncoder` (layout, architecture or shapes)."""


class UnsafeCheckpointError(OfficialCheckpointError):
    """The file holds pickled Python objects besides tensors; reading it would run arbitrary code."""


class PosEmbedInterpolationWarning(UserWarning):
    """The stored position table was resampled to another frame count or frame size."""


__all__ = ["OfficialCheckpointError", "PosEmbedInterpolationWarning", "UnsafeCheckpointError"]
