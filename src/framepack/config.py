"""Model configuration: a frozen dataclass, named presets, and the config.json mapping.

The field names follow the ``config.json`` of ``lllyasviel/FramePackI2V_HY`` (and diffusers'
``HunyuanVideoFramepackTransformer3DModel``), so a released config loads unchanged and ours loads
into diffusers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .packing import RELEASED_SCHEDULE, ContextSchedule, Kernel, rate_of_kernel

CONFIG_NAME = "config.json"
# diffusers' class name, so that diffusers' own loaders recognise a directory we write.
DIFFUSERS_CLASS_NAME = "HunyuanVideoFramepackTransformer3DModel"


@dataclass(frozen=True)
class TransformerConfig:
    in_channels: int = 16  # VAE latent channels
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks (image and text have separate weights)
    num_single_layers: int = 40  # single-stream blocks over [image; text]
    num_refiner_layers: int = 2  # token-refiner blocks over the LLaMA states
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True  # distilled guidance enters like a second timestep
    text_embed_dim: int = 4096  # LLaMA hidden size
    pooled_projection_dim: int = 768  # CLIP-L pooled output
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # (t, y, x); sums to the head dim
    has_image_proj: bool = True  # SigLIP tokens projected and prepended to the text
    image_proj_dim: int = 1152
    has_clean_x_embedder: bool = True  # the history (clean latent) embedders of FramePack
    # History kernels the model has embedders for, nearest first: k1, k2, k4.
    history_kernels: tuple[Kernel, ...] = ((1, 2, 2), (2, 4, 4), (4, 8, 8))
    # The schedule the model was trained with; planners read it from here.
    context_schedule: str = str(RELEASED_SCHEDULE)
    # The blank gap (in windows) between the start frame and an inverted section, as the model was
    # trained to read it. None: the released models' layout (a true gap up to 4 sections; in longer
    # videos 3 for the first section made, 2 for every middle one), under which every middle section
    # of a long video sits at the same RoPE distance from the start and so shows the same moment of
    # the motion. An int P: the true distance, capped at P (framepack.planning.inverted_paddings).
    max_inverted_padding: int | None = None

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid TransformerConfig: " + "; ".join(problems))

    def _problems(self):
        for name in (
            "in_channels",
            "out_channels",
            "num_attention_heads",
            "attention_head_dim",
            "patch_size",
            "patch_size_t",
            "text_embed_dim",
            "pooled_projection_dim",
        ):
            if getattr(self, name) < 1:
                yield f"{name} must be >= 1, got {getattr(self, name)}"
        for name in ("num_layers", "num_single_layers", "num_refiner_layers"):
            if getattr(self, name) < 0:
                yield f"{name} must be >= 0, got {getattr(self, name)}"
        if self.mlp_ratio <= 0:
            yield f"mlp_ratio must be > 0, got {self.mlp_ratio}"
        if self.qk_norm != "rms_norm":
            yield f"qk_norm must be 'rms_norm', got {self.qk_norm!r}"
        if len(self.rope_axes_dim) != 3 or any(d <= 0 or d % 2 for d in self.rope_axes_dim):
            yield f"rope_axes_dim must be three positive even numbers, got {self.rope_axes_dim}"
        elif sum(self.rope_axes_dim) != self.attention_head_dim:
            yield (
                f"rope_axes_dim {tuple(self.rope_axes_dim)} sums to {sum(self.rope_axes_dim)}, "
                f"but attention_head_dim is {self.attention_head_dim}"
            )
        cap = self.max_inverted_padding
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            yield f"max_inverted_padding must be null or an integer >= 0, got {cap!r}"
        if self.rope_theta <= 0:
            yield f"rope_theta must be > 0, got {self.rope_theta}"
        if self.has_image_proj and self.image_proj_dim < 1:
            yield f"image_proj_dim must be >= 1, got {self.image_proj_dim}"
        kernels = [tuple(k) for k in self.history_kernels]
        if self.has_clean_x_embedder and not kernels:
            yield "history_kernels must name at least one kernel"
        if len(set(kernels)) != len(kernels):
            yield f"history_kernels must be distinct, got {self.history_kernels}"
        for kernel in kernels:
            try:
                rate_of_kernel(kernel)  # the rate names the embedder: proj, proj_2x, proj_4x
            except ValueError as exc:
                yield f"history_kernels: {exc}"
        try:
            schedule = ContextSchedule.parse(self.context_schedule)
        except ValueError as exc:
            yield str(exc)
        else:
            missing = [k for k in schedule.kernels if k not in kernels]
            if self.has_clean_x_embedder and missing:
                yield f"context_schedule {self.context_schedule!r} uses kernels {missing} without embedders"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch(self) -> Kernel:
        return (self.patch_size_t, self.patch_size, self.patch_size)

    @property
    def schedule(self) -> ContextSchedule:
        return ContextSchedule.parse(self.context_schedule)

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def same_architecture(self, other: "TransformerConfig") -> bool:
        """Whether weights made for ``other`` fit this config: every field but the inverted gap rule,
        which lays the sections out and is no weight (a fine-tune may teach another one)."""
        return self.replace(max_inverted_padding=other.max_inverted_padding) == other

    # ---- config.json ----------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "history_kernels":
                value = [list(k) for k in value]
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        """Build from a released or diffusers config.json; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                continue  # _class_name, _diffusers_version, image_condition_type, ...
            if key == "history_kernels":
                value = tuple(tuple(int(v) for v in k) for k in value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        for flag in ("has_image_proj", "has_clean_x_embedder", "guidance_embeds"):
            if flag in kwargs:
                kwargs[flag] = bool(kwargs[flag])  # released configs store these as 0/1
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "TransformerConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls.from_json_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")


PRESETS: dict[str, TransformerConfig] = {
    # The released 13B FramePack transformers (I2V and F1 share the architecture).
    "hunyuan-13b": TransformerConfig(),
    # A few-million-parameter model with the same structure, for tests and the CPU demo.
    "tiny": TransformerConfig(
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=2,
        num_single_layers=4,
        num_refiner_layers=1,
        text_embed_dim=64,
        pooled_projection_dim=32,
        rope_axes_dim=(8, 12, 12),
        image_proj_dim=32,
    ),
}


def preset(name: str) -> TransformerConfig:
    """A named preset; raises ``ValueError`` listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def resolve_config(config: "TransformerConfig | str | Path") -> TransformerConfig:
    """Accept a config object, a preset name, or a path to a config.json."""
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_NAME
    if path.is_file():
        return TransformerConfig.from_file(path)
    raise ValueError(f"unknown model preset or config file {str(config)!r}; known presets: {', '.join(sorted(PRESETS))}")


__all__ = ["PRESETS", "TransformerConfig", "preset", "resolve_config", "CONFIG_NAME"]
