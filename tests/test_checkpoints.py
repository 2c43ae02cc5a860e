"""Checkpoint I/O in the ``lllyasviel/FramePackI2V_HY`` layout, forward-input and config validation.

Exactness: our model and diffusers' port are two implementations whose float32 results differ by a
few ULPs (see test_transformer.py), so across implementations we compare weights bitwise and
outputs to 1e-5; a model compared with itself (saved, then reloaded) must give bit-identical outputs.
"""

from __future__ import annotations

import json
import random
import re
import sys

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


# ---- 8. lazy loading, float8 storage, peak memory -------------------------------------------------------
#
# References here are computed independently of framepack.model.io: safetensors' own load_file for
# what the file holds, and `stored.float() * scale` for what a scaled float8 weight means.

FP8 = torch.float8_e4m3fn


def file_state(directory_or_file) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as safetensors' load_file reads it (the eager reference)."""
    from pathlib import Path

    path = Path(directory_or_file)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """Same dtype and the same bytes (float8 has no torch.equal on CPU)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


@pytest.fixture(params=[None, 7], ids=["one-block", "blocks-of-7"])
def block_elements(request, monkeypatch):
    """The default block size, and one so small that every tensor is read over many blocks."""
    import framepack.model.io as io

    if request.param is not None:
        monkeypatch.setattr(io, "BLOCK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize(
    "stored, target",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ids=["fp32-fp32", "fp32-bf16", "bf16-fp32", "bf16-bf16", "fp16-fp32"],
)
def test_lazy_load_equals_eager_load(model, inputs, stored, target, block_elements, tmp_path):
    import copy

    copy.deepcopy(model).to(stored).save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(shards_of(tmp_path)) > 1
    eager = {name: tensor.to(target) for name, tensor in file_state(tmp_path).items()}

    loaded = FramePackTransformer.from_pretrained(tmp_path, dtype=target)
    assert_same_state(loaded.state_dict(), eager)
    # and it computes what a model holding the eager state computes (load_state_dict copies into
    # allocator-aligned parameters)
    reference = copy.deepcopy(model).to(target)
    reference.load_state_dict(eager)
    assert torch.equal(forward(loaded, inputs), forward(reference, inputs))


def community_fp8(model, spelling: str | None, per_channel: bool = False) -> dict[str, torch.Tensor]:
    """A float8 file as people share them: every weight of two or more dimensions in e4m3fn (convs
    and the refiner's too), norms and biases in bf16 (kijai's layout). ``spelling`` None: a plain
    cast; ".scale_weight": ComfyUI's per-tensor scalar, with its marker and input scales;
    ".weight_scale": a float32 scale per tensor or per output channel (out, 1)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() < 2:
            state[name] = tensor.to(torch.bfloat16)
        elif spelling is None:
            state[name] = tensor.to(FP8)
        else:
            dims = tuple(range(1, tensor.dim()))
            amax = tensor.abs().amax(dim=dims, keepdim=True) if per_channel else tensor.abs().max()
            scale = (amax.float() / 448).clamp(min=1e-12)
            state[name] = (tensor.float() / scale).to(FP8)
            prefix = name.removesuffix(".weight")
            state[prefix + spelling] = scale.reshape(scale.shape[0], 1) if per_channel else scale.reshape(())
            if spelling == ".scale_weight":
                state[prefix + ".scale_input"] = torch.ones(())
    if spelling == ".scale_weight":
        state["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    return state


FP8_FILES = {
    "plain": (None, False),
    "scale_weight-per-tensor": (".scale_weight", False),
    "weight_scale-per-channel": (".weight_scale", True),
}


def meant(state: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """What a stored tensor means: ``stored.float() * scale`` (either spelling), in ``dtype``."""
    prefix = name.removesuffix(".weight")
    scale = state.get(prefix + ".scale_weight", state.get(prefix + ".weight_scale"))
    value = state[name].float()
    if scale is not None and name.endswith(".weight"):
        per_row = scale.numel() > 1  # one scale per output channel: broadcast along the rows
        value = value * (scale.float().reshape(-1, *[1] * (value.dim() - 1)) if per_row else scale.float())
    return value.to(dtype)


@pytest.mark.parametrize("kind", list(FP8_FILES))
def test_fp8_file_loads_fp8_stored(model, kind, block_elements, tmp_path):
    from framepack.model.io import SCALE_NAME, dequantize, fp8_scale, fp8_weight_names

    state = community_fp8(model, *FP8_FILES[kind])
    file = single_file(tmp_path, state)
    on_disk = file_state(file)

    loaded = FramePackTransformer.from_pretrained(file, config="tiny", storage_dtype=FP8)
    block_weights = fp8_weight_names(loaded)
    assert len(block_weights) > 20 and all(n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                                           for n in block_weights)
    modules = dict(loaded.named_modules())
    for name, param in loaded.named_parameters():
        module = modules[name.rpartition(".")[0]]
        if name in block_weights:  # kept float8: the file's bytes, and its scale as a buffer
            assert_bits_equal(param.data, on_disk[name], name)
            assert not param.requires_grad
            scale = fp8_scale(module)
            if kind == "plain":
                assert scale is None, name
            else:
                file_scale = on_disk[name.removesuffix(".weight") + FP8_FILES[kind][0]]
                assert scale.dtype == torch.float32 and torch.equal(scale.flatten(), file_scale.flatten()), name
                assert scale.dim() == 0 if file_scale.numel() == 1 else scale.shape == (param.shape[0], 1)
        else:  # everything else dequantized into the compute dtype (bf16: the file's float8 is storage only)
            assert param.dtype == torch.bfloat16, name
            assert torch.equal(param.data, meant(on_disk, name, torch.bfloat16)), name
            if name.endswith(".weight"):  # its scale was applied, not kept
                assert fp8_scale(module) is None, name

    # The same file without float8 storage: every tensor dequantized, tensor.float() * scale
    for dtype in (torch.bfloat16, torch.float32):
        plain = FramePackTransformer.from_pretrained(file, config="tiny", dtype=dtype)
        result = plain.state_dict()
        assert result.keys() == model.state_dict().keys()  # no scale buffers, no marker
        for name, tensor in result.items():
            assert tensor.dtype == dtype, name
            assert torch.equal(tensor, meant(on_disk, name, dtype)), name
        if dtype == torch.bfloat16:
            # float8 storage and bf16 storage of one file are the same weights under the convention
            for name in block_weights:
                module = modules[name.rpartition(".")[0]]
                deq = dequantize(module.weight, getattr(module, SCALE_NAME, None), torch.bfloat16)
                assert torch.equal(deq, result[name]), name


def test_bf16_checkpoint_quantized_to_fp8_storage_and_round_trip(model, block_elements, tmp_path):
    from framepack.model.io import SCALE_NAME, fp8_weight_names

    import copy

    normal = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():  # normal, not the default uniform init: max and -min differ, as in trained weights
        for param in normal.parameters():
            param.normal_(0, 0.05)
    normal.save_pretrained(tmp_path / "bf16", max_shard_size="200KB")
    source = file_state(tmp_path / "bf16")

    loaded = FramePackTransformer.from_pretrained(tmp_path / "bf16", storage_dtype=FP8)
    block_weights = fp8_weight_names(loaded)
    state = loaded.state_dict()
    for name, tensor in source.items():
        if name not in block_weights:
            assert torch.equal(state[name], tensor), name  # bf16 stays as it is
            continue
        w = tensor.float()
        scale = w.abs().max() / 448  # per-tensor absmax, computed here independently
        assert_bits_equal(state[name], (w / scale).to(FP8), name)
        stored_scale = state[name.removesuffix(".weight") + "." + SCALE_NAME]
        assert stored_scale.dtype == torch.float32 and stored_scale.dim() == 0
        assert torch.equal(stored_scale, scale), name
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half a subnormal step near 0
        error = (state[name].float() * stored_scale - w).abs()
        assert bool((error <= w.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()), name

    # ours, saved and loaded again: the same bytes and scales, float8 and all
    loaded.save_pretrained(tmp_path / "fp8", max_shard_size="200KB")
    saved = file_state(tmp_path / "fp8")
    assert {saved[n].dtype for n in block_weights} == {FP8}
    again = FramePackTransformer.from_pretrained(tmp_path / "fp8", storage_dtype=FP8).state_dict()
    assert again.keys() == state.keys()
    for name in state:
        assert_bits_equal(again[name], state[name], name)
    # and without float8 storage, dequantized: stored.float() * scale
    bf16 = FramePackTransformer.from_pretrained(tmp_path / "fp8").state_dict()
    assert bf16.keys() == source.keys()
    for name in block_weights:
        expected = (saved[name].float() * saved[name.removesuffix(".weight") + "." + SCALE_NAME]).to(torch.bfloat16)
        assert torch.equal(bf16[name], expected), name


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda s: s.__setitem__("proj_out.scale_weight", torch.ones(3)), "unusable float8 scales"),
        (lambda s: s.__setitem__("proj_out.weight_scale", torch.ones(())), "has two scales"),
        (lambda s: s.__setitem__("proj_out.scale_weight", torch.ones((), dtype=torch.int32)), "unusable float8 scales"),
        (lambda s: s.__setitem__("nothing.scale_weight", torch.ones(())), "unexpected tensors"),
    ],
    ids=["scale-shape", "two-scales", "integer-scale", "scale-without-weight"],
)
def test_bad_fp8_scales_are_one_line_errors(model, change, problem, tmp_path):
    state = community_fp8(model, ".scale_weight")
    change(state)
    message = load_error(single_file(tmp_path, state), config="tiny", storage_dtype=FP8)
    assert problem in message and "\n" not in message
    assert "scale_weight" in message


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"dtype": FP8}, "storage format, not a compute dtype"),
        ({"storage_dtype": torch.float16}, "storage_dtype must be"),
        ({"pin_memory": True}, "pin_memory"),
    ],
    ids=["fp8-compute", "fp16-storage", "pin-on-cpu"],
)
def test_bad_loading_arguments(model, kwargs, problem, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=problem) as info:
        FramePackTransformer.from_pretrained(tmp_path, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_targets_and_pinned_host_memory(model, tmp_path):
    model.save_pretrained(tmp_path)
    on_gpu = FramePackTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16, storage_dtype=FP8, device="cuda")
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cuda"}
    pinned = FramePackTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16, storage_dtype=FP8, device="cuda",
                                                  pin_memory=True)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in pinned.state_dict().values())
    gpu_state, pinned_state = on_gpu.state_dict(), pinned.state_dict()
    for name in gpu_state:
        assert_bits_equal(gpu_state[name].cpu(), pinned_state[name], name)


