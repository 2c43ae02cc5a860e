"""Checkpoint I/O in the ``lllyasviel/FramePackI2V_HY`` layout, forward-input and config validation.

Exactness: our model and diffusers' port are two implementations whose float32 results differ by a
few ULPs (see test_transformer.py), so across implementations we compare weights bitwise and
outputs to 1e-5; a model compared with itself (saved, then reloaded) must give bit-identical outputs.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from framepack import CheckpointError, FramePackTransformer, HistoryInput, TransformerConfig, preset
from framepack.model.io import INDEX_NAME, WEIGHTS_NAME
from reference import diffusers_twin, random_inputs, run_diffusers

SHARD = re.compile(r"^diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors$")


# ---- shared fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> FramePackTransformer:
    torch.manual_seed(1234)
    return FramePackTransformer("tiny").eval()


@pytest.fixture(scope="module")
def twin(model):
    return diffusers_twin(model)


@pytest.fixture(scope="module")
def inputs(model) -> dict:
    return random_inputs(model.config, valid_text=[7])


@pytest.fixture(scope="module")
def ours_out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@pytest.fixture(scope="module")
def theirs_out(twin, inputs) -> torch.Tensor:
    with torch.no_grad():
        return run_diffusers(twin, inputs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def shards_of(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if SHARD.match(p.name))


def realigned(module: torch.nn.Module) -> torch.nn.Module:
    """Fresh, allocator-aligned storage for every tensor.

    Loaders that hand out tensors at their offset in the safetensors file leave them unaligned,
    and CPU GEMM kernels round differently on unaligned data (a few ULPs).
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()
    return module


# ---- 1. diffusers writes, we read -------------------------------------------------------------------


def test_loads_sharded_directory_written_by_diffusers(model, twin, inputs, ours_out, theirs_out, tmp_path):
    twin.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = shards_of(tmp_path)
    assert len(shards) > 1 and (tmp_path / INDEX_NAME).is_file()
    assert not (tmp_path / WEIGHTS_NAME).exists()

    loaded = FramePackTransformer.from_pretrained(tmp_path)
    assert loaded.config == model.config  # diffusers' config.json, our defaults for the rest
    assert loaded.dtype == torch.float32 and not loaded.training
    assert_same_state(loaded.state_dict(), twin.state_dict())

    out = forward(loaded, inputs)
    assert torch.equal(out, ours_out)  # bit-identical to the model the weights came from
    assert rel_err(out, theirs_out) <= 1e-5  # and diffusers' answer, to implementation rounding


# ---- 2. we write, diffusers (and we) read -------------------------------------------------------------


def test_save_pretrained_sharded_loads_in_diffusers_and_round_trips(model, twin, inputs, ours_out, theirs_out,
                                                                     tmp_path):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = shards_of(tmp_path)
    assert len(shards) > 1
    assert {int(SHARD.match(s).group(2)) for s in shards} == {len(shards)}
    assert [int(SHARD.match(s).group(1)) for s in shards] == list(range(1, len(shards) + 1))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    state = model.state_dict()
    assert index["weight_map"].keys() == state.keys()
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "HunyuanVideoFramepackTransformer3DModel"
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert not list(tmp_path.glob("*.tmp"))

    theirs = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tmp_path).eval()
    assert theirs.dtype == torch.float32
    assert_same_state(theirs.state_dict(), twin.state_dict())
    assert torch.equal(forward_diffusers(realigned(theirs), inputs), theirs_out)

    ours = FramePackTransformer.from_pretrained(tmp_path)
    assert ours.config == model.config
    assert_same_state(ours.state_dict(), state)
    assert torch.equal(forward(ours, inputs), ours_out)


def forward_diffusers(twin, inputs) -> torch.Tensor:
    with torch.no_grad():
        return run_diffusers(twin, inputs)


