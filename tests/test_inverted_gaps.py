"""Inverted sections' blank gap: the released layout, or the true distance from the start frame
(capped) for a model trained that way (``TransformerConfig.max_inverted_padding``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from framepack.config import TransformerConfig, preset
from framepack.planning import START, ZERO, inverted_paddings, plan_sections


@given(st.integers(1, 30), st.integers(1, 12))
@hsettings(deadline=None)
def test_uncapped_gaps_put_every_latent_at_its_place_in_the_video(sections, window):
    """With the true distance, RoPE time is video time: each section's window and every future
    latent it reads sit at their video positions (index 0 is the start frame). The released layout
    breaks this past 4 sections (that is its point: distances stay within its training)."""
    for plan in plan_sections(sections, "inverted", window=window, max_padding=sections):
        assert plan.window_indices == plan.positions
        for level in plan.levels:
            for source, index in zip(level.sources, level.indices):
                if source == START:
                    assert index == 0
                elif source != ZERO:
                    assert index == source


@given(st.integers(1, 40), st.integers(0, 40))
def test_a_cap_holds_each_gap_at_the_distance_or_the_cap(sections, cap):
    distances = list(reversed(range(sections)))  # generation order: the last section first
    assert inverted_paddings(sections, cap) == [min(d, cap) for d in distances]
    plans = plan_sections(sections, "inverted", window=9, max_padding=cap)
    assert [p.window_indices[0] for p in plans] == [1 + 9 * min(d, cap) for d in distances]


@pytest.mark.parametrize("sections", [1, 2, 3, 4])
def test_up_to_four_sections_the_released_layout_is_already_the_true_distance(sections):
    assert plan_sections(sections, "inverted", max_padding=3) == plan_sections(sections, "inverted")


def test_the_released_layout_stays_the_default():
    assert inverted_paddings(7) == [3, 2, 2, 2, 2, 1, 0]
    assert TransformerConfig().max_inverted_padding is None


def test_causal_modes_have_no_gap_to_set():
    for mode in ("forward", "vanilla"):
        assert plan_sections(6, mode, max_padding=2) == plan_sections(6, mode)


def test_the_gap_rule_is_not_part_of_the_architecture():
    tiny = preset("tiny")
    assert tiny.replace(max_inverted_padding=3).same_architecture(tiny)
    assert tiny.same_architecture(tiny.replace(max_inverted_padding=9))
    assert not tiny.same_architecture(tiny.replace(num_single_layers=2))
    assert not tiny.replace(max_inverted_padding=3).same_architecture(tiny.replace(num_single_layers=2))


def test_a_negative_cap_is_refused():
    with pytest.raises(ValueError, match="max_padding must be >= 0"):
        plan_sections(3, "inverted", max_padding=-1)


def test_the_config_carries_the_cap_through_config_json(tmp_path):
    config = TransformerConfig(max_inverted_padding=11)
    config.save(tmp_path / "config.json")
    assert TransformerConfig.from_file(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["max_inverted_padding"] == 11


@pytest.mark.parametrize("value", [-1, 2.5, "11", True])
def test_a_bad_cap_in_a_config_is_named(value):
    with pytest.raises(ValueError, match="max_inverted_padding must be null or an integer >= 0"):
        TransformerConfig(max_inverted_padding=value)


# ---- training and inference read the same rule --------------------------------------------------------


def _window_starts(task, batches: int) -> set[int]:
    stream = task.batches(4, seed=0)
    return {int(next(stream).window[i, 0]) for _ in range(batches) for i in range(4)}


def test_training_lays_out_the_true_distance_when_the_config_says_so(tmp_path):
    """Six-section clips, every length from 1 to 6 sections: with the cap the task trains gaps of
    up to 5 windows; with the released layout never more than 3."""
    from framepack import trainer
    from test_train import _tiny_framepack_args

    args = {**_tiny_framepack_args(tmp_path), "sections": 6, "vary_sections": True, "modes": ["inverted"]}
    capped = _window_starts(trainer.TASKS["framepack"]({**args, "config": {**args["config"],
                                                                           "max_inverted_padding": 5}}), 40)
    released = _window_starts(trainer.TASKS["framepack"](args), 40)
    assert capped == {1 + 9 * k for k in range(6)}
    assert released == {1 + 9 * k for k in range(4)}


def test_a_fine_tune_may_change_the_rule_and_exports_it(tmp_path):
    from framepack import trainer
    from framepack.model import FramePackTransformer
    from test_train import _tiny_framepack_args

    args = _tiny_framepack_args(tmp_path)
    base = trainer.TASKS["framepack"](args)
    base.export(base.model, tmp_path / "base")
    tuned = trainer.TASKS["framepack"]({**args, "init": str(tmp_path / "base"),
                                        "config": {**args["config"], "max_inverted_padding": 7}})
    tuned.export(tuned.model, tmp_path / "tuned")
    assert FramePackTransformer.from_pretrained(tmp_path / "tuned").config.max_inverted_padding == 7
    with pytest.raises(ValueError, match="do not match this task's transformer config"):
        trainer.TASKS["framepack"]({**args, "init": str(tmp_path / "base"),
                                    "config": {**args["config"], "num_single_layers": 2}})


def test_a_models_jobs_are_planned_with_its_rule(tmp_path):
    """Planned from the model directory's config alone (framepack.redo, the web app) and by the
    loaded pipeline alike, and a job runs to the end with it."""
    import numpy as np

    from framepack.jobs import JobDir
    from framepack.pipeline import FramePackPipeline
    from framepack.redo import model_plans
    from framepack.settings import GenerationSettings
    from framepack.video import read_frames
    from test_generate import write_image
    from tiny_hub import write_model_dir

    root, paths = write_model_dir(tmp_path / "model", mode="inverted")
    config_file = Path(paths["framepack"]) / "config.json"
    data = json.loads(config_file.read_text())
    image = write_image(tmp_path / "start.png")
    settings = GenerationSettings(image=str(image), prompt="a red circle", model=str(root), seconds=6.0, steps=1,
                                  resolution=64, seed=3)
    assert [p.padding for p in model_plans(settings)[0]] == [3, 2, 2, 1, 0]  # released: 5 sections
    config_file.write_text(json.dumps({**data, "max_inverted_padding": 10}))
    plans = model_plans(settings)[0]
    assert [p.padding for p in plans] == [4, 3, 2, 1, 0]
    pipeline = FramePackPipeline.from_model(str(root))
    assert pipeline.plans(settings) == plans
    job = JobDir.create(tmp_path / "job", settings, tmp_path / "v.mp4")
    pipeline.run(job)
    assert np.asarray(read_frames(job.out)).shape[0] == 1 + 4 * 9 * 5


def test_packaging_sets_the_cap_and_leaves_the_weights(tmp_path):
    """``package.assemble(max_inverted_padding=...)`` (the flag of ``python -m framepack.train.package``
    and ``distill_task --package``) writes the rule into the packaged transformer's config.json,
    which the planner then reads; the weights are the run's, byte for byte; a bad cap is named."""
    from framepack.redo import model_plans
    from framepack.settings import GenerationSettings
    from framepack.train import package
    from test_distill import _tiny_teacher
    from test_generate import write_image

    teacher = _tiny_teacher(tmp_path)
    weights = sorted((teacher / "transformer").glob("*.safetensors"))
    capped = package.assemble(tmp_path / "capped", teacher / "transformer", teacher / "vae", teacher / "text",
                              resolution=32, max_inverted_padding=3)
    assert [p.read_bytes() for p in sorted((capped / "transformer").glob("*.safetensors"))] == \
        [p.read_bytes() for p in weights]
    settings = GenerationSettings(image=str(write_image(tmp_path / "start.png")), prompt="a red circle",
                                  model=str(capped), seconds=8.4, steps=1, resolution=64, seed=3)
    gaps = [p.padding for p in model_plans(settings)[0]]
    assert len(gaps) == 7 and gaps == [3, 3, 3, 3, 2, 1, 0]  # released: [3, 2, 2, 2, 2, 1, 0]
    assert [p.padding for p in model_plans(settings.replace(model=str(teacher)))[0]] == [3, 2, 2, 2, 2, 1, 0]
    # a student copies its teacher's config: "none" packages it with the released layout, the default keeps the rule
    released = package.assemble(tmp_path / "released", capped / "transformer", teacher / "vae", teacher / "text",
                                resolution=32, max_inverted_padding=package.gap_cap("none"))
    kept = package.assemble(tmp_path / "kept", capped / "transformer", teacher / "vae", teacher / "text", resolution=32)
    assert [p.padding for p in model_plans(settings.replace(model=str(released)))[0]] == [3, 2, 2, 2, 2, 1, 0]
    assert [p.padding for p in model_plans(settings.replace(model=str(kept)))[0]] == gaps
    with pytest.raises(ValueError, match="max_inverted_padding"):
        package.assemble(tmp_path / "bad", teacher / "transformer", teacher / "vae", teacher / "text",
                         resolution=32, max_inverted_padding=-1)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()
