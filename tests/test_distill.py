"""The few-step student (issue 18.4): the "distill" task's target is the teacher's guided sample,
the line it trains on takes the few-step samplers to that sample, and the task runs, stops,
resumes (pairs and training) and exports a student that packages with its own defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _tiny_framepack_args

from framepack import trainer
from framepack.components import resolve_model
from framepack.sampling import TIMESTEP_SCALE, sample_euler, sample_unipc, sigma_schedule
from framepack.train import distill_task, package
from framepack.train.framepack_task import FramePackTask

TEACHER_CFG = 3.0


def _tiny_teacher(root: Path) -> Path:
    """A packaged model directory with a random tiny transformer (1 + 1 blocks, 32 px)."""
    args = _tiny_framepack_args(root)
    transformer = root / "teacher-transformer"
    FramePackTask(args).model.save_pretrained(transformer)
    return package.assemble(root / "teacher", transformer, Path(args["vae"]), Path(args["text"]), resolution=32,
                            cfg=TEACHER_CFG)


def _task_args(root: Path, teacher: Path, **more) -> dict:
    return {"teacher": str(teacher), "teacher_steps": 6, "student_steps": [2, 4], "pairs": 4, "pair_batch": 2,
            "pairs_dir": str(root / "pairs"), "sections": 2, "size": 32, **more}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _tiny_teacher(tmp_path_factory.mktemp("distill"))


def _reference_sample(model, pair: distill_task.PairBatch, negative, cfg: float, sigmas: torch.Tensor) -> torch.Tensor:
    """The teacher's guided sample for one pair, written out independently of the task: separate
    conditional and unconditional forwards, CFG by hand, x0 = x - sigma v, UniPC."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            def v(states, mask, pooled):
                return model(x, sigma * TIMESTEP_SCALE, states, mask, pooled, None, pair.window, pair.history).float()
            positive = v(pair.text, pair.mask, pair.pooled)
            negative_v = v(negative.states, negative.mask, negative.pooled)
        return x - sigma.view(-1, 1, 1, 1, 1) * (negative_v + cfg * (positive - negative_v))

    return sample_unipc(denoise, pair.noise, sigmas)


def test_pairs_hold_the_teachers_guided_samples(tmp_path, teacher):
    """Each pair's sample is the teacher's own guided UniPC sample from the pair's noise and
    context (computed here without the task's batched CFG), and guidance changed it."""
    task = distill_task.DistillTask(_task_args(tmp_path, teacher))
    task.make_pairs()
    negative = task.data._embed("")
    sigmas = sigma_schedule(6, shift=resolve_model(str(teacher)).shift(None))
    for chunk in range(task.chunks()):
        pairs = task.store.load(chunk)
        assert pairs.noise.shape == pairs.sample.shape and len(pairs.noise) == 2
        for j in range(2):
            pair = distill_task.take(pairs, j)
            guided = _reference_sample(task.teacher, pair, negative, TEACHER_CFG, sigmas)
            torch.testing.assert_close(pair.sample, guided, atol=1e-4, rtol=1e-4)
            plain = _reference_sample(task.teacher, pair, negative, 1.0, sigmas)
            assert (plain - guided).abs().max() > 1e-3  # so the comparison above can tell cfg 3 from cfg 1


def test_guidance_target_is_the_teachers_guided_velocity(tmp_path, teacher):
    """objective "guidance": the student's target is the teacher's guided velocity, computed here
    with separate conditional and unconditional forwards, on the data task's noised clips; it
    makes no pairs, and a training step runs through the trainer."""
    args = _task_args(tmp_path, teacher, objective="guidance")
    task = distill_task.DistillTask(args)
    batch = next(task.batches(2, seed=0))
    sigma = torch.tensor([0.9, 0.5])
    x, _ = distill_task.reflow_input(torch.randn_like(batch.target), batch.target, sigma)
    target = task.guidance_target(batch, x, sigma)
    negative = task.data._embed("")
    for i in range(2):
        pair = distill_task.PairBatch(x[i : i + 1], batch.target[i : i + 1], batch.window[i : i + 1],
                                      [type(h)(h.kernel, h.latents[i : i + 1], h.indices[i : i + 1]) for h in batch.history],
                                      batch.text[i : i + 1], batch.mask[i : i + 1], batch.pooled[i : i + 1])
        with torch.no_grad():
            def v(states, mask, pooled, i=i, pair=pair):
                return task.teacher(pair.noise, sigma[i : i + 1] * TIMESTEP_SCALE, states, mask, pooled, None,
                                    pair.window, pair.history)
            positive, unconditional = v(pair.text, pair.mask, pair.pooled), v(negative.states, negative.mask, negative.pooled)
        torch.testing.assert_close(target[i : i + 1], unconditional + TEACHER_CFG * (positive - unconditional),
                                   atol=1e-4, rtol=1e-4)
        assert (target[i : i + 1] - positive).abs().max() > 1e-3  # guided, not the plain conditional velocity
    config = trainer.TrainConfig(task="distill", output_dir=str(tmp_path / "run"), steps=1, batch_size=2,
                                 task_args=args)
    trainer.train(config)
    assert (tmp_path / "run" / "final" / "distill.json").exists() and not list((tmp_path / "pairs").glob("chunk-*"))