# Peak RSS while loading, measured by benchmarks/loading.py in a fresh process per load, on a model
# whose weights (~230 MB in bf16) dwarf the interpreter's own allocations while loading.
RSS_BOUND = 1.2  # issue 16: peak RSS while loading <= 1.2 x the bytes that stay resident


@pytest.fixture(scope="module")
def loading_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loading.py"
    spec = importlib.util.spec_from_file_location("benchmark_loading", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def mid_checkpoints(loading_bench, tmp_path_factory):
    cfg = loading_bench.mid_config(heads=8, layers=1, single_layers=2)
    return loading_bench.make_checkpoints(tmp_path_factory.mktemp("mid"), cfg)


@pytest.mark.parametrize(
    "checkpoint, dtype, storage",
    [("bf16 file", "bf16", None), ("bf16 shards", "bf16", "fp8"), ("fp8 scaled file", "bf16", "fp8")],
    ids=["bf16-file", "bf16-shards-to-fp8", "community-fp8-file"],
)
def test_peak_rss_while_loading(loading_bench, mid_checkpoints, checkpoint, dtype, storage):
    case = loading_bench.Case(checkpoint, dtype, storage)
    m = loading_bench.measure(mid_checkpoints[checkpoint], case)
    assert m.resident > 150e6  # the model dominates the measurement
    if storage == "fp8":  # the float8 weights stayed float8: no bf16 copy of them was ever resident
        assert m.resident < 0.8 * sum(p.stat().st_size for p in mid_checkpoints["bf16 file"].glob("*.safetensors"))
    assert m.ratio <= RSS_BOUND, (
        f"peak RSS rose by {m.increase / 2**20:.0f} MiB loading {m.resident / 2**20:.0f} MiB (ratio {m.ratio:.2f})"
    )


def test_safetensors_header_length_starting_like_a_pickle(model, tmp_path):
    """A header length whose low byte is 0x80 (a bare pickle's first byte) is still safetensors."""
    import struct

    file = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(file), metadata={"pad": ""})
    length = struct.unpack("<Q", file.read_bytes()[:8])[0]  # a multiple of 8 (safetensors pads it)
    # metadata longer by a multiple of 8 bytes: a header length that ends in 0x80
    save_file(model.state_dict(), str(file), metadata={"pad": "x" * ((0x80 - length) % 256)})
    assert file.read_bytes()[0] == 0x80, struct.unpack("<Q", file.read_bytes()[:8])
    assert_same_state(FramePackTransformer.from_pretrained(file, config="tiny").state_dict(), model.state_dict())
