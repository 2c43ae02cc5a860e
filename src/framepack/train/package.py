"""Assemble the embedded demo model (``framepack/assets/tiny``) from finished training runs.

``python -m framepack.train.package`` (``make demo-model`` runs the whole chain) copies the exported
transformer, the small VAE and the frozen text encoders into one directory with a ``framepack.json``
manifest, the model's own defaults (resolution, shift, mode) and a model card written from the
runs' configs, loss logs and metrics, and from ``framepack eval`` results when given.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from ..cache import MANIFEST_RATIO_STEPS, MANIFEST_RATIOS
from ..components import MANIFEST, resolve_model, rewrite_manifest

MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")

log = logging.getLogger(__name__)


def _copy_tree(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise ValueError(f"missing training output: {src}")
    for path in sorted(src.rglob("*")):
        if path.is_file() and any(path.match(p) for p in MODEL_FILES):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def store_half(folder: Path) -> None:
    """Rewrite every safetensors file under ``folder`` with its fp32 tensors in fp16. The package
    ships in git and in the wheel, so the transformer's weights are stored at half the bytes; they
    are loaded (and were evaluated) at fp32, which represents every fp16 value exactly."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        half = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
        save_file(half, path, metadata=metadata)


TRANSFORMER_MEASURES = (MANIFEST_RATIOS, MANIFEST_RATIO_STEPS)  # manifest keys measured on one transformer
KEEP = "keep"  # assemble's max_inverted_padding: the gap rule the transformer's config.json already says


def gap_cap(text: str) -> int | None | str:
    """``--max-inverted-padding``'s value: windows, or "none" for the released layout (argparse also
    passes its default, :data:`KEEP`, through here)."""
    if text == KEEP:
        return KEEP
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of windows or 'none', got {text!r}") from None


def with_gap_cap(config: Path, cap: int | None) -> dict:
    """A transformer's config.json with ``"max_inverted_padding": cap`` (None: the released layout),
    checked as the config class checks it on load (so a bad value is refused before anything is written)."""
    from ..config import TransformerConfig

    data = {**json.loads(Path(config).read_text()), "max_inverted_padding": cap}
    TransformerConfig.from_json_dict(data)
    return data


