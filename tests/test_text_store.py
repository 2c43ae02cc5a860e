"""Stored prompt embeddings (framepack.text_store): the demo model ships its prompt's embedding so
``framepack demo`` never builds the text encoders; what is served must be what the encoders make."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from framepack.components import HunyuanTextEncoder, asset, load_components, resolve_model
from framepack.text_store import StoredTextEncoder, encoder_identity, load_text_embeddings


def _equal(a, b) -> bool:
    return torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


def test_the_shipped_embeddings_are_what_the_encoders_make():
    source = resolve_model("tiny")
    assert source.text_embeddings, "the demo model names its stored embeddings in its manifest"
    text = Path(source.hunyuan)
    stored = load_text_embeddings(Path(source.text_embeddings), encoder_identity(text, source.crop_start))
    demo_prompt = asset("demo", "prompt.txt").read_text().strip()
    assert set(stored) == {demo_prompt, ""}  # the demo's prompt and the empty negative prompt
    encoder = HunyuanTextEncoder.from_pretrained(text, crop_start=source.crop_start)
    for prompt, embedding in stored.items():
        assert _equal(embedding, encoder.encode(prompt)), prompt


def test_a_prompt_not_stored_builds_the_encoders_and_matches_them():
    c = load_components(resolve_model("tiny"), stored_text=True)
    assert isinstance(c.text, StoredTextEncoder) and c.text.encoder is None
    c.text.encode("")  # stored: still nothing built
    assert c.text.encoder is None
    prompt = "a blue square moves left"
    got = c.text.encode(prompt)
    assert c.text.encoder is not None
    source = resolve_model("tiny")
    assert _equal(got, HunyuanTextEncoder.from_pretrained(Path(source.hunyuan), crop_start=source.crop_start).encode(prompt))


def test_embeddings_of_other_encoders_are_not_served(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(asset("tiny"), model)
    manifest = json.loads((model / "framepack.json").read_text())
    manifest["crop_start"] = 3  # another template crop: other embeddings for the same prompt
    (model / "framepack.json").write_text(json.dumps(manifest))
    c = load_components(resolve_model(str(model)), stored_text=True)
    assert not isinstance(c.text, StoredTextEncoder)  # the file is ignored, the real encoders built
    weights = next((model / "text" / "text_encoder").glob("*.safetensors"))
    before = encoder_identity(model / "text", None)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert encoder_identity(model / "text", None) != before


def test_the_demo_command_never_imports_transformers(tmp_path):
    script = ("import sys; from framepack.cli import main; "
              f"rc = main(['demo', '--seconds', '1', '--steps', '1', '--out', {str(tmp_path / 'd.mp4')!r}]); "
              "print('transformers' in sys.modules, rc)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False 0"
    assert (tmp_path / "d.mp4").is_file()
