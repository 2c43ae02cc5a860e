"""A reflow student's loss on the pairs it trained on against pairs it never saw, per sigma.

The distill task trains on a fixed set of teacher pairs (``pairs`` of them, in chunks of
``pair_batch``). A student that has learned the teacher's map from noise to sample does as well on
the next chunks of the same deterministic stream, which no run of that config ever trains on; one
that has memorised its pairs does worse there. This script makes those held-out chunks (in a
scratch folder that links the config's own chunks, so the config's ``pairs_dir`` is never
written), then prints the student's mean squared error on both, at every sigma the sampler
evaluates, and the teacher's own (the student's starting point) beside it.

    python benchmarks/distill_heldout.py configs/gen2_student.json --student tiny-fast --chunks 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from framepack.components import resolve_model
from framepack.sampling import TIMESTEP_SCALE
from framepack.train.distill_task import DistillTask, reflow_input
from framepack.train.framepack_task import weighted_mse


def errors(task: DistillTask, model: torch.nn.Module, chunks: list[int]) -> dict[float, float]:
    """Mean squared velocity error of ``model`` over ``chunks``, at each of the task's sigmas."""
    per_sigma: dict[float, list[float]] = {float(s): [] for s in task.sigmas}
    with torch.no_grad():
        for i in chunks:
            batch = task.store.load(i)
            for s in task.sigmas:
                sigma = s.repeat(batch.window.shape[0])
                x, target = reflow_input(batch.noise, batch.sample, sigma)
                v = model(x, sigma * TIMESTEP_SCALE, batch.text, batch.mask, batch.pooled, None, batch.window,
                          batch.history)
                per_sigma[float(s)].append(float(weighted_mse(v, target, None)))
    return {s: float(np.mean(v)) for s, v in per_sigma.items()}


def spread(total: int, n: int) -> list[int]:
    """``n`` chunk indices spread evenly over ``range(total)``."""
    return sorted({int(i) for i in np.linspace(0, total - 1, n)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the distill config the student was trained with")
    parser.add_argument("--student", required=True, help="the student: a model name or directory")
    parser.add_argument("--chunks", type=int, default=8, help="held-out chunks to make, and training chunks to read")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(Path(args.config).read_text())
    task_args = dict(config["task_args"])
    own = Path(task_args.get("pairs_dir", "runs/distill-pairs"))
    trained = -(-int(task_args.get("pairs", 256)) // int(task_args.get("pair_batch", 8)))
    made = sorted(own.glob("chunk-*.safetensors"))
    if len(made) < trained:  # it would make the training pairs here: hours, and not the ones trained on
        raise SystemExit(f"{own} holds {len(made)} of the {trained} chunks of pairs {args.config} trains on: "
                         "run it first, or run this from the folder its relative paths are for")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-heldout-") as scratch:
        for chunk in made:  # the config's pairs, read where they are
            (Path(scratch) / chunk.name).symlink_to(chunk.resolve())
        task = DistillTask({**task_args, "pairs": (trained + args.chunks) * task_args.get("pair_batch", 8),
                            "pairs_dir": scratch})
        task.make_pairs()  # the training chunks are there: only the held-out ones are made
        student = task.model
        weights = load_file(str(Path(resolve_model(args.student).transformer) / "diffusion_pytorch_model.safetensors"))
        student.load_state_dict({k: v.float() for k, v in weights.items()})
        student.eval()
        seen, unseen = spread(trained, args.chunks), list(range(trained, trained + args.chunks))
        rows = {name: (errors(task, model, seen), errors(task, model, unseen))
                for name, model in (("student", student), ("teacher", task.teacher))}
    header = (f"`{args.config}`, student `{args.student}`: {args.chunks * task.pair_batch} of its "
              f"{trained * task.pair_batch} training pairs against as many held-out pairs (the next chunks of "
              f"the same stream), {(time.perf_counter() - began) / 60:.1f} min")
    print(header + "\n\n" + table(rows))


def table(rows: dict[str, tuple[dict[float, float], dict[float, float]]]) -> str:
    """One line per sigma, and their mean: the student's errors on trained and held-out pairs, their
    ratio, and the teacher's."""
    (student_seen, student_unseen), (teacher_seen, teacher_unseen) = rows["student"], rows["teacher"]
    lines = ["| sigma | student, trained pairs | student, held-out | ratio | teacher, trained pairs | teacher, held-out |",
             "|---|---|---|---|---|---|"]
    columns = (student_seen, student_unseen, teacher_seen, teacher_unseen)
    for label, values in [*((f"{s:.3f}", [c[s] for c in columns]) for s in sorted(student_seen)),
                          ("mean", [float(np.mean(list(c.values()))) for c in columns])]:
        trained, held_out, teacher_trained, teacher_held_out = values
        lines.append(f"| {label} | {trained:.4f} | {held_out:.4f} | {held_out / trained:.2f} | {teacher_trained:.4f} | "
                     f"{teacher_held_out:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
