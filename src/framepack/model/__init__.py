"""The packed FramePack transformer."""

from .inputs import HistoryInput
from .io import CheckpointError
from .transformer import FramePackTransformer

__all__ = ["CheckpointError", "FramePackTransformer", "HistoryInput"]
