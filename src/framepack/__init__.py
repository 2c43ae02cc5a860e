"""FramePack: long video generation by next-frame-section prediction with packed history context.

The names below are imported on first use (PEP 562), so that ``import framepack`` (and with it
``framepack --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PRESETS": ".config",
    "TransformerConfig": ".config",
    "preset": ".config",
    "CheckpointError": ".model",
    "FramePackTransformer": ".model",
    "HistoryInput": ".model",
    "ContextLevel": ".packing",
    "ContextSchedule": ".packing",
    "context_bound": ".packing",
    "context_budget": ".packing",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import PRESETS, TransformerConfig, preset
    from .model import CheckpointError, FramePackTransformer, HistoryInput
    from .packing import ContextLevel, ContextSchedule, context_bound, context_budget


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'framepack' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
