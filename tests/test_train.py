"""The trainer and the small video autoencoder (issue 4 groundwork)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from framepack import trainer
from framepack.small_vae import SmallVAEConfig, SmallVideoAutoencoder
from framepack.train import vae_task  # noqa: F401  (registers the task)

TINY = {"groups": 1, "size": 32, "crop": 32, "model": {"channels": [8, 16, 16], "blocks": 1}}


def test_autoencoder_geometry_matches_hunyuan_video():
    model = SmallVideoAutoencoder(SmallVAEConfig(channels=(8, 8, 8)))
    pixels = torch.rand(2, 3, 1 + 4 * 3, 32, 48) * 2 - 1
    latents = model.encode(pixels)
    assert latents.shape == (2, 16, 4, 4, 6)  # 16 channels, 8x spatial, latent 0 = frame 0 alone
    assert model.decode(latents).shape == pixels.shape
    # causal: changing the last group's frames leaves the earlier latents unchanged
    changed = pixels.clone()
    changed[:, :, -4:] = 0
    assert torch.equal(model.encode(changed)[:, :, :3], latents[:, :, :3])
    # a span that starts mid-video decodes its first latent as one frame
    assert model.decode(latents[:, :, 1:]).shape[2] == 1 + 4 * 2
    with pytest.raises(ValueError, match="1 \\+ 4n"):
        model.encode(pixels[:, :, :3])


def test_a_decoder_with_context_reads_the_previous_latent_only(tmp_path):
    plain = SmallVideoAutoencoder(SmallVAEConfig(channels=(8, 8, 8)))
    latents = plain.encode(torch.rand(1, 3, 1 + 4 * 4, 32, 32) * 2 - 1)  # 5 latents
    widened = plain.with_decoder_context()
    assert widened.config.decoder_context == 1
    assert torch.equal(widened.decode(latents), plain.decode(latents))  # new inputs start at zero
    with torch.no_grad():
        widened.decoder.trunk[0].weight.normal_()  # a trained decoder uses its context
    frames = widened.decode(latents)
    changed = latents.clone()
    changed[:, :, 2] += 1.0
    after = widened.decode(changed)
    # latent k holds frames 4k-3 .. 4k: latent 2 changes its own frames and latent 3's, nothing else
    assert torch.equal(after[:, :, :5], frames[:, :, :5])
    assert not torch.equal(after[:, :, 5:9], frames[:, :, 5:9])
    assert not torch.equal(after[:, :, 9:13], frames[:, :, 9:13])
    assert torch.equal(after[:, :, 13:], frames[:, :, 13:])
    # a span that starts mid-video still makes one frame of its first latent
    assert widened.decode(latents[:, :, 2:]).shape[2] == 1 + 4 * 2
    widened.save_pretrained(tmp_path)
    loaded = SmallVideoAutoencoder.from_pretrained(tmp_path)
    assert loaded.config == widened.config and torch.equal(loaded.decode(latents), frames)
    with pytest.raises(ValueError, match="decoder_context"):
        SmallVAEConfig(decoder_context=2)


def test_flicker_measures_errors_that_change_between_frames():
    clip = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    assert vae_task.flicker(clip, clip) == 0.0
    assert vae_task.flicker((clip + 0.1).clamp(-1, 1), clip) < vae_task.flicker(clip.flip(2), clip)
    steady = clip.clone()
    steady.clamp_(-0.8, 0.8)
    assert vae_task.flicker(steady + 0.1, steady) == pytest.approx(0.0, abs=1e-4)  # the same error every frame
    noisy = steady + 0.05 * torch.randn_like(steady)
    assert vae_task.flicker(noisy, steady) > 2.0  # 0.05 * 127.5 per frame, changing every frame


def test_round_trip_through_files(tmp_path):
    model = SmallVideoAutoencoder(SmallVAEConfig(channels=(8, 8, 8), scaling_factor=0.5))
    model.save_pretrained(tmp_path)
    loaded = SmallVideoAutoencoder.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x = torch.rand(1, 3, 5, 16, 16)
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_training_lowers_the_loss_and_resumes(tmp_path):
    config = trainer.TrainConfig(task="vae", output_dir=str(tmp_path / "run"), steps=40, batch_size=4, lr=2e-3,
                                 warmup=5, checkpoint_every=20, task_args=TINY)
    trainer.train(config, max_steps_this_run=20)
    assert trainer.latest_checkpoint(tmp_path / "run").name == "checkpoint-20"
    trainer.train(config)  # resumes at step 20 and finishes
    log = [json.loads(line) for line in (tmp_path / "run" / "loss.log").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [20, 40]
    assert log[-1]["loss"] < log[0]["loss"]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "metrics.json").read_text())["psnr_db"] > 0
    exported = SmallVideoAutoencoder.from_pretrained(final)
    assert exported.config.scaling_factor > 0
    assert exported.preview_map.shape == (17, 3)  # 16 channels + bias -> RGB, fitted at export


class _LineFit:
    """A toy task: fit y = 3x - 1 on one fixed batch (the same data whatever the seed, so a resumed
    run retraces an uninterrupted one exactly)."""

    def __init__(self, args: dict) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        self.x = torch.linspace(-1, 1, 16)[:, None]

    def batches(self, batch_size, seed):
        while True:
            yield self.x, 3 * self.x - 1

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def export(self, model, directory):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "weights.safetensors"))


def test_weight_average_follows_its_recursion():
    model = torch.nn.Linear(2, 1)
    average = trainer.WeightAverage(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        average.update(model, step)
        d = trainer.ema_decay(step, 0.9)
        expected = d * expected + (1 - d) * model.weight.detach()
    assert torch.allclose(average.shadow["weight"], expected, atol=1e-6)
    assert trainer.ema_decay(0, 0.9) < 0.2 and trainer.ema_decay(10_000, 0.9) == 0.9  # ramped, then capped
    averaged = average.averaged(model)
    assert torch.allclose(averaged.weight, expected, atol=1e-6)
    assert not torch.allclose(model.weight, expected)  # the live model is left as it was


def test_training_exports_the_average_and_resumes_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(trainer.TASKS, "line", _LineFit)

    def run(name: str, split: bool) -> dict:
        config = trainer.TrainConfig(task="line", output_dir=str(tmp_path / name), steps=80, batch_size=16, lr=0.2,
                                     warmup=1, checkpoint_every=20, ema=0.9)
        if split:
            trainer.train(config, max_steps_this_run=20)
            assert (tmp_path / name / "checkpoint-20" / trainer.WeightAverage.FILE).exists()
        trainer.train(config)
        return load_file(str(tmp_path / name / "final" / "weights.safetensors"))

    whole, resumed = run("whole", split=False), run("resumed", split=True)
    for key in whole:  # the average survives the interruption exactly
        assert torch.allclose(whole[key], resumed[key], atol=1e-6)
    raw = load_file(str(next((tmp_path / "whole").glob("checkpoint-80")) / "model.safetensors"))
    assert not torch.allclose(whole["weight"], raw["weight"])  # the export is the average, not the last step
    assert abs(float(whole["weight"]) - 3) < 0.3 and abs(float(whole["bias"]) + 1) < 0.3  # and it fits the line
    with pytest.raises(ValueError, match="ema"):
        trainer.TrainConfig(task="line", output_dir="x", steps=1, ema=1.0)


def test_preview_map_is_the_least_squares_fit():
    """Latents that are an exact linear image of the (8x8-pooled) frames give back that map."""
    from framepack.video import fit_latent_to_rgb, preview_frames

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(17, 3, generator=g) * 0.04
    latents = torch.randn(1, 16, 5, 4, 4, generator=g)
    rgb = torch.cat([latents[0].permute(1, 2, 3, 0), torch.ones(5, 4, 4, 1)], -1) @ truth
    assert rgb.abs().max() < 1  # inside the RGB range: the relation is exactly linear
    frames = ((rgb + 1) * 127.5).round().to(torch.uint8).repeat_interleave(8, 1).repeat_interleave(8, 2).numpy()
    fitted = fit_latent_to_rgb(latents, frames)
    pooled = preview_frames(latents, fitted).astype(int)
    assert abs(pooled - frames[:, ::8, ::8].astype(int)).max() <= 2  # uint8 rounding only


def test_decoder_stage_keeps_the_latent_space(tmp_path):
    """A decoder-only stage from exported weights: the encoder (and so every latent) is unchanged."""
    first = trainer.TrainConfig(task="vae", output_dir=str(tmp_path / "a"), steps=4, batch_size=2, lr=2e-3,
                                warmup=1, checkpoint_every=4, task_args=TINY)
    trainer.train(first)
    second = trainer.TrainConfig(task="vae", output_dir=str(tmp_path / "b"), steps=6, batch_size=2, lr=2e-3,
                                 warmup=1, checkpoint_every=6, seed=1,
                                 task_args={**TINY, "init": str(tmp_path / "a" / "final"), "train_only": "decoder"})
    trainer.train(second)
    a = SmallVideoAutoencoder.from_pretrained(tmp_path / "a" / "final")
    b = SmallVideoAutoencoder.from_pretrained(tmp_path / "b" / "final")
    for (name, pa), pb in zip(a.encoder.state_dict().items(), b.encoder.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.decoder.parameters(), b.decoder.parameters()))
    assert a.config.scaling_factor == pytest.approx(b.config.scaling_factor, rel=1e-6)
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(a.encode(pixels), b.encode(pixels))
    with pytest.raises(ValueError, match="train_only"):
        trainer.TASKS["vae"]({**TINY, "train_only": "encoder"})


def test_decoder_stage_with_context_smooths_without_moving_the_latents(tmp_path):
    """``decoder_context`` and ``temporal_weight`` on a decoder-only stage: the exported autoencoder
    reads the previous latent, encodes exactly as its init did and keeps its scaling factor."""
    first = trainer.TrainConfig(task="vae", output_dir=str(tmp_path / "a"), steps=4, batch_size=2, lr=2e-3,
                                warmup=1, checkpoint_every=4, task_args={**TINY, "groups": 2})
    trainer.train(first)
    stage = {**TINY, "groups": 2, "init": str(tmp_path / "a" / "final"), "train_only": "decoder",
             "decoder_context": 1, "temporal_weight": 1.0}
    second = trainer.TrainConfig(task="vae", output_dir=str(tmp_path / "b"), steps=6, batch_size=2, lr=2e-3,
                                 warmup=1, checkpoint_every=3, seed=1, task_args=stage)
    trainer.train(second, max_steps_this_run=3)
    trainer.train(second)  # resumes the widened decoder from its checkpoint
    a = SmallVideoAutoencoder.from_pretrained(tmp_path / "a" / "final")
    b = SmallVideoAutoencoder.from_pretrained(tmp_path / "b" / "final")
    assert (a.config.decoder_context, b.config.decoder_context) == (0, 1)
    assert b.config.scaling_factor == a.config.scaling_factor
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    assert torch.equal(a.encode(pixels), b.encode(pixels))
    assert b.decoder.trunk[0].weight[:, 16:].abs().sum() > 0  # the context inputs were trained
    metrics = json.loads((tmp_path / "b" / "final" / "metrics.json").read_text())
    assert metrics["flicker"] > 0 and metrics["psnr_db"] > 0
    with pytest.raises(ValueError, match="init"):
        trainer.TASKS["vae"]({**TINY, "decoder_context": 1})


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        trainer.TrainConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"task": "vae"}')
    with pytest.raises(ValueError):
        trainer.TrainConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown training task"):
        trainer.train(trainer.TrainConfig(task="nope", output_dir=str(tmp_path / "x"), steps=1))


def test_demo_text_encoders_cover_the_world_vocabulary(tmp_path):
    """Every word of every caption of the world is a known token of the demo LLaMA tokenizer."""
    import numpy as np
    from transformers import AutoTokenizer

    from framepack.components import HunyuanTextEncoder
    from framepack.train import world
    from framepack.train.text_encoder import write_text_encoders

    captions = {world.caption(world.sample_params(np.random.default_rng(i))) for i in range(300)}
    words = sorted({w for c in captions for w in c.split()})
    root = write_text_encoders(tmp_path, text_dim=32, pooled_dim=16, extra_words=words)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    for caption in captions:
        assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"], caption
    encoder = HunyuanTextEncoder.from_pretrained(root)
    embedding = encoder.encode(sorted(captions)[0])
    assert embedding.states.shape[-1] == 32 and embedding.pooled.shape == (1, 16)
    # after the template crop: the caption's tokens and <|eot_id|> (as many as caption + BOS alone)
    assert int(embedding.mask.sum()) == len(tokenizer(sorted(captions)[0])["input_ids"])


def test_framepack_task_trains_in_planner_layouts(tmp_path):
    """A few steps of the FramePack objective on world clips lower the loss (tiny everything)."""
    args = _tiny_framepack_args(tmp_path)
    task = trainer.TASKS["framepack"](args)
    batch = next(task.batches(3, seed=0))
    assert batch.target.shape == (3, 16, 9, 4, 4) and batch.window.shape == (3, 9)
    assert [h.kernel for h in batch.history] == [(1, 2, 2), (2, 4, 4), (4, 8, 8)]
    config = trainer.TrainConfig(task="framepack", output_dir=str(tmp_path / "run"), steps=30, batch_size=3,
                                 lr=1e-3, warmup=3, checkpoint_every=15, task_args=args)
    trainer.train(config)
    log = [json.loads(line) for line in (tmp_path / "run" / "loss.log").read_text().splitlines()]
    assert [e["step"] for e in log] == [15, 30]
    assert log[-1]["loss"] < log[0]["loss"]  # mean over steps 1-30 below the mean over 1-15
    from framepack import FramePackTransformer

    assert FramePackTransformer.from_pretrained(tmp_path / "run" / "final").config.has_image_proj is False

    # fine-tuning starts from the exported weights
    tuned = trainer.TASKS["framepack"]({**args, "init": str(tmp_path / "run" / "final")})
    final = FramePackTransformer.from_pretrained(tmp_path / "run" / "final")
    assert all(torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(), final.state_dict().values()))
    with pytest.raises(ValueError, match="do not match"):
        trainer.TASKS["framepack"]({**args, "config": {"num_layers": 2, "num_single_layers": 1},
                                    "init": str(tmp_path / "run" / "final")})

    # the latent cache holds exactly what encoding the same clips afresh gives (fp16 storage); a
    # cache of fewer clips is their prefix and is extended, one of more gives its first clips
    two, _ = trainer.TASKS["framepack"]({**args, "clips": 2, "cache": str(tmp_path / "clips.safetensors")})._load_or_build_cache()
    cached = trainer.TASKS["framepack"]({**args, "clips": 3, "cache": str(tmp_path / "clips.safetensors")})
    latents, captions = cached._load_or_build_cache()
    assert torch.equal(latents[:2], two)
    first, first_captions = trainer.TASKS["framepack"]({**args, "clips": 1, "cache": str(tmp_path / "clips.safetensors")})._load_or_build_cache()
    assert torch.equal(first, latents[:1]) and first_captions == captions[:1]
    # a crash between writing the captions and the latents (the commit point): not trusted, rebuilt
    crashed = {**args, "clips": 3, "cache": str(tmp_path / "crashed.safetensors")}
    trainer.TASKS["framepack"]({**crashed, "clips": 2})._load_or_build_cache()
    (tmp_path / "crashed.json").write_text(json.dumps(captions))
    rebuilt, rebuilt_captions = trainer.TASKS["framepack"](crashed)._load_or_build_cache()
    assert len(rebuilt) == len(rebuilt_captions) == 3
    assert latents.shape == (3, 16, 19, 4, 4) and len(captions) == 3
    from framepack.train import world

    scenes = world.stream(0)
    assert cached.start_frames == 1  # by default every clip starts at t = 0, as inference does
    for i in range(3):
        params = next(scenes)
        fresh = cached._encode_clip(params, 0)
        assert captions[i] == world.caption(params)
        torch.testing.assert_close(latents[i : i + 1].float(), fresh, atol=2e-3, rtol=2e-3)
    again, _ = trainer.TASKS["framepack"]({**args, "clips": 3, "cache": str(tmp_path / "clips.safetensors")})._load_or_build_cache()
    assert torch.equal(again, latents)  # loaded, not rebuilt
    batch = next(cached.batches(2, seed=0))
    assert batch.target.shape == (2, 16, 9, 4, 4)
    late = trainer.TASKS["framepack"]({**args, "clips": 3, "cache": str(tmp_path / "clips.safetensors"),
                                       "start_seconds": 10})
    assert not torch.equal(late._load_or_build_cache()[0], latents)  # other start times: rebuilt


def test_demo_text_states_tell_captions_apart(tmp_path):
    """The demo LLaMA's states are unit-scale, and one changed word changes its token's state as
    much as the state's own size (at transformers' default std 0.02 both were ~50x smaller)."""
    from framepack.components import HunyuanTextEncoder
    from framepack.train.text_encoder import write_text_encoders

    words = "a red circle moves to the left right on blue plain background".split()
    encoder = HunyuanTextEncoder.from_pretrained(write_text_encoders(tmp_path, text_dim=32, pooled_dim=16,
                                                                     extra_words=words))
    left = encoder.encode("a red circle moves to the left on a blue plain background")
    right = encoder.encode("a red circle moves to the right on a blue plain background")
    states = left.states[left.mask]
    rms = states.pow(2).mean(dim=-1).sqrt()
    assert rms.min() > 0.5
    change = (left.states - right.states)[left.mask].norm(dim=-1) / states.norm(dim=-1)
    assert change.max() > 0.5  # the direction word's position


def test_model_card_keeps_the_rows_of_stages_whose_runs_are_gone(tmp_path):
    """runs/ does not survive between sessions: a stage without its loss log keeps its old row."""
    from framepack.train.package import card_rows, stage_rows

    run = tmp_path / "stage-b"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"task": "framepack", "batch_size": 4, "lr": 5e-4}))
    (run / "loss.log").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "wall_seconds": 36 * s}) + "\n"
                                          for s in (10, 20)))
    old = "| stage-a | `vae` | 1200 | 8 | 0.0005 | 0.0570 -> 0.0096 | not logged |"
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(f"# card\n\n| stage | task | steps |\n|---|---|---|\n{old}\n\n| other | table |\n")
    assert card_rows(card) == {"stage-a": old}
    rows = stage_rows([tmp_path / "stage-a", run], card_rows(card))
    assert rows == [old, "| stage-b | `framepack` | 20 | 4 | 0.0005 | 0.1000 -> 0.0500 | 0.20 |"]
    with pytest.raises(ValueError, match="no loss log"):
        stage_rows([tmp_path / "stage-c"], card_rows(card))


def test_model_card_notes_survive_a_repackaging_without_notes(tmp_path):
    from framepack.train.package import card_notes, model_card

    assert card_notes(tmp_path / "none.md") == ""
    card = tmp_path / "MODEL_CARD.md"
    notes = "## Notes\n\n- stage a resumed once\n- | a table row | inside notes |\n"
    card.write_text("# card\n\n## Evaluation\n\n| a | b |\n\n" + notes)
    assert card_notes(card) == notes
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text("{}")
    (model / "framepack.json").write_text("{}")
    rewritten = model_card(model, [], None, card_notes(card))
    assert rewritten.endswith(notes) and rewritten.count("## Notes") == 1
    card.write_text(rewritten)
    assert card_notes(card) == notes  # stable: packaging again and again keeps them as they are


def test_model_card_says_the_default_mode_by_length(tmp_path):
    from framepack.train.package import model_card

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text("{}")
    for manifest, says in [({"mode": "inverted"}, "its default is inverted."),
                           ({"mode": "inverted", "forward_up_to": 5.0},
                            "its default is inverted, and forward for a plain clip of up to 5 s."),
                           ({"mode": "forward", "forward_up_to": 5.0}, "its default is forward.")]:
        (model / "framepack.json").write_text(json.dumps(manifest))
        assert says in " ".join(model_card(model, [], None).split())
    (model / "transformer" / "config.json").write_text(json.dumps({"max_inverted_padding": 3}))
    assert ("its default is forward. In inverted order each section is told its true distance from the start "
            "frame, up to 3 windows") in " ".join(model_card(model, [], None).split())


def test_store_half_keeps_every_weight_at_fp16_precision_and_the_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from framepack.train.package import store_half

    weights = {"w": torch.randn(64, 32), "steps": torch.arange(5)}
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir()
    save_file(weights, path, metadata={"format": "pt"})
    before = path.stat().st_size
    store_half(tmp_path / "transformer")
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("w").dtype == torch.float16
        assert torch.equal(f.get_tensor("w").float(), weights["w"].half().float())  # rounded once, not worse
        assert torch.equal(f.get_tensor("steps"), weights["steps"])  # integers untouched
    assert path.stat().st_size < 0.6 * before


def _tiny_framepack_args(root) -> dict:
    """task_args of a tiny 'framepack' task (random small VAE, demo-style text encoders, 32 px)."""
    from framepack.train import framepack_task  # noqa: F401  (registers the task)
    from framepack.train.text_encoder import write_text_encoders

    vae_dir = root / "vae"
    SmallVideoAutoencoder(SmallVAEConfig(channels=(8, 8, 8))).save_pretrained(vae_dir)
    text_dir = write_text_encoders(root / "text", text_dim=32, pooled_dim=16,
                                   extra_words="striped gradient plain teal cyan camera pans stays".split())
    return {"vae": str(vae_dir), "text": str(text_dir), "sections": 2, "size": 32,
            "config": {"num_layers": 1, "num_single_layers": 1}}


def _first_steps_without_history(task, batches: int) -> tuple[int, set[int]]:
    """Over ``batches`` batches of 4: how many samples have their window right after the start
    latent (RoPE index 1) with nothing in the nearest context but the start latent, and which
    window start indices occur."""
    stream = task.batches(4, seed=0)
    empty, starts = 0, set()
    for _ in range(batches):
        batch = next(stream)
        nearest = batch.history[0].latents  # (B, C, 1 + 1, h, w): the start latent, then the nearest frame
        for i in range(batch.window.shape[0]):
            starts.add(int(batch.window[i, 0]))
            empty += int(batch.window[i, 0]) == 1 and not nearest[i, :, 1:].any()
    return empty, starts


def test_vary_sections_trains_the_layouts_of_shorter_videos(tmp_path):
    """A 1-section inverted video's only step (window at index 1, no future made yet) is not a step
    of any 2-section plan: with vary_sections the task trains it, without it never does; every
    window starts where some plan of 1 or 2 sections puts it."""
    from framepack.planning import plan_sections

    args = {**_tiny_framepack_args(tmp_path), "modes": ["inverted"]}
    fixed, starts_fixed = _first_steps_without_history(trainer.TASKS["framepack"](args), 6)
    varied, starts_varied = _first_steps_without_history(trainer.TASKS["framepack"]({**args, "vary_sections": True}), 6)
    allowed = {p.window_indices[0] for n in (1, 2) for p in plan_sections(n, "inverted")}
    assert fixed == 0 and varied > 0
    assert starts_fixed | starts_varied <= allowed


def test_text_dropout_trains_the_empty_prompt_that_cfg_uses(tmp_path):
    """With text_dropout some samples carry exactly the embedding of the empty prompt (the
    pipeline's default negative prompt for real CFG); without it none do."""
    args = _tiny_framepack_args(tmp_path)

    def empty_prompts(task, batches: int) -> int:
        empty = task.text.encode("")
        stream, count = task.batches(4, seed=0), 0
        for _ in range(batches):
            batch = next(stream)
            for i in range(batch.text.shape[0]):
                n = int(batch.mask[i].sum())
                count += n == int(empty.mask.sum()) and torch.equal(batch.text[i, :n], empty.states[0, empty.mask[0]])
        return count

    assert empty_prompts(trainer.TASKS["framepack"](args), 5) == 0
    assert 0 < empty_prompts(trainer.TASKS["framepack"]({**args, "text_dropout": 0.5}), 5) < 20
    with pytest.raises(ValueError, match="text_dropout"):
        trainer.TASKS["framepack"]({**args, "text_dropout": 1.0})


def test_text_encoders_learn_to_read_the_captions(tmp_path):
    """Trained on the world's captions, the demo encoders name the motion (and every other field) of
    held-out scenes far better than their random start, and the trained weights are what loads."""
    from framepack.components import HunyuanTextEncoder
    from framepack.train.framepack_task import world_vocabulary
    from framepack.train.text_encoder import train_text_encoders, write_text_encoders

    root = write_text_encoders(tmp_path, text_dim=32, pooled_dim=16, extra_words=world_vocabulary(500))
    before = HunyuanTextEncoder.from_pretrained(root).encode("a red circle moves up on a plain blue background")
    untrained = train_text_encoders(root, steps=0, eval_scenes=128)  # the heads alone, at their random start
    accuracy = train_text_encoders(root, steps=120, lr=3e-3, eval_scenes=128)
    # 11 motions (chance under 0.2): the states the transformer reads name the motion almost always,
    # CLIP's 16-wide pooled output at this short schedule most of the time; every field improves
    assert accuracy["llama_motion"] >= 0.9 and accuracy["clip_motion"] >= 0.6, accuracy
    assert all(accuracy[k] >= untrained[k] + 0.2 for k in accuracy), (untrained, accuracy)
    after = HunyuanTextEncoder.from_pretrained(root).encode("a red circle moves up on a plain blue background")
    assert not torch.allclose(before.pooled, after.pooled)
    assert json.loads((root / "training.json").read_text())["held_out_accuracy"] == accuracy


def test_object_cells_follow_the_causal_latent_grouping():
    """A single covered pixel marks the cell above it in the latent that holds its frame (latent 0
    = frame 0 alone, latent k = frames 4k-3..4k), and with grow=1 that cell's 3x3 neighbourhood."""
    from framepack.train.framepack_task import object_cells

    for frame, latent in ((0, 0), (1, 1), (4, 1), (5, 2), (8, 2)):
        coverage = np.zeros((9, 32, 48), dtype=np.float32)
        coverage[frame, 17, 41] = 0.3  # cell (2, 5)
        exact = object_cells(coverage, grow=0)
        assert exact.shape == (3, 4, 6)
        assert exact.nonzero().tolist() == [[latent, 2, 5]], frame
        grown = object_cells(coverage)
        assert grown.sum() == 6 and grown[latent, 1:4, 4:6].all()  # 3x3 clipped at the right edge


def test_object_cells_of_a_world_clip_are_where_it_renders_the_object():
    from framepack.train import world
    from framepack.train.framepack_task import object_cells

    p = world.WorldParams(shape="square", color="red", background="plain", background_color="blue", motion="right",
                          speed=12.0, x=0.3, y=0.5, size=0.12)
    coverage = world.object_coverage(p, 33, size=64)
    frames = world.render(p, 33, size=64)
    red = world.colour_mask(frames, world.PALETTE["red"])
    assert red.any(axis=(1, 2)).all() and not (red & (coverage == 0)).any()  # the renderer draws the object there
    cells = object_cells(coverage, grow=0)
    pixel_cells = torch.from_numpy((coverage > 0).reshape(33, 8, 8, 8, 8).any(axis=(2, 4)))  # (frame, cell row, cell col)
    assert torch.equal(cells[0], pixel_cells[0])
    assert torch.equal(cells[1:], pixel_cells[1:].reshape(8, 4, 8, 8).any(dim=1))
    assert cells[-1].nonzero()[:, 1].float().mean() > cells[0].nonzero()[:, 1].float().mean()  # it moved right


def test_weighted_mse():
    from framepack.train.framepack_task import weighted_mse

    prediction, target = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    plain = torch.nn.functional.mse_loss(prediction, target)
    assert torch.allclose(weighted_mse(prediction, target, None), plain)
    assert torch.allclose(weighted_mse(prediction, target, torch.full((2, 1, 4, 5, 6), 7.0)), plain)
    weight = torch.zeros(2, 1, 4, 5, 6)
    weight[1, :, 2] = 1.0  # only sample 1's third latent counts
    assert torch.allclose(weighted_mse(prediction, target, weight), (prediction[1, :, 2] - target[1, :, 2]).pow(2).mean())


def test_object_weight_marks_the_object_in_each_batch(tmp_path):
    args = _tiny_framepack_args(tmp_path)
    assert next(trainer.TASKS["framepack"](args).batches(4, seed=0)).weight is None
    task = trainer.TASKS["framepack"]({**args, "object_weight": 4.0, "size": 64})  # 8x8 latent cells
    batch = next(task.batches(4, seed=0))
    b, _, t, h, w = batch.target.shape
    assert batch.weight.shape == (b, 1, t, h, w)
    assert set(batch.weight.unique().tolist()) == {1.0, 5.0}
    assert 0 < float((batch.weight > 1).float().mean()) < 0.9  # the object and its neighbours, not the frame
    assert torch.isfinite(task.loss(task.model, batch))
    with pytest.raises(ValueError, match="object_weight"):
        trainer.TASKS["framepack"]({**args, "object_weight": -1})


def test_motion_weights_draw_clips_of_those_motions(tmp_path):
    """Weights of 0 for every motion but "stay" leave only still clips, from fresh renders and from
    the latent cache alike; the draw probabilities are the normalised weights; bad weights fail."""
    from framepack.train import world
    from framepack.train.framepack_task import motion_probabilities

    only_stay = {m: 0.0 for m in world.MOTIONS if m != "stay"}
    args = {**_tiny_framepack_args(tmp_path), "motion_weights": only_stay}
    cached = {**args, "clips": 40, "cache": str(tmp_path / "cache.safetensors")}
    for task_args in (args, cached):
        task = trainer.TASKS["framepack"](task_args)
        captions = [caption for _, (_, _, caption) in zip(range(12), task._clips(np.random.default_rng(0), 0))]
        assert all(" stays still on " in c for c in captions), captions
    assert motion_probabilities(["stay", "left", "stay", "grow"], {"stay": 3.0}).tolist() == [0.375, 0.125, 0.375, 0.125]
    for bad, message in (({"fly": 2.0}, "unknown motions"), ({"stay": -1.0}, ">= 0"),
                         ({m: 0.0 for m in world.MOTIONS}, "no clip")):
        with pytest.raises(ValueError, match=message):
            trainer.TASKS["framepack"]({**args, "motion_weights": bad})


def test_object_region_start_weights_the_start_frames_cells_only(tmp_path):
    """With object_region "start" the weight is the same in every latent of a sample (a function of
    the start frame, which the context holds), and it marks where the object starts; the default
    ("clip") follows a moving object from latent to latent."""
    from framepack.train import world
    from framepack.train.framepack_task import object_cells

    args = {**_tiny_framepack_args(tmp_path), "object_weight": 4.0, "size": 64}
    p = world.WorldParams(shape="square", color="red", background="plain", background_color="blue", motion="right",
                          speed=12.0, x=0.2, y=0.5, size=0.1)
    clip = trainer.TASKS["framepack"](args)._cells(p, 0)[0, 0]
    start = trainer.TASKS["framepack"]({**args, "object_region": "start"})._cells(p, 0)[0, 0]
    assert torch.equal(start[0], clip[0]) and torch.equal(start[0], object_cells(world.object_coverage(p, 1, size=64))[0])
    assert all(torch.equal(start[k], start[0]) for k in range(len(start)))
    assert not torch.equal(clip[-1], clip[0])  # the object moved right: its cells did too
    with pytest.raises(ValueError, match="object_region"):
        trainer.TASKS["framepack"]({**args, "object_region": "target"})


def test_mirror_adds_each_cached_clips_reflection(tmp_path):
    """With ``mirror`` the clips drawn are the cached clips and their mirrors (encoded into a cache
    file of their own, as encoding the mirror scene afresh gives); fresh renders are mirrored
    about half the time; the plain cache is left as it was."""
    from framepack.train import world

    args = {**_tiny_framepack_args(tmp_path), "clips": 6, "cache": str(tmp_path / "cache.safetensors")}
    plain = trainer.TASKS["framepack"](args)
    latents, captions = plain._load_or_build_cache()
    task = trainer.TASKS["framepack"]({**args, "mirror": True})
    mirrored = task._mirror_scenes()
    expected = [world.mirror(p) for p in itertools.islice(world.stream(0), 6)]
    assert [m for m, _ in mirrored] == [m for m in expected if m is not None and not world.is_held_out(m)]
    assert task._mirror_scenes(list(task._cache_scenes())) == mirrored
    drawn = {caption for _, (_, _, caption) in zip(range(200), task._clips(np.random.default_rng(0), 0))}
    assert drawn == set(captions) | {world.caption(m) for m, _ in mirrored}
    more, more_captions = task._load_or_build_cache(task._mirror_cache_path(), mirrored)
    assert more_captions == [world.caption(m) for m, _ in mirrored]
    torch.testing.assert_close(more[:1].float(), task._encode_clip(mirrored[0][0], 0), atol=2e-3, rtol=2e-3)
    assert torch.equal(plain._load_or_build_cache()[0], latents)

    fresh = trainer.TASKS["framepack"]({**_tiny_framepack_args(tmp_path), "mirror": True})
    flipped = 0
    for p, (clip, _, caption) in zip(itertools.islice(world.stream(0), 40), fresh._clips(np.random.default_rng(0), 0)):
        m = world.mirror(p)
        if not torch.equal(clip, fresh._encode_clip(p, 0)):
            assert torch.equal(clip, fresh._encode_clip(m, 0)) and caption == world.caption(m)
            flipped += 1
    assert 8 <= flipped <= 32  # about half of the 40 (rotations and held-out mirrors excepted)
