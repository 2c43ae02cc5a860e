"""FramePack: long video generation by next-frame-section prediction with packed history context."""

from .config import PRESETS, TransformerConfig, preset
from .model import CheckpointError, FramePackTransformer, HistoryInput
from .packing import ContextLevel, ContextSchedule, context_bound, context_budget

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ContextLevel",
    "ContextSchedule",
    "FramePackTransformer",
    "HistoryInput",
    "TransformerConfig",
    "context_bound",
    "context_budget",
    "preset",
]
