"""``framepack ui``: the web app (Gradio), its persistent job queue and its worker.

Importing this package is cheap: Gradio and torch are imported only when the app starts.
Wiring into the CLI is one call, ``add_ui_command(commands)``, with the subparsers of
``framepack.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 7860
LARGE_MODELS = ("framepack-i2v", "framepack-f1")

# (flags, argparse keyword arguments): the options of `framepack ui`
UI_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--host",), dict(default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")),
    (("--port",), dict(type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")),
    (("--auth",), dict(metavar="USER:PASSWORD", help="require this login (default: none)")),
    (("--share",), dict(action="store_true", help="also open a public gradio.live link (off by default)")),
    (("--outputs",), dict(default="outputs",
                          help="videos, job directories and the job store jobs.sqlite (default outputs)")),
    (("--model",), dict(help="default model: tiny (the CPU demo model; default without a CUDA GPU), "
                             "framepack-i2v (default with one), framepack-f1, or a model directory")),
    (("--poll-seconds",), dict(dest="poll_seconds", type=float, default=1.0,
                               help="how often pages refresh the progress (default 1)")),
    (("--device",), dict(help="auto (default), cpu, cuda, cuda:1, ...: where the one worker runs its jobs")),
    (("--devices",), dict(metavar="LIST", help="one worker per device, each running its own job at the same "
                                                 "time: cuda:0,cuda:1 (a device may repeat: cpu,cpu)")),
    (("--dtype",), dict(default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype; auto = bf16 on CUDA, fp32 on CPU")),
    (("--lora-dir",), dict(dest="lora_dir", metavar="DIR",
                           help="a folder of LoRA .safetensors files the page offers by name (default: none; "
                                "only files directly in it are read, see docs/lora.md)")),
)


def add_ui_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ui`` to the ``framepack`` subcommands."""
    parser = commands.add_parser("ui", help="start the web app (Gradio) with a job queue that survives restarts",
                                 description="Serve the FramePack web app. Jobs wait in outputs/jobs.sqlite and "
                                             "continue after a restart from their last finished section.")
    for flags, kwargs in UI_OPTIONS:
        parser.add_argument(*flags, **kwargs)
    parser.set_defaults(run=main_ui)
    return parser


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like USER:PASSWORD")
    return user, password


def parse_devices(device: str | None, devices: str | None) -> list[str]:
    """The device of each worker, as typed: ``--devices a,b`` or the one ``--device`` (auto by default)."""
    if devices is None:
        return [device or "auto"]
    if device is not None:
        raise ValueError("give --device (one worker) or --devices (one worker each), not both")
    names = [name.strip() for name in devices.split(",")]
    if not all(names):
        raise ValueError(f"--devices takes a comma-separated list such as cuda:0,cuda:1, got {devices!r}")
    return names


def available_models(default: str, cuda: bool) -> tuple[str, ...]:
    """The default model first; the demo models when installed; the 13B models when a CUDA GPU is present."""
    from ..components import EMBEDDED_MODELS, resolve_model

    models = [default]
    candidates = list(EMBEDDED_MODELS) + (list(LARGE_MODELS) if cuda else [])
    for name in candidates:
        if name in models:
            continue
        try:
            resolve_model(name)
        except ValueError:
            continue
        models.append(name)
    return tuple(models)


def main_ui(args: argparse.Namespace) -> int:
    """Run ``framepack ui`` from parsed arguments (blocks until interrupted)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web app needs gradio: pip install 'framepack[ui]'") from None
    import torch

    from ..components import resolve_device, resolve_dtype, resolve_model
    from ..memory import tune_allocator
    from .app import launch
    from .service import JobService
    from .worker import pipeline_loader

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    jobs_log = logging.getLogger("framepack.ui.jobs")  # one line per job started/finished/failed
    if jobs_log.getEffectiveLevel() > logging.INFO:
        jobs_log.setLevel(logging.INFO)
    auth = parse_auth(args.auth)
    from .loras import LoraFolder

    loras = LoraFolder(args.lora_dir) if args.lora_dir else None  # not a folder: one line, before anything loads
    if not 0.1 <= args.poll_seconds <= 60:
        raise ValueError(f"--poll-seconds must be between 0.1 and 60, got {args.poll_seconds:g}")
    # a typo or a missing GPU: one line, before anything loads
    devices = [resolve_device(name) for name in parse_devices(args.device, args.devices)]
    dtypes = [resolve_dtype(args.dtype, device) for device in devices]
    default = args.model or ("framepack-i2v" if torch.cuda.is_available() else "tiny")
    resolve_model(default)  # an unknown model fails now, with one line
    models = available_models(default, any(device.type == "cuda" for device in devices))
    tune_allocator()

    service = JobService(Path(args.outputs), [pipeline_loader(d, t) for d, t in zip(devices, dtypes)],
                         devices=[str(device) for device in devices])
    launch(service, models, host=args.host, port=args.port, auth=auth, share=args.share, poll_s=args.poll_seconds,
           loras=loras)
    return 0