def test_resaving_removes_stale_shards_and_index(model, inputs, ours_out, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(shards_of(tmp_path)) > 1

    model.save_pretrained(tmp_path)  # default 5GB: one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert torch.equal(forward(FramePackTransformer.from_pretrained(tmp_path), inputs), ours_out)

    # and back: sharding again removes the single file
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert (tmp_path / INDEX_NAME).is_file() and len(shards_of(tmp_path)) > 1
    assert_same_state(FramePackTransformer.from_pretrained(tmp_path).state_dict(), model.state_dict())


# ---- 3. a single file, any storage dtype -------------------------------------------------------------


@pytest.mark.parametrize(
    "stored, default",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
        (torch.float8_e4m3fn, torch.bfloat16),  # float8 is storage only: compute in bf16
    ],
    ids=["bf16", "fp16", "fp32", "fp8"],
)
def test_single_file_in_each_storage_dtype(model, inputs, stored, default, tmp_path):
    file = tmp_path / "weights" / "framepack_tiny.safetensors"  # no config.json beside it
    file.parent.mkdir()
    save_file({k: v.to(stored).contiguous() for k, v in model.state_dict().items()}, str(file))
    on_disk = load_file(str(file))
    assert {t.dtype for t in on_disk.values()} == {stored}

    loaded = FramePackTransformer.from_pretrained(file, config="tiny")
    assert loaded.config == preset("tiny")
    state = loaded.state_dict()
    assert state.keys() == on_disk.keys()
    for name, tensor in state.items():
        assert tensor.dtype == default, name
        assert torch.equal(tensor, on_disk[name].to(default)), name
    assert loaded.dtype == default

    upcast = FramePackTransformer.from_pretrained(file, config="tiny", dtype=torch.float32)
    for name, tensor in upcast.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, on_disk[name].float()), name

    if stored == torch.float8_e4m3fn:  # the quantised model still runs, in bf16
        out = forward(loaded, inputs)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- 4. hub ids, resolved through huggingface_hub's cache ---------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache, repo_id: str, commit: str = COMMIT):
    """The cache layout snapshot_download reads offline: refs/main -> snapshots/<commit>/..."""
    org, name = repo_id.split("/")
    storage = cache / f"models--{org}--{name}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)  # no trailing newline, as huggingface_hub writes it
    (storage / "blobs").mkdir()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_hub_id_from_local_cache(model, inputs, ours_out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "org/name" must not resolve as a relative path
    cache = tmp_path / "hub"
    model.save_pretrained(fake_hub_cache(cache, "org/name"), max_shard_size="200KB")

    loaded = FramePackTransformer.from_pretrained("org/name", cache_dir=cache, local_files_only=True)
    assert loaded.config == model.config
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert torch.equal(forward(loaded, inputs), ours_out)

    # a commit hash as the revision needs no ref
    pinned = FramePackTransformer.from_pretrained(
        "org/name", revision=COMMIT, cache_dir=cache, local_files_only=True
    )
    assert_same_state(pinned.state_dict(), model.state_dict())


def test_hub_id_with_subfolder(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "org/pipeline")
    model.save_pretrained(snapshot / "transformer")
    (snapshot / "model_index.json").write_text('{"_class_name": "SomePipeline"}')

    loaded = FramePackTransformer.from_pretrained(
        "org/pipeline", subfolder="transformer", cache_dir=cache, local_files_only=True
    )
    assert_same_state(loaded.state_dict(), model.state_dict())

    with pytest.raises(CheckpointError, match="no subfolder 'vae'"):
        FramePackTransformer.from_pretrained(
            "org/pipeline", subfolder="vae", cache_dir=cache, local_files_only=True
        )


def test_hub_id_absent_from_cache_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_hub_cache(tmp_path, "org/other")  # a cache that holds something else
    with pytest.raises(CheckpointError) as info:
        FramePackTransformer.from_pretrained("org/absent", cache_dir=tmp_path, local_files_only=True)
    message = str(info.value)
    assert "org/absent" in message and "Hugging Face Hub" in message
    assert "\n" not in message


# ---- 5. bad checkpoints ----------------------------------------------------------------------------------


def single_file(tmp_path, state: dict[str, torch.Tensor]):
    file = tmp_path / "w" / "model.safetensors"
    file.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


def load_error(source, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        FramePackTransformer.from_pretrained(source, **kwargs)
    return str(info.value)


def test_missing_tensor_is_named(model, tmp_path):
    state = dict(model.state_dict())
    del state["single_transformer_blocks.3.proj_out.weight"]
    message = load_error(single_file(tmp_path, state), config="tiny")
    assert "1 missing tensors" in message and "single_transformer_blocks.3.proj_out.weight" in message


def test_unexpected_tensor_is_named(model, tmp_path):
    state = {**model.state_dict(), "transformer_blocks.9.attn.to_q.weight": torch.zeros(4, 4)}
    message = load_error(single_file(tmp_path, state), config="tiny")
    assert "1 unexpected tensors" in message and "transformer_blocks.9.attn.to_q.weight" in message
    assert "missing" not in message


def test_misshaped_tensor_is_named(model, tmp_path):
    state = dict(model.state_dict())
    state["norm_out.linear.weight"] = torch.zeros(state["norm_out.linear.weight"].shape[0] + 1, 7)
    message = load_error(single_file(tmp_path, state), config="tiny")
    assert "wrong shape" in message and "norm_out.linear.weight" in message
    assert "missing" not in message and "unexpected" not in message


def test_unsupported_storage_dtype_is_named(model, tmp_path):
    state = dict(model.state_dict())
    state["proj_out.bias"] = state["proj_out.bias"].double()
    message = load_error(single_file(tmp_path, state), config="tiny")
    assert "unsupported storage dtypes" in message and "proj_out.bias" in message


def test_truncated_file(model, tmp_path):
    file = single_file(tmp_path, model.state_dict())
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    message = load_error(file, config="tiny")
    assert "model.safetensors" in message and "truncated" in message


def test_truncated_shard_is_named(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shard = tmp_path / shards_of(tmp_path)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    message = load_error(tmp_path)
    assert shard.name in message and "not a readable safetensors file" in message


@pytest.mark.parametrize(
    "content",
    [random.Random(0).randbytes(4096), json.dumps({"weight": [1.0, 2.0, 3.0]}).encode(), b"", b"\x10\x00"],
    ids=["random-bytes", "json", "empty", "two-bytes"],
)
def test_file_that_is_not_safetensors(content, tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(content)
    message = load_error(file, config="tiny")
    assert "not a readable safetensors file" in message and str(file) in message


@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save", "legacy-pickle"])
def test_pickle_renamed_safetensors_is_refused_unread(model, tmp_path, zipped, monkeypatch):
    """A pickle under a .safetensors name is named as one and never unpickled (unpickling runs code)."""
    import pickle

    file = tmp_path / "model.safetensors"
    torch.save(model.state_dict(), file, _use_new_zipfile_serialization=zipped)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    message = load_error(file, config="tiny")
    assert str(file) in message and "is a pickle" in message


def test_file_with_other_extension(model, tmp_path):
    file = tmp_path / "model.bin"
    torch.save(model.state_dict(), file)
    assert "expected a .safetensors file" in load_error(file, config="tiny")


def test_directory_without_weights(model, tmp_path):
    model.config.save(tmp_path / "config.json")
    assert "no .safetensors weights" in load_error(tmp_path)


def test_directory_without_config(model, tmp_path):
    save_file(model.state_dict(), str(tmp_path / WEIGHTS_NAME))
    assert "no config.json" in load_error(tmp_path)
    assert_same_state(  # and config= supplies it
        FramePackTransformer.from_pretrained(tmp_path, config="tiny").state_dict(), model.state_dict()
    )


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_nonexistent_path(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    source = "no/such/checkpoint" if relative else str(tmp_path / "nothing-here")
    message = load_error(source)
    assert "checkpoint not found" in message and source in message


def test_index_naming_a_missing_shard(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    gone = shards_of(tmp_path)[-1]
    (tmp_path / gone).unlink()
    message = load_error(tmp_path)
    assert "names shards that do not exist" in message and gone in message


def test_corrupt_index(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    (tmp_path / INDEX_NAME).write_text('{"weight_map": ')
    assert "not a valid safetensors index" in load_error(tmp_path)


def test_tensor_in_two_files(model, tmp_path):
    state = model.state_dict()
    save_file({"proj_out.bias": state["proj_out.bias"]}, str(tmp_path / "a.safetensors"))
    save_file(dict(state), str(tmp_path / "b.safetensors"))
    message = load_error(tmp_path, config="tiny")
    assert "proj_out.bias" in message and "appears in both" in message


@pytest.mark.parametrize(
    "text, problem",
    [('{"num_layers": 2,', "not valid JSON"), ("[1, 2]", "does not hold a JSON object")],
    ids=["bad-json", "not-an-object"],
)
def test_invalid_config_json(model, tmp_path, text, problem):
    save_file(model.state_dict(), str(tmp_path / WEIGHTS_NAME))
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        FramePackTransformer.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_invalid_config_values(model, tmp_path):
    save_file(model.state_dict(), str(tmp_path / WEIGHTS_NAME))
    data = model.config.to_json_dict() | {"rope_axes_dim": [8, 8, 8]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rope_axes_dim"):
        FramePackTransformer.from_pretrained(tmp_path)


# ---- 6. forward-input validation ----------------------------------------------------------------------


def _history(inputs, i, **changes):
    levels = list(inputs["history"])
    levels[i] = HistoryInput(**{**vars(levels[i]), **changes})
    return levels


def _bad_inputs(case: str, x: dict) -> dict:
    b, c, t, h, w = x["latents"].shape
    if case == "latents":
        return {**x, "latents": torch.randn(b, c + 1, t, h, w)}
    if case == "text":
        return {**x, "text": torch.randn(b, x["text"].shape[1], x["text"].shape[2] + 1)}
    if case == "text_mask":
        return {**x, "text_mask": x["text_mask"][:, :-1]}
    if case == "latent_indices":
        return {**x, "latent_indices": torch.arange(t + 1)}
    if case == "history[0].latents":
        frames = x["history"][0].latents.shape[2]
        return {**x, "history": _history(x, 0, latents=torch.randn(b, c, frames, h + 2, w))}
    if case == "history[1].indices":
        return {**x, "history": _history(x, 1, indices=x["history"][1].indices[:, :-1])}
    if case == "history[2].kernel":
        return {**x, "history": _history(x, 2, kernel=(8, 16, 16))}
    if case == "image_embeds":
        return {**x, "image_embeds": None}
    if case == "guidance":
        return {**x, "guidance": None}
    raise AssertionError(case)


BAD_INPUTS = [
    "latents",
    "text",
    "text_mask",
    "latent_indices",
    "history[0].latents",
    "history[1].indices",
    "history[2].kernel",
    "image_embeds",
    "guidance",
]


@pytest.fixture(scope="module")
def small_inputs(model) -> dict:
    return random_inputs(model.config, frames=2, height=4, width=4, text_len=6, image_tokens=2,
                         valid_text=[4], history_frames=(2, 2, 4))


def test_valid_small_inputs_run(model, small_inputs):
    out = forward(model, small_inputs)
    assert out.shape == small_inputs["latents"].shape


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_forward_input_names_the_argument(model, small_inputs, case):
    bad = _bad_inputs(case, small_inputs)
    with pytest.raises(ValueError) as info:
        forward(model, bad)
    message = str(info.value)
    # the message starts with the argument's name (so "text" does not pass for "text_mask")
    assert re.match(re.escape(case) + r"(?![\w.\[])", message), message
    if case.endswith("kernel"):
        assert "(8, 16, 16)" in message


# ---- 7. invalid configs --------------------------------------------------------------------------------


def test_rope_axes_must_sum_to_head_dim():
    expected = r"rope_axes_dim \(8, 8, 8\) sums to 24, but attention_head_dim is 128"
    with pytest.raises(ValueError, match=expected):
        TransformerConfig(rope_axes_dim=(8, 8, 8))
    with pytest.raises(ValueError, match="rope_axes_dim"):
        TransformerConfig(rope_axes_dim=(8, 12, 11))  # odd axis
    assert sum(TransformerConfig(attention_head_dim=24, rope_axes_dim=(8, 8, 8)).rope_axes_dim) == 24


def test_unknown_preset_lists_known_presets():
    with pytest.raises(ValueError, match="unknown model preset 'nope'") as info:
        preset("nope")
    assert "hunyuan-13b" in str(info.value) and "tiny" in str(info.value)
    with pytest.raises(ValueError, match="known presets: hunyuan-13b, tiny"):
        FramePackTransformer("nope")


@pytest.mark.parametrize(
    "schedule, problem",
    [("f1k3", "without embedders"), ("garbage", "cannot parse context schedule")],
    ids=["f1k3", "garbage"],
)
def test_invalid_context_schedule(schedule, problem):
    with pytest.raises(ValueError, match=problem) as info:
        TransformerConfig(context_schedule=schedule)
    assert schedule in str(info.value)