def test_the_training_line_takes_the_samplers_to_the_teachers_sample():
    """A student exact on its training line (x0 = the teacher's sample, velocity noise - sample)
    makes Euler and UniPC return the teacher's sample from the same noise at every trained step
    count, and those samplers query the denoiser only at the task's training sigmas."""
    torch.manual_seed(0)
    noise, sample = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    shift = 3.0
    steps = (2, 4, 8)
    trained = distill_task.student_sigmas(steps, shift)
    for n in steps:
        for sampler in (sample_euler, sample_unipc):
            queried: list[float] = []

            def oracle(x: torch.Tensor, sigma: torch.Tensor, queried: list[float] = queried) -> torch.Tensor:
                queried.append(float(sigma[0]))
                on_line, velocity = distill_task.reflow_input(noise, sample, sigma)
                torch.testing.assert_close(x, on_line)  # the sampler stays on the line the student trains on
                return x - sigma.view(-1, 1, 1, 1, 1) * velocity

            out = sampler(oracle, noise.clone(), sigma_schedule(n, shift=shift))
            torch.testing.assert_close(out, sample, atol=1e-5, rtol=1e-5)
            assert len(queried) == n and all(torch.isclose(trained, torch.tensor(q)).any() for q in queried)
    assert len(trained) == len({round(float(s), 6) for n in steps for s in sigma_schedule(n, shift=shift)[:-1]})


