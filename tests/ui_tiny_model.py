"""A tiny random-weights model in the demo model's layout, for the web app's tests (fast at 64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_tiny_model(root: Path) -> Path:
    """Text encoders + small VAE + a 'tiny' transformer + framepack.json at resolution 64."""
    from framepack import FramePackTransformer, preset
    from framepack.small_vae import SmallVAEConfig, SmallVideoAutoencoder
    from framepack.train.text_encoder import write_text_encoders

    write_text_encoders(root / "text", text_dim=32, pooled_dim=16, extra_words=["circle", "right"])
    SmallVideoAutoencoder(SmallVAEConfig(channels=(8, 8, 8))).save_pretrained(root / "vae")
    config = preset("tiny").replace(has_image_proj=False, guidance_embeds=False, text_embed_dim=32,
                                    pooled_projection_dim=16)
    FramePackTransformer(config).save_pretrained(root / "transformer")
    (root / "framepack.json").write_text(json.dumps({
        "transformer": "transformer", "hunyuan": "text", "vae": "vae", "redux": None,
        "mode": "inverted", "resolution": 64,
    }))
    return root


def write_image(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 90)], axis=-1).astype(np.uint8)
    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) // 6) ** 2] = (220, 30, 30)
    Image.fromarray(img).save(path)
    return path
