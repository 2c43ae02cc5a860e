"""A small video autoencoder with HunyuanVideo's latent geometry, for the CPU demo model.

16 latent channels, 8x spatial, 4x causal temporal: latent 0 holds frame 0 alone, latent k >= 1
holds frames 4k-3 .. 4k. Each latent is encoded from its own frames only (causal by construction),
so the planner's and the blend's arithmetic is exactly that of the 13B model. As in the causal
HunyuanVideo VAE, the first latent of any decoded span becomes a single frame: the start frame
itself, or the last frame of its group when the span starts mid-video (the overlap blend relies
on this).

With ``decoder_context = 1`` the decoder also reads the latent before the one it decodes (the
span's first latent reads itself), as HunyuanVideo's causal decoder reads the past. A decoder that
sees one latent alone makes each group of four frames on its own, so the frames step at every
group boundary; the previous latent lets it join the groups and place motion inside a group. The
encoder, and so the latent space, is the same either way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAME = "SmallVideoAutoencoder"
GROUP = 4  # frames per latent after the first


@dataclass(frozen=True)
class SmallVAEConfig:
    latent_channels: int = 16
    channels: tuple[int, int, int] = (32, 64, 96)  # widths after each 2x downsampling
    blocks: int = 1  # residual blocks per resolution
    scaling_factor: float = 1.0  # latents are multiplied by this after encoding (unit variance)
    decoder_context: int = 0  # previous latents the decoder reads beside its own: 0 or 1
    # least-squares (latent_channels + 1, 3) map from scaled latents (+ bias) to RGB, for previews
    preview_map: tuple[tuple[float, float, float], ...] | None = None

    def to_json(self) -> dict:
        return {"_class_name": CLASS_NAME, **json.loads(json.dumps(asdict(self)))}  # tuples -> lists

    @classmethod
    def from_json(cls, data: dict) -> "SmallVAEConfig":
        def frozen(v):
            return tuple(frozen(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: frozen(v) for k, v in data.items() if not k.startswith("_")})

    def __post_init__(self) -> None:
        if self.decoder_context not in (0, 1):
            raise ValueError(f"decoder_context must be 0 or 1, got {self.decoder_context}")


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    """Frames of one latent, stacked on channels -> (latent_channels, H/8, W/8)."""

    def __init__(self, cfg: SmallVAEConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.first = nn.Conv2d(3, c1, 3, padding=1)  # the start frame alone
        self.group = nn.Conv2d(3 * GROUP, c1, 3, padding=1)  # four frames
        # no residual blocks at full resolution: that is where CPU time would go
        layers: list[nn.Module] = []
        for c_in, c_out in ((c1, c2), (c2, c3), (c3, c3)):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)] + [ResBlock(c_out) for _ in range(cfg.blocks)]
        self.trunk = nn.Sequential(*layers, nn.SiLU(), nn.Conv2d(c3, cfg.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        return self.trunk((self.first if first else self.group)(x))


class Decoder(nn.Module):
    """(latent_channels, h, w) -> one frame (first head) or four frames (group head); with context,
    the previous latent is stacked on the channels of the input."""

    def __init__(self, cfg: SmallVAEConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.context = cfg.decoder_context
        inputs = cfg.latent_channels * (1 + cfg.decoder_context)
        layers: list[nn.Module] = [nn.Conv2d(inputs, c3, 3, padding=1), ResBlock(c3)]
        for c_in, c_out, blocks in ((c3, c3, cfg.blocks), (c3, c2, cfg.blocks), (c2, c1, 0)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
            layers += [ResBlock(c_out) for _ in range(blocks)]
        self.trunk = nn.Sequential(*layers, nn.SiLU())
        self.first = nn.Conv2d(c1, 3, 3, padding=1)
        self.group = nn.Conv2d(c1, 3 * GROUP, 3, padding=1)

    def forward(self, z: torch.Tensor, first: bool, previous: torch.Tensor | None = None) -> torch.Tensor:
        """``previous``: the latent before ``z`` (read only with context; ``z`` itself when None)."""
        if self.context:
            z = torch.cat([z, z if previous is None else previous], dim=1)
        return (self.first if first else self.group)(self.trunk(z))


class SmallVideoAutoencoder(nn.Module):
    """encode: (B, 3, 1 + 4n, H, W) in [-1, 1] -> scaled latents (B, 16, 1 + n, H/8, W/8); decode back."""

    def __init__(self, cfg: SmallVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or SmallVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.decode_dtype = torch.float32  # what decode() computes in: see for_inference

    def for_inference(self, device: str | torch.device, decode_dtype: torch.dtype = torch.float32) -> "SmallVideoAutoencoder":
        """This autoencoder on ``device``, set up to generate: channels-last weights, which oneDNN
        convolves faster on a CPU (the same frames to ~1e-6), and :meth:`decode` computing in
        ``decode_dtype`` under autocast. bf16 decodes 4-7x faster on a CPU that multiplies bf16 natively,
        and its frames stay within one level of 255 of fp32's (the last step rounds to whole levels)."""
        self.to(device=device, memory_format=torch.channels_last)
        self.decode_dtype = decode_dtype
        return self

    # ---- raw (unscaled) maps, used in training -------------------------------------------------

    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = pixels.shape
        if (t - 1) % GROUP:
            raise ValueError(f"pixels must have 1 + 4n frames, got {t}")
        first = self.encoder(pixels[:, :, 0], first=True)[:, :, None]
        if t == 1:
            return first
        n = (t - 1) // GROUP
        groups = pixels[:, :, 1:].reshape(b, c, n, GROUP, h, w).permute(0, 2, 1, 3, 4, 5).reshape(b * n, c * GROUP, h, w)
        rest = self.encoder(groups, first=False)
        rest = rest.reshape(b, n, *rest.shape[1:]).permute(0, 2, 1, 3, 4)
        return torch.cat([first, rest], dim=2)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        b, c, n, h, w = z.shape
        first = self.decoder(z[:, :, 0], first=True)[:, :, None]
        if n == 1:
            return first

        def flat(latents: torch.Tensor) -> torch.Tensor:  # (B, C, n - 1, h, w) -> (B * (n - 1), C, h, w)
            return latents.permute(0, 2, 1, 3, 4).reshape(b * (n - 1), c, h, w)

        previous = flat(z[:, :, :-1]) if self.config.decoder_context else None
        rest = self.decoder(flat(z[:, :, 1:]), first=False, previous=previous)  # (B*(n-1), 3*4, H, W)
        H, W = rest.shape[-2:]
        rest = rest.reshape(b, n - 1, 3, GROUP, H, W).permute(0, 2, 1, 3, 4, 5).reshape(b, 3, (n - 1) * GROUP, H, W)
        return torch.cat([first, rest], dim=2)

    def with_decoder_context(self) -> "SmallVideoAutoencoder":
        """This autoencoder with a decoder that also reads the previous latent, making exactly the
        same frames until it is trained: the new input channels start at zero."""
        if self.config.decoder_context:
            return self
        wider = SmallVideoAutoencoder(dataclasses.replace(self.config, decoder_context=1))
        state = self.state_dict()
        first = "decoder.trunk.0.weight"
        state[first] = torch.cat([state[first], torch.zeros_like(state[first])], dim=1)
        wider.load_state_dict(state)
        return wider.train(self.training)

    # ---- the VideoAutoencoder interface (scaled latents, no grad) ----------------------------------

    @property
    def preview_map(self) -> torch.Tensor | None:
        """(C + 1, 3) latent-to-RGB map fitted at export, or None."""
        m = self.config.preview_map
        return None if m is None else torch.tensor(m, dtype=torch.float32)

    # the same contract as the HunyuanVideo VAE's wrapper: inputs from anywhere, results on the CPU
    # (the pipeline keeps latents and frames there), wherever the module itself lives

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self.encode_raw(pixels.to(self._device, torch.float32)) * self.config.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self._device, torch.float32) / self.config.scaling_factor
        with torch.autocast(self._device.type, dtype=self.decode_dtype, enabled=self.decode_dtype != torch.float32):
            frames = self.decode_raw(z)
        return frames.float().clamp(-1, 1).cpu()

    # ---- files ----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SmallVideoAutoencoder":
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = SmallVAEConfig.from_json(json.loads((directory / "config.json").read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()