def test_distill_runs_stops_resumes_and_exports(tmp_path, teacher):
    """Through the trainer: the student starts as the teacher, pairs are made once (a lost chunk
    is made again, the same), a stop at step 1 resumes to the end, and the export records its
    steps and packages as a model that runs at cfg 1."""
    args = _task_args(tmp_path, teacher)
    config = trainer.TrainConfig(task="distill", output_dir=str(tmp_path / "run"), steps=2, batch_size=2, lr=1e-3,
                                 warmup=1, checkpoint_every=1, task_args=args)
    trainer.train(config, max_steps_this_run=1)
    out = Path(config.output_dir)
    assert trainer.latest_checkpoint(out).name == "checkpoint-1" and not (out / "final").exists()
    store = distill_task.DistillTask(args).store
    first, kept = store.load(1), store.path(0).stat().st_mtime_ns
    store.path(1).unlink()  # as if the run had stopped while making it
    trainer.train(config)  # makes chunk 1 again, resumes at step 1 and finishes
    assert store.path(0).stat().st_mtime_ns == kept
    again = store.load(1)
    assert torch.equal(again.noise, first.noise) and torch.equal(again.sample, first.sample)
    assert [json.loads(line)["step"] for line in (out / "loss.log").read_text().splitlines()] == [1, 2]

    from framepack import FramePackTransformer

    student = FramePackTransformer.from_pretrained(out / "final")
    start = FramePackTransformer.from_pretrained(resolve_model(str(teacher)).transformer)
    assert student.config == start.config
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), start.parameters()))  # it trained
    assert json.loads((out / "final" / "distill.json").read_text())["steps"] == 2

    model = resolve_model(str(distill_task.package_student(out, tmp_path / "student")))
    assert model.cfg(None) == 1.0  # the student runs without CFG by default
    assert model.extra["resolution"] == 32 and (Path(model.vae) / "config.json").read_text() == (
        Path(resolve_model(str(teacher)).vae) / "config.json").read_text()  # the rest is the teacher's
    with pytest.raises(ValueError, match="no finished student"):
        distill_task.package_student(tmp_path, tmp_path / "nothing")

    # as the package ships it: fp16 weights, the teacher's encoders shared by relative paths, its card
    card = tmp_path / "card.md"
    card.write_text("# the student\n")
    shipped = distill_task.package_student(out, teacher.parent / "student-shared", half=True, share=teacher, card=card,
                                           forward_up_to=10)
    manifest = json.loads((shipped / "framepack.json").read_text())
    assert "forward_up_to" not in json.loads((tmp_path / "student" / "framepack.json").read_text())
    assert manifest["steps"] == 2 and manifest["cache"] == "none" and manifest["distilled_from"]["teacher_cfg"] == TEACHER_CFG
    assert manifest["vae"] == "../teacher/vae" and manifest["hunyuan"] == "../teacher/text"
    assert not (shipped / "vae").exists() and not (shipped / "text").exists()
    source, teacher_source = resolve_model(str(shipped)), resolve_model(str(teacher))
    assert (source.vae, source.hunyuan, source.text_embeddings) == (
        teacher_source.vae, teacher_source.hunyuan, teacher_source.text_embeddings)
    assert source.steps(None) == 2 and source.steps(7) == 7 and teacher_source.steps(None) == 25
    assert source.forward_up_to == 10 and source.sampling_mode(None, 5, plain=True) == "forward"
    assert (shipped / "MODEL_CARD.md").read_text() == "# the student\n"
    from safetensors import safe_open

    with safe_open(shipped / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    # a task that starts from fp16-stored weights trains in fp32 (fp16 AdamW went NaN from step 1)
    again = distill_task.DistillTask(_task_args(tmp_path / "again", shipped))
    assert {p.dtype for p in again.model.parameters()} == {torch.float32}


def test_share_encoders_refuses_parts_that_differ(tmp_path, teacher):
    """Two models share encoders only when the parts are byte-identical: a changed VAE is refused,
    and the model keeps its own copies."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    config = other / "vae" / "config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ValueError, match="differs from"):
        package.share_encoders(other, teacher)
    assert (other / "vae").is_dir() and json.loads((other / "framepack.json").read_text())["vae"] == "vae"


def test_distill_refuses_mixed_pairs_and_teacher_fields(tmp_path, teacher):
    """Pairs made with another recipe are not mixed in; fields that describe the teacher are its
    own. One-line errors, also through the module's entry point (exit 2, no traceback)."""
    store = distill_task.DistillTask(_task_args(tmp_path, teacher)).store
    store.check()
    with pytest.raises(ValueError, match="another teacher or recipe"):
        distill_task.DistillTask(_task_args(tmp_path, teacher, teacher_cfg=5.0)).store.check()
    # the teacher computes in fp32 whatever its stored dtype; pairs recorded as made in fp16 are refused
    recipe = json.loads((store.directory / "pairs.json").read_text())
    assert recipe["teacher_dtype"] == "torch.float32"
    (store.directory / "pairs.json").write_text(json.dumps({**recipe, "teacher_dtype": "torch.float16"}))
    with pytest.raises(ValueError, match="another teacher or recipe"):
        distill_task.DistillTask(_task_args(tmp_path, teacher)).store.check()
    with pytest.raises(ValueError, match="come from the teacher"):
        distill_task.DistillTask(_task_args(tmp_path, teacher, vae="elsewhere"))
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"task": "distill", "output_dir": str(tmp_path / "x"), "steps": 1,
                                  "task_args": {"pairs": 1}}))
    run = subprocess.run([sys.executable, "-m", "framepack.train.distill_task", str(config)], check=False,
                         capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "needs 'teacher'" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("name", ["demo_student", "gen2_student", "gen2_student3", "gen2_student4", "gen2_student5"])
def test_student_configs_load_and_build(tmp_path, teacher, name):
    """configs/NAME.json loads as `framepack train` loads it, and its task builds (teacher swapped
    for the tiny one, 32 px): the options are ones the task accepts, pairs are kept per config."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.json"
    config = trainer.TrainConfig.load(path)
    args = {**config.task_args, "teacher": str(teacher), "size": 32, "clips": 2,
            "cache": str(tmp_path / "clips.safetensors"), "pairs_dir": str(tmp_path / "pairs")}
    task = trainer.TASKS[config.task](args)
    assert config.task == "distill" and task.teacher_cfg == TEACHER_CFG and task.teacher_steps == 25
    # the fifth student distils the teacher fine-tuned on the determined world, on that world
    world_start = "determined" if name == "gen2_student5" else "independent"
    assert min(task.student_steps) <= 8 and task.data.world_start == config.task_args["world_start"] == world_start
    assert config.task_args["pairs_dir"] != config.task_args["cache"]


def test_a_models_own_steps_are_the_default_everywhere(tmp_path, teacher):
    """A few-step student is run at its steps unless told otherwise: by generate (CLI settings), the
    demo and the yardstick; a model without "steps" keeps 25; an explicit count wins."""
    import shutil

    from framepack.cli import _complete_settings
    from framepack.demo import demo_settings
    from framepack.train.evaluate import YardstickConfig, _as_run

    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    package.update_manifest(student, {"steps": 3, "cfg": 1.0})
    for model, steps in ((student, 3), (teacher, 25)):
        assert _complete_settings({"prompt": "a red square", "model": str(model)}).steps == steps
        assert _complete_settings({"prompt": "a red square", "model": str(model), "steps": 9}).steps == 9
        assert demo_settings(model=str(model)).steps == steps and demo_settings(model=str(model), steps=9).steps == 9
        ran = _as_run(YardstickConfig(model=str(model)), resolve_model(str(model)))
        assert (ran.steps, ran.cfg) == (steps, 1.0 if model == student else TEACHER_CFG)
        assert _as_run(YardstickConfig(model=str(model), steps=9), resolve_model(str(model))).steps == 9
