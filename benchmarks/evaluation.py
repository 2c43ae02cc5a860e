"""The yardstick's table for docs/evaluation.md: a model's `framepack eval` run beside the controls.

The model's numbers come from the JSON of `framepack eval --json FILE` (it takes minutes to hours);
the controls are measured here, on the same split, start frames, scenes and lengths, in seconds:
the world's own clips (full marks); the world's clips of the caption alone, at the speed and
heading it does not give (a model that follows the caption perfectly and guesses those: the
ceiling; in the determined world, the default, it is the ground truth); a caption-blind
generator (the world's clip of a motion the start frame alone decides); a frozen video (the
start frame repeated) and random noise. Also the caption-blind rules of issue 18 on both worlds'
held-out start frames.

    python benchmarks/evaluation.py --model-json runs/eval-yardstick-tiny.json --doc docs/evaluation.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from framepack.train import world, yardstick
from framepack.train.evaluate import YardstickConfig, YardstickResult, format_yardstick, measure

RULE_SCENES = 500  # per held-out split, for the blind rules
RULE_TRAINING = 20_000  # training scenes the fitted rule learns from


def _config(saved: dict) -> YardstickConfig:
    lists = ("shape_seconds", "persistence_seconds")
    return YardstickConfig(**{k: tuple(v) if k in lists else v for k, v in saved.items()})


PARTS = ("start_frames", "long_videos", "drift_seconds")  # what may differ between the runs merged


def merge_runs(runs: list[dict]) -> dict:
    """One `framepack eval` JSON from runs of the same model and settings that each made a part of
    it (say ``--long-videos 0`` and ``--start-frames 0``, run side by side on two cores): the
    caption trials from the run with start frames, the long videos from the run with long videos.
    Every video's seed depends only on its own part, so the merge equals a single run."""
    def settings(run: dict) -> dict:
        return {k: v for k, v in run["config"].items() if k not in PARTS + ("workdir",)}

    first = settings(runs[0])
    differing = sorted({k for r in runs[1:] for k, v in settings(r).items() if first.get(k) != v})
    if differing:
        raise SystemExit(f"the runs to merge differ in more than which parts they made: {', '.join(differing)}")
    captions = [r for r in runs if r["config"]["start_frames"]]
    long = [r for r in runs if r["config"]["long_videos"]]
    if len(captions) > 1 or len(long) > 1:
        raise SystemExit("more than one of the runs to merge made caption trials, or long videos")
    config = {**runs[0]["config"], "start_frames": captions[0]["config"]["start_frames"] if captions else 0,
              "long_videos": long[0]["config"]["long_videos"] if long else 0,
              "drift_seconds": long[0]["config"]["drift_seconds"] if long else 0.0}
    return {"config": config, "captions": captions[0]["captions"] if captions else [],
            "long": long[0]["long"] if long else [], "vanilla": long[0]["vanilla"] if long else []}


def controls(config: YardstickConfig) -> dict[str, YardstickResult]:
    scenes = world.scenes(config.split, config.start_frames, config.start) + config.long_scenes()
    generators = {
        "world's own clips": yardstick.world_generator(scenes),
        "caption alone (ceiling)": yardstick.caption_generator(scenes),
        "caption-blind": yardstick.blind_generator(scenes),
        "frozen video": yardstick.frozen_generator(),
        "random video": yardstick.noise_generator(),
    }
    return {name: measure(config, g, g) for name, g in generators.items()}


def _cell(summary: dict, key: str) -> str:
    if key == "caption":
        cc = summary["caption_control"]
        low, high = cc["interval"]
        return f"{100 * cc['accuracy']:.1f}% ({100 * low:.0f}-{100 * high:.0f})" if cc["trials"] else ""
    row = summary.get(key)
    if row is None or not row["videos"]:
        return ""
    interval = "" if np.isnan(row["low"]) else f" ({row['low']:.2f}-{row['high']:.2f})"
    return f"{row['mean']:.3f}{interval}"


