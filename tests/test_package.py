"""`python -m framepack.train.package --transformer-only`: a fine-tune ships in a copy of the model it
fine-tunes, exactly as measured (docs/training-gen2.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from framepack.train import package

TINY = Path(__file__).resolve().parents[1] / "src" / "framepack" / "assets" / "tiny"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_transformer_only_replaces_the_weights_keeps_the_components_and_drops_the_old_ratios(tmp_path):
    model = shutil.copytree(TINY, tmp_path / "model")
    before = _files(model)
    # a run's export: fp32 weights (as training writes them) that differ from the model's
    run = tmp_path / "runs" / "gen2-framepack-det"
    final = shutil.copytree(TINY / "transformer", run / "final")
    tuned = {k: (v.float() * 1.5 if v.is_floating_point() else v) for k, v in load_file(final / WEIGHTS).items()}
    save_file(tuned, final / WEIGHTS)
    (run / "train_config.json").write_text(json.dumps({"task": "framepack", "batch_size": 4, "lr": 2e-4, "steps": 2}))
    (run / "loss.log").write_text("".join(json.dumps({"step": s, "loss": 0.5 / s, "wall_seconds": 10.0 * s}) + "\n"
                                          for s in (1, 2)))
    vae_runs = [str(tmp_path / "gone" / name) for name in ("demo-vae", "gen2-vae", "gen2-vae-smooth")]
    transformer_runs = [str(tmp_path / "gone" / name) for name in ("gen2-framepack", "gen2-framepack-long")] + [str(run)]
    assert package.main(["--out", str(model), "--transformer", str(run), "--transformer-only", "--half",
                         "--vae-runs", *vae_runs, "--transformer-runs", *transformer_runs]) == 0

    after = _files(model)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == {f"transformer/{WEIGHTS}", "MODEL_CARD.md", "framepack.json"}
    # the manifest is kept but for the MagCache ratios, which were measured on the old transformer
    manifest_before, manifest_after = json.loads(before["framepack.json"]), json.loads(after["framepack.json"])
    assert "magcache_ratios" in manifest_before and "magcache_steps" in manifest_before
    assert manifest_after == {k: v for k, v in manifest_before.items() if k not in ("magcache_ratios", "magcache_steps")}
    shipped = load_file(model / "transformer" / WEIGHTS)
    assert all(torch.equal(shipped[k], v.half() if v.is_floating_point() else v) for k, v in tuned.items())
    card = (model / "MODEL_CARD.md").read_text()
    assert "| gen2-framepack-det | `framepack` | 2 |" in card  # the new stage's row, from its run
    assert "| gen2-framepack-long |" in card  # the earlier stages' rows, kept from the previous card
    assert not (model / "transformer.tmp").exists() and not (model / "transformer.old").exists()