def assemble(out: Path, transformer: Path, vae: Path, text: Path, resolution: int = 128, shift: float = 3.0,
             mode: str = "inverted", cfg: float | None = None, half: bool = False,
             forward_up_to: float | None = None, max_inverted_padding: int | None | str = KEEP) -> Path:
    """Write the model directory ``out`` (replaced as a whole, via a sibling temporary directory);
    ``half`` stores the transformer's weights in fp16 (:func:`store_half`); ``forward_up_to``
    (seconds) makes plain clips up to that length sample forward by default
    (:meth:`ModelSource.sampling_mode`); ``max_inverted_padding`` sets the transformer config's gap
    rule for inverted sections (:func:`framepack.planning.inverted_paddings`; None: the released layout;
    :data:`KEEP`: as the run's config says), the weights unchanged."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_transformer(transformer, tmp / "transformer", half, max_inverted_padding)
    _copy_tree(vae, tmp / "vae")
    for part in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
        _copy_tree(text / part, tmp / "text" / part)
    if (text / "training.json").exists():  # how the encoders were trained, for the card
        shutil.copyfile(text / "training.json", tmp / "text" / "training.json")
    manifest = {"transformer": "transformer", "hunyuan": "text", "vae": "vae", "redux": None, "mode": mode,
                "modes": ["inverted", "forward", "vanilla"], "resolution": resolution, "shift": shift}
    if cfg is not None:  # the real-CFG scale generation uses unless told otherwise
        manifest["cfg"] = cfg
    if forward_up_to is not None:
        manifest["forward_up_to"] = forward_up_to
    manifest["world"] = world_description()  # what framepack.world_check warns against
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    add_text_embeddings(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def replace_transformer(out: Path, transformer: Path, half: bool = False,
                        max_inverted_padding: int | None | str = KEEP) -> Path:
    """Replace only the transformer of the model directory ``out`` (``half`` and
    ``max_inverted_padding`` as in :func:`assemble`); its other components and its manifest are
    kept, so a fine-tune ships exactly as it was measured: in a copy of the model it fine-tunes.
    The manifest's MagCache ratios are dropped: they were measured on the old transformer's
    residuals (``framepack calibrate-cache`` measures the new one's)."""
    tmp, old = out / "transformer.tmp", out / "transformer.old"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_transformer(transformer, tmp, half, max_inverted_padding)
    # before the swap: a crash after it must not leave the old transformer's ratios beside the new one
    if drop_manifest(out, TRANSFORMER_MEASURES):
        log.warning("%s: its MagCache ratios were the previous transformer's and are removed; run "
                    "`framepack calibrate-cache --model %s` to measure this one's", out, out)
    if (out / "transformer").exists():  # else a crash after the first rename below: the old one is already aside
        shutil.rmtree(old, ignore_errors=True)
        (out / "transformer").replace(old)
    tmp.replace(out / "transformer")  # the commit point: every moment before it leaves a whole transformer aside
    shutil.rmtree(old, ignore_errors=True)
    return out


def _write_transformer(transformer: Path, dest: Path, half: bool, max_inverted_padding: int | None | str) -> None:
    gap_config = None if max_inverted_padding == KEEP else with_gap_cap(transformer / "config.json", max_inverted_padding)
    _copy_tree(transformer, dest)
    if half:
        store_half(dest)
    if gap_config is not None:
        (dest / "config.json").write_text(json.dumps(gap_config, indent=2) + "\n")


def world_description() -> dict:
    """The world the demo model knows, for its manifest (``framepack.world_check`` reads it): the
    words of its captions (those its text encoders were built over) and its colours."""
    from . import world
    from .framepack_task import world_vocabulary

    return {"vocabulary": world_vocabulary(), "backgrounds": [list(c) for c in world.BACKGROUND_PALETTE.values()],
            "shade_range": list(world.SHADE_RANGE), "objects": [list(c) for c in world.PALETTE.values()]}


def update_manifest(model: Path, entries: dict) -> None:
    """Set ``entries`` in an assembled model's manifest (the rest kept as it is)."""
    rewrite_manifest(Path(model) / MANIFEST, lambda manifest: {**manifest, **entries})


def drop_manifest(model: Path, keys: tuple[str, ...]) -> list[str]:
    """Remove ``keys`` from an assembled model's manifest; returns those it had."""
    had: list[str] = []

    def drop(manifest: dict) -> dict:
        had.extend(k for k in keys if k in manifest)
        return {k: v for k, v in manifest.items() if k not in keys}

    rewrite_manifest(Path(model) / MANIFEST, drop)
    return had


def add_world(model: Path) -> None:
    """Write :func:`world_description` into an assembled model's manifest (the rest kept as it is)."""
    update_manifest(model, {"world": world_description()})


SHARED_PARTS = ("vae", "hunyuan", "text_embeddings")  # manifest keys of what two embedded models can share


def _files(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() \
        else {".": root}


def _same_file(a: Path, b: Path) -> bool:
    """Byte-identical, or for safetensors the same metadata and tensors (their header's key order
    is not fixed, so two saves of the same embeddings can differ in bytes)."""
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix != ".safetensors":
        return False
    import torch
    from safetensors import safe_open

    with safe_open(a, "pt") as x, safe_open(b, "pt") as y:
        if x.metadata() != y.metadata() or set(x.keys()) != set(y.keys()):
            return False
        for k in x.keys():
            mine, theirs = x.get_tensor(k), y.get_tensor(k)
            if mine.dtype != theirs.dtype or not torch.equal(mine, theirs):
                return False
        return True


def _same_part(a: Path, b: Path) -> bool:
    mine, theirs = _files(a), _files(b)
    return mine.keys() == theirs.keys() and all(_same_file(mine[k], theirs[k]) for k in mine)


def share_encoders(model: Path, other: Path) -> None:
    """Make ``model`` use ``other``'s VAE, text encoders and stored embeddings by relative paths,
    removing its own copies (the package ships one set for the demo model and its student). Refused
    unless each part is identical (:func:`_same_file`), so the model runs exactly as with its copies."""
    model, other = Path(model), Path(other)
    mine, theirs = json.loads((model / MANIFEST).read_text()), json.loads((other / MANIFEST).read_text())
    entries = {}
    for key in SHARED_PARTS:
        own, shared = model / mine[key], other / theirs[key]
        if not _same_part(own, shared):
            raise ValueError(f"{own} differs from {shared}: only identical parts can be shared")
        entries[key] = Path("..", other.name, theirs[key]).as_posix() if other.parent.resolve() == model.parent.resolve() \
            else str(shared.resolve())
    for key in SHARED_PARTS:
        own = model / mine[key]
        shutil.rmtree(own) if own.is_dir() else own.unlink()
    update_manifest(model, entries)


def add_text_embeddings(model: Path, prompts: tuple[str, ...] | None = None) -> None:
    """Store the embeddings of ``prompts`` (default: the demo's prompt and the empty negative
    prompt) made by the model's own text encoders, and name the file in its manifest, so that
    ``framepack demo`` never builds the encoders (framepack.text_store)."""
    from ..components import HunyuanTextEncoder, asset
    from ..text_store import TEXT_EMBEDDINGS, encoder_identity, save_text_embeddings

    model = Path(model)
    path = model / MANIFEST
    manifest = json.loads(path.read_text())
    text = model / manifest["hunyuan"]
    crop_start = manifest.get("crop_start")
    if prompts is None:
        prompts = (asset("demo", "prompt.txt").read_text().strip(), "")
    encoder = HunyuanTextEncoder.from_pretrained(text, crop_start=crop_start)
    save_text_embeddings(model / TEXT_EMBEDDINGS, encoder_identity(text, crop_start),
                         {p: encoder.encode(p) for p in prompts})
    manifest["text_embeddings"] = TEXT_EMBEDDINGS
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _run_summary(run: Path) -> dict:
    """Steps, final loss and wall time of a training run, from its config and loss log."""
    config = json.loads((run / "train_config.json").read_text())
    entries = [json.loads(line) for line in (run / "loss.log").read_text().splitlines() if line.strip()]
    last = entries[-1] if entries else {}
    seconds = last.get("wall_seconds")  # absent in logs written before the trainer recorded it
    return {"config": config, "steps": last.get("step", 0), "loss": last.get("loss"),
            "first_loss": entries[0]["loss"] if entries else None, "hours": None if seconds is None else seconds / 3600}


def _text_training(text: Path) -> str:
    """How the text encoders were made, from their ``training.json`` (absent: random, untrained)."""
    report = text / "training.json"
    if not report.exists():
        return "random (the transformer learns to read them)"
    data = json.loads(report.read_text())
    motion = min(v for k, v in data["held_out_accuracy"].items() if k.endswith("_motion"))
    return (f"LLaMA embeddings at unit scale, trained {data['steps']} steps on the world's captions (linear heads "
            f"name every caption field; motion read correctly for {100 * motion:.0f}% of held-out scenes)")


def _size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def stage_row(run: Path) -> str:
    """One row of the card's training table, from a run directory's config and loss log."""
    s = _run_summary(run)
    c = s["config"]
    hours = "not logged" if s["hours"] is None else f"{s['hours']:.2f}"
    return (f"| {run.name} | `{c['task']}` | {s['steps']} | {c['batch_size']} | {c['lr']:g} | "
            f"{s['first_loss']:.4f} -> {s['loss']:.4f} | {hours} |")


def card_rows(card: Path) -> dict[str, str]:
    """The training table's rows of an existing card, by stage name (empty if there is none)."""
    if not card.exists():
        return {}
    rows = [line for line in card.read_text().splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    return {row.split("|")[1].strip(): row for row in rows}


def card_notes(card: Path) -> str:
    """The ``## Notes`` section of an existing card (to its end), or "" if it has none."""
    if not card.exists():
        return ""
    text = card.read_text()
    start = text.find("\n## Notes\n")
    return text[start + 1:].rstrip() + "\n" if start >= 0 else ""


def stage_rows(runs: list[Path], previous: dict[str, str]) -> list[str]:
    """A row per stage: from its run directory, or, where that is gone (runs/ is not kept), the
    row the card being replaced had for it."""
    rows = []
    for run in runs:
        if (run / "loss.log").exists():
            rows.append(stage_row(run))
        elif run.name in previous:
            log.warning("%s: no loss log here; its row is kept from the previous card", run)
            rows.append(previous[run.name])
        else:
            raise ValueError(f"{run}: no loss log and no row for it in the previous card")
    return rows


def _default_mode(source) -> str:
    if source.forward_up_to is None:
        return source.mode
    return f"{source.mode}, and forward for a plain clip of up to {source.forward_up_to:g} s"


def _gap_rule(transformer: dict) -> str:
    cap = transformer.get("max_inverted_padding")
    if cap is None:
        return ""
    return (f" In inverted order each section is told its true distance from the start frame, up to {cap} windows "
            "(`max_inverted_padding`; the released layout tells every middle section of a long video 2).")


def model_card(model: Path, rows: list[str], eval_table: str | None, notes: str = "", story: str = "") -> str:
    """The MODEL_CARD.md text: components, training stages (``rows``: see :func:`stage_rows`; ``story``:
    prose on how they were chained), evaluation table and notes."""
    vae_metrics = json.loads((model / "vae" / "metrics.json").read_text()) if (model / "vae" / "metrics.json").exists() else {}
    transformer = json.loads((model / "transformer" / "config.json").read_text())
    source = resolve_model(str(model))
    lines = [
        "# FramePack demo model (`--model tiny`)",
        "",
        "A small FramePack trained from scratch by `framepack train` on the procedural world of",
        "`framepack.train.world` (one coloured shape moving on a plain, gradient or striped background,",
        "30 fps, 128x128). It runs through exactly the code of the 13B model (same transformer class,",
        "planner, sampler, job directory and video writer); only the components are small. It knows",
        "nothing but that world: give it a 128x128 start frame of a similar scene and a caption in the",
        "world's words (see `framepack.train.world.caption`).",
        "",
        "| component | what | size |",
        "|---|---|---|",
        f"| transformer | `FramePackTransformer`, tiny preset: {transformer.get('num_layers')} double + "
        f"{transformer.get('num_single_layers')} single blocks, {transformer.get('num_attention_heads')} heads x "
        f"{transformer.get('attention_head_dim')}, context schedule `{transformer.get('context_schedule', 'f1k1f2k2f16k4')}` | "
        f"{_size_mb(model / 'transformer'):.1f} MB |",
        f"| VAE | `SmallVideoAutoencoder`: 16 channels, 8x spatial, 4x causal temporal (HunyuanVideo's geometry); "
        f"held-out reconstruction {vae_metrics.get('psnr_db', float('nan')):.2f} dB PSNR | {_size_mb(model / 'vae'):.1f} MB |",
        f"| text | LLaMA-architecture + CLIP-text encoders with local tokenizers over the world's vocabulary, "
        f"{_text_training(model / 'text')}, then frozen | {_size_mb(model / 'text'):.1f} MB |",
        "",
        "Sampling modes: trained on all three layouts the planner produces (inverted anti-drifting, forward",
        f"as F1, vanilla); its default is {_default_mode(source)}.{_gap_rule(transformer)} No image encoder, "
        "no distilled-guidance",
        "embedder (the `--distilled-guidance` value is ignored). Training replaced 10% of the captions by the",
        "empty prompt, so real CFG (`--cfg`, negative prompt \"\") works. Defaults from its manifest: 128 px,",
        f"sigma shift 3 (the training shift), cfg {source.cfg(None):g}, 25 UniPC steps.",
        "",
        "## Training (CPU only: 2 cores)",
        "",
        "Reproduce with `make demo-model` (the configs are in `configs/`; each stage resumes from its",
        "latest checkpoint).",
        "",
        "| stage | task | steps | batch | peak lr | loss (first -> last checkpoint) | wall hours |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    if story:
        lines += ["", story.rstrip()]
    if eval_table:
        lines += ["", "## Evaluation (`framepack eval`)", "", eval_table.rstrip()]
    if notes:
        lines += ["", notes.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m framepack.train.package", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="src/framepack/assets/tiny")
    parser.add_argument("--transformer", default="runs/gen2-framepack-long", help="the transformer run to ship")
    parser.add_argument("--transformer-runs", nargs="*", default=["runs/gen2-framepack", "runs/gen2-framepack-long"],
                        help="transformer stages, for the card")
    parser.add_argument("--vae", default="runs/gen2-vae-smooth", help="the VAE run to ship (its final/ is used)")
    parser.add_argument("--vae-runs", nargs="*", default=["runs/gen2-vae", "runs/gen2-vae-smooth"],
                        help="VAE stages, for the card")
    parser.add_argument("--text", default="src/framepack/assets/tiny/text")
    parser.add_argument("--cfg", type=float, help="the model's default real-CFG scale (default: none, i.e. off)")
    parser.add_argument("--half", action="store_true", help="store the transformer's weights in fp16 (loaded at fp32)")
    parser.add_argument("--forward-up-to", type=float, metavar="SECONDS",
                        help="sample plain clips up to this length forward by default, longer ones inverted")
    parser.add_argument("--max-inverted-padding", type=gap_cap, default=KEEP, metavar="WINDOWS",
                        help="inverted sections are told their true gap from the start, up to this many windows; "
                             "'none': the released layout (default: as the transformer run's config says)")
    parser.add_argument("--story", default="configs/gen2_card.md",
                        help="a markdown file on how the stages were chained, for the card ('' for none)")
    parser.add_argument("--eval-table", help="a file holding `framepack eval`'s table, for the card")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite only the card of the model at --out (its weights and manifest, with the cache "
                             "calibration written since, are kept)")
    parser.add_argument("--transformer-only", action="store_true",
                        help="replace only the transformer of the model at --out (its manifest, less the MagCache "
                             "ratios of the old transformer, and its other components are kept) and rewrite its card")
    parser.add_argument("--notes", help="a file of notes to append to the card (default: the current card's notes)")
    args = parser.parse_args(argv)
    if args.card_only and args.transformer_only:
        parser.error("--card-only and --transformer-only exclude each other")
    card = Path(args.out) / "MODEL_CARD.md"
    rows = stage_rows([Path(r) for r in args.vae_runs + args.transformer_runs], card_rows(card))
    notes = Path(args.notes).read_text() if args.notes else card_notes(card)  # read before the card is replaced
    if args.card_only:
        out = Path(args.out)
    elif args.transformer_only:
        out = replace_transformer(Path(args.out), Path(args.transformer) / "final", half=args.half,
                                  max_inverted_padding=args.max_inverted_padding)
    else:
        out = assemble(Path(args.out), Path(args.transformer) / "final", Path(args.vae) / "final", Path(args.text),
                       cfg=args.cfg, half=args.half, forward_up_to=args.forward_up_to,
                       max_inverted_padding=args.max_inverted_padding)
    table = Path(args.eval_table).read_text() if args.eval_table else None
    story = Path(args.story).read_text() if args.story else ""
    (out / "MODEL_CARD.md").write_text(model_card(out, rows, table, notes, story))
    print(f"{out}: {_size_mb(out):.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