def side_by_side(results: dict[str, YardstickResult]) -> str:
    """One row per measurement, one column per generator, with 95% intervals."""
    config = next(iter(results.values())).config
    names = list(results)
    summaries = {name: r.summary() for name, r in results.items()}
    first = summaries[names[0]]["caption_control"]
    rows = [("caption", (f"caption control ({first['trials']} captions on {first['start_frames']} start frames, "
                         f"{config['caption_seconds']:g} s; chance {100 * first['chance']:.1f}%)"))]
    for key, name in (("iou", "shape IoU in place"), ("centred_iou", "shape IoU centred"),
                      ("persistence", "persistence")):
        lengths = config["shape_seconds"] if key != "persistence" else config["persistence_seconds"]
        rows += [(f"{key}@{s:g}s", f"{name}, {s:g} s ({config['long_videos']} videos)") for s in lengths]
    lines = ["| measurement | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(summaries[n], key) for n in names) + " |")
    return "\n".join(lines)


def blind_rules() -> str:
    """The issue's edge rule and the fitted start-frame rule on both worlds' held-out start frames."""
    lines = ["| world (held-out start frames) | chance | near an edge, move away; else stay | best fitted start-frame rule |",
             "|---|---|---|---|"]
    # the determined world draws the same start frames and motions as the independent one: one row for both
    for start, label in (("by-motion", "first world (start by motion)"), ("independent", "new world (independent starts)")):
        scenes = world.scenes("validation", RULE_SCENES, start) + world.scenes("test", RULE_SCENES, start)
        fitted = yardstick.fit_start_frame_rule(itertools.islice(world.stream(11, start), RULE_TRAINING))
        chance = np.mean([1 / len(world.applicable_motions(p)) for p in scenes])
        cells = []
        for rule in (lambda p: yardstick.edge_rule(world.render(p, 1, size=64)[0], world.PALETTE[p.color]), fitted):
            right = sum(rule(p) == p.motion for p in scenes)
            low, high = yardstick.wilson(right, len(scenes))
            cells.append(f"{100 * right / len(scenes):.1f}% ({100 * low:.0f}-{100 * high:.0f}), n = {len(scenes)}")
        lines.append(f"| {label} | {100 * chance:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def direction_baseline() -> str:
    """The first yardstick's motion-direction score of the edge rule (it never reads the caption) on
    the held-out prompts of the first shipped model's published table."""
    from framepack.train.evaluate import direction_cases

    lines = ["| held-out prompts (`framepack eval --prompts N`) | edge rule: direction right | 95% interval (Wilson) |",
             "|---|---|---|"]
    for n in (50, 100):
        cases = direction_cases(n)
        right = sum(world.expected_direction(world.with_motion(p, yardstick.edge_rule_of(p))) == world.expected_direction(p)
                    for p in cases)
        low, high = yardstick.wilson(right, n)
        lines.append(f"| the first {n} | {right}/{n} = {100 * right / n:.1f}% | {100 * low:.0f}-{100 * high:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-json", nargs="+", help="the JSON of `framepack eval --json FILE`, or of "
                        "several runs that each made a part of it (merged: see merge_runs)")
    parser.add_argument("--doc", help="write the tables between this Markdown file's bench:NAME markers")
    parser.add_argument("--name", default="yardstick", help="the markers' NAME (default yardstick)")
    parser.add_argument("--command", default="", help="the `framepack eval` command that made the JSON, for the doc")
    parser.add_argument("--card-table", help="also write the model's own table (as `framepack eval` prints it) to "
                        "this file, for `python -m framepack.train.package --eval-table`")
    parser.add_argument("--direction-baseline", action="store_true",
                        help="instead: the edge rule's score on the first yardstick's held-out direction prompts "
                             "(bench:direction-baseline markers)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from doctable import publish  # beside this script

    if args.direction_baseline:
        publish(direction_baseline(), Path(args.doc) if args.doc else None, "direction-baseline",
                "python benchmarks/evaluation.py --direction-baseline" + (f" --doc {args.doc}" if args.doc else ""))
        return
    if not args.model_json:
        parser.error("--model-json is required (or --direction-baseline)")
    saved = merge_runs([json.loads(Path(path).read_text()) for path in args.model_json])
    config = _config(saved["config"])
    model = YardstickResult(config=saved["config"], captions=saved["captions"], long=saved["long"],
                            vanilla=saved["vanilla"])
    if args.card_table:
        Path(args.card_table).write_text(format_yardstick(model) + "\n")
    results = {f"model {config.model}": model, **controls(config)}
    report = "\n\n".join([
        f"`{args.command}`:" if args.command else "",
        format_yardstick(model),
        "Beside the controls, on the same start frames, scenes and lengths (95% intervals in brackets):",
        side_by_side(results),
        f"Caption-blind rules on {2 * RULE_SCENES} held-out start frames of each world (Wilson 95% intervals):",
        blind_rules(),
    ]).strip()
    publish(report, Path(args.doc) if args.doc else None, args.name,
            f"python benchmarks/evaluation.py --model-json {' '.join(args.model_json)}"
            + (f" --command '{args.command}'" if args.command else "")
            + (f" --name {args.name}" if args.name != "yardstick" else "") + (f" --doc {args.doc}" if args.doc else ""))


if __name__ == "__main__":
    main()
