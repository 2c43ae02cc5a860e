"""The ``framepack`` command line. Thin: parses arguments, calls the library, reports progress.

Every user error ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# ---- argument types --------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---- demo ------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import SectionStat, context_tokens, demo_settings, format_report
    from .video import read_frames

    settings = demo_settings(seconds=args.seconds, steps=args.steps, seed=args.seed, model=args.model)
    pipeline = _open_pipeline(settings.model, args)
    out = Path(args.out) if args.out else Path("outputs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    job = _new_job(settings, out, None)
    plans = pipeline.plans(settings)
    finished, total = _run_with_progress(pipeline, job)
    h, w = job.load_latents(0).shape[-2:]  # the latent size the run used
    stats = [SectionStat(e.step + 1, e.count, context_tokens(plans[e.step], h, w), e.seconds) for e in finished]
    print(format_report(stats, total, len(read_frames(job.out)), job.out))
    return 0


# ---- generate --------------------------------------------------------------------------------------------

# CLI option -> GenerationSettings field, for --from and overrides
_SETTING_FLAGS = {
    "image": "image", "end_image": "end_image", "prompt": "prompt", "section_prompt": "section_prompts",
    "negative_prompt": "negative_prompt", "seconds": "seconds", "seed": "seed", "steps": "steps",
    "sampler": "sampler", "distilled_guidance": "distilled_guidance", "cfg": "cfg",
    "guidance_rescale": "guidance_rescale", "shift": "shift", "mode": "mode", "resolution": "resolution",
    "window": "window", "crf": "crf", "model": "model",
}


def _settings_from_args(args: argparse.Namespace):
    from .settings import GenerationSettings

    base: dict = {}
    if args.from_video:
        from .video import read_metadata

        meta = read_metadata(args.from_video)
        if "framepack" not in meta:
            raise ValueError(f"{args.from_video} carries no framepack settings")
        base = dict(meta["framepack"])
    for flag, field in _SETTING_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            base[field] = tuple(value) if field == "section_prompts" else value
    for required in ("image", "prompt"):
        if not base.get(required):
            raise ValueError(f"--{required} is required (or --from a framepack video)")
    base.setdefault("model", _default_model())
    return GenerationSettings.from_dict(base)


def _default_model() -> str:
    import torch

    # the embedded demo model wherever no CUDA GPU is present
    return "framepack-i2v" if torch.cuda.is_available() else "tiny"


def _device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return device, dtype


def _generate(args: argparse.Namespace) -> int:
    from .images import load_image
    from .jobs import JobDir

    if args.resume:
        job = JobDir.open(Path(args.resume))
        settings = job.settings
    else:
        settings = _settings_from_args(args)
        load_image(settings.image)  # fail on a bad image before anything is loaded or written
        if settings.end_image:
            load_image(settings.end_image)
    pipeline = _open_pipeline(settings.model, args)
    if not args.resume:
        out = Path(args.out) if args.out else Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{settings.seed}.mp4"
        job = _new_job(settings, out, Path(args.job_dir) if args.job_dir else None)
    _run_with_progress(pipeline, job)
    print(job.out)
    return 0


def _open_pipeline(model: str, args: argparse.Namespace):
    from .components import resolve_model
    from .memory import tune_allocator
    from .pipeline import FramePackPipeline

    device, dtype = _device_and_dtype(args)
    tune_allocator()  # flat peak memory over long videos (see framepack.memory)
    resolve_model(model)  # an unknown model fails here, before anything is loaded
    pipeline = FramePackPipeline.from_model(model, device=device, dtype=dtype, vae_tiling=getattr(args, "vae_tiling", False))
    print(f"framepack: model {model} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return pipeline


def _new_job(settings, out: Path, job_dir: Path | None):
    from .jobs import JobDir

    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must name an .mp4 file, got {out}")
    job = JobDir.create(job_dir or out.with_name(out.stem + ".job"), settings, out)
    print(f"framepack: job directory {job.root} (resume with: framepack generate --resume {job.root})", file=sys.stderr)
    return job


def _run_with_progress(pipeline, job) -> tuple[list, float]:
    """Run the job with a progress bar; returns (SectionFinished events, total seconds)."""
    from tqdm import tqdm

    from .pipeline import Done, SectionFinished, SectionStarted, StepProgress

    plans = pipeline.plans(job.settings)
    finished: list = []
    total = 0.0
    bar = tqdm(total=len(plans) * job.settings.steps, initial=job.finished * job.settings.steps, unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=None)
    try:
        for event in pipeline.events(job):
            if isinstance(event, SectionStarted):
                bar.set_description(f"section {event.step + 1}/{event.count}")
            elif isinstance(event, StepProgress):
                bar.update(1)
                bar.set_postfix_str(f"step {event.i + 1}/{event.n}")
            elif isinstance(event, SectionFinished):
                finished.append(event)
                logging.getLogger("framepack").info("section %d/%d took %.1f s", event.step + 1, event.count, event.seconds)
            elif isinstance(event, Done):
                total = event.seconds
                bar.set_postfix_str(f"done in {event.seconds:.1f} s")
    finally:
        bar.close()
    return finished, total


# ---- eval ----------------------------------------------------------------------------------------------


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .train.evaluate import EvalConfig, format_table, run_eval, save

    config = EvalConfig(model=args.model, prompts=args.prompts, seconds=args.seconds, long_videos=args.long_videos,
                        long_seconds=args.long_seconds, steps=args.steps, cfg=args.cfg, seed=args.seed,
                        workdir=args.workdir, split=args.split)
    pipeline = _open_pipeline(args.model, args)
    total = config.prompts + 2 * config.long_videos
    bar = tqdm(total=total, unit="video", file=sys.stderr, dynamic_ncols=True, disable=None)

    done = itertools.count(1)

    def progress(message: str) -> None:
        bar.update(1)
        n = next(done)
        if bar.disable:  # no terminal (a background run, a log file): a line per video instead of the bar
            print(f"framepack eval: video {n}/{total} {message}", file=sys.stderr, flush=True)
        else:
            logging.getLogger("framepack").info(message)

    try:
        result = run_eval(config, pipeline, progress)
    finally:
        bar.close()
    table = format_table(result)
    if args.json:
        save(result, Path(args.json))
    print(table)
    return 0


# ---- train ----------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from . import trainer
    from .train import framepack_task, vae_task  # noqa: F401  (register the "framepack" and "vae" tasks)

    config = trainer.TrainConfig.load(args.config)
    if args.output_dir:
        config = trainer.TrainConfig(**{**config.__dict__, "output_dir": args.output_dir})
    out = trainer.train(config, max_steps_this_run=args.max_steps)
    print(out)
    return 0


# ---- parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="framepack", description="FramePack: long videos, section by section, on a constant budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", help="make a video with the embedded demo model from the bundled start image "
                                            "and prompt (runs on a CPU in about a minute)")
    demo.add_argument("--seconds", type=_number, default=5.0, help="video length in seconds (default 5)")
    demo.add_argument("--steps", type=_positive, default=25, help="sampling steps per section (default 25)")
    demo.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    demo.add_argument("--model", default="tiny", help="model (default tiny, the embedded demo model)")
    demo.add_argument("--out", help="output .mp4 (default outputs/demo-TIMESTAMP.mp4)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    demo.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                      help="weights dtype (default fp32: the demo model is small)")
    demo.set_defaults(run=_demo)

    gen = commands.add_parser(
        "generate",
        help="make a video from a start image and a prompt",
        description="Generate a video section by section. Every run keeps a job directory; "
        "if it stops, --resume JOB_DIR continues from the last finished section.",
    )
    src = gen.add_argument_group("what to make")
    src.add_argument("--model", help="tiny (the embedded CPU demo model, default without a CUDA GPU), "
                     "framepack-i2v, framepack-f1, or a directory with a framepack.json")
    src.add_argument("--image", help="start image (png, jpg, webp, ...)")
    src.add_argument("--end-image", dest="end_image", help="optional end image (inverted mode only)")
    src.add_argument("--prompt", help="the prompt, or a timeline: '[0s-2s: a cat sits] [2s-5s: the cat jumps]'")
    src.add_argument("--section-prompt", dest="section_prompt", action="append",
                     help="one prompt per section in video order (repeat the option); overrides --prompt's timing")
    src.add_argument("--negative-prompt", dest="negative_prompt", help="negative prompt (used only with --cfg != 1)")
    src.add_argument("--seconds", type=_number, help="video length in seconds (default 5; at most 120)")
    src.add_argument("--seed", type=int, help="random seed (default 31337); the same seed gives the same video")
    samp = gen.add_argument_group("sampling")
    samp.add_argument("--steps", type=int, help="denoising steps per section (default 25)")
    samp.add_argument("--sampler", choices=["unipc", "euler"], help="unipc (default; order-3 UniPC) or euler")
    samp.add_argument("--distilled-guidance", dest="distilled_guidance", type=_number,
                      help="distilled guidance scale fed to the model (default 10)")
    samp.add_argument("--cfg", type=_number, help="real classifier-free guidance scale; 1 = off (default: the "
                                                   "model's own: off for the 13B models, 4 for the demo model)")
    samp.add_argument("--guidance-rescale", dest="guidance_rescale", type=_number,
                      help="guidance rescale in [0, 1] for real CFG (default 0)")
    samp.add_argument("--shift", type=_number, help="sigma shift; default: the model's own (3 for tiny), else from the token count (7 at 640)")
    samp.add_argument("--mode", choices=["inverted", "forward", "vanilla"],
                      help="section order: inverted anti-drifting (I2V models), forward (F1) or vanilla; "
                      "default: the model's own")
    samp.add_argument("--window", type=int, help="latent frames per section (default 9 = 33 video frames)")
    out = gen.add_argument_group("output")
    out.add_argument("--resolution", type=int, help="target resolution bucket (default: the model's own, 640 for the 13B models, 128 for tiny)")
    out.add_argument("--crf", type=int, help="H.264 quality, 0 (lossless) .. 51; default 16")
    out.add_argument("--out", help="output mp4 (default outputs/<time>-seed<seed>.mp4)")
    out.add_argument("--job-dir", dest="job_dir", help="job directory (default <out>.job next to the video)")
    run = gen.add_argument_group("running")
    run.add_argument("--resume", metavar="JOB_DIR", help="continue an interrupted job from its last finished section")
    run.add_argument("--from", dest="from_video", metavar="VIDEO.mp4",
                     help="repeat the settings embedded in a framepack video (other options override them)")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="weights dtype; auto = bf16 on CUDA, fp32 on CPU")
    run.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="decode the VAE in tiles (less memory)")
    gen.set_defaults(run=_generate)

    ev = commands.add_parser("eval", help="evaluate a model on held-out scenes of the synthetic world "
                                          "(motion direction, persistence, drift)")
    ev.add_argument("--model", default="tiny", help="model (default tiny, the embedded demo model)")
    ev.add_argument("--prompts", type=_positive, default=50, help="held-out prompts for motion direction (default 50)")
    ev.add_argument("--seconds", type=_number, default=2.0, help="length of each direction video (default 2)")
    ev.add_argument("--long-videos", type=int, default=6, help="long videos for persistence and drift (default 6)")
    ev.add_argument("--long-seconds", type=_number, default=30.0, help="length of each long video (default 30)")
    ev.add_argument("--steps", type=_positive, default=25, help="sampling steps per section (default 25)")
    ev.add_argument("--cfg", type=_number,
                    help="real classifier-free guidance against the empty prompt (default: the model's own)")
    ev.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ev.add_argument("--split", choices=["held-out", "validation"], default="held-out",
                    help="direction scenes: held-out (the reported ones, default) or validation (unseen "
                         "training-distribution scenes, for choosing models and settings)")
    ev.add_argument("--workdir", help="keep every generated video in this directory (default: a temporary one)")
    ev.add_argument("--json", help="also write the per-video results to this JSON file")
    ev.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    ev.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    ev.set_defaults(run=_eval)

    tr = commands.add_parser("train", help="train or fine-tune from a JSON config (resumes from the latest checkpoint)")
    tr.add_argument("config", help="training config (JSON), e.g. configs/demo_vae.json")
    tr.add_argument("--output-dir", dest="output_dir", help="override the config's output_dir")
    tr.add_argument("--max-steps", dest="max_steps", type=_positive,
                    help="stop after this many steps in this run (a checkpoint is written); run again to continue")
    tr.set_defaults(run=_train)
    from .ui import add_ui_command  # light: gradio is imported only when the app starts

    add_ui_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("framepack: interrupted; finished sections are kept in the job directory (--resume it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as exc:
        print(f"framepack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
