"""The ``framepack`` command line. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_random_weights_demo

    print(
        "framepack demo: the embedded demo model is not trained yet, so this runs the tiny preset "
        "with RANDOM weights on the CPU (latents only, no video) to show the packed section loop."
    )
    stats = run_random_weights_demo(sections=args.sections, steps=args.steps, seed=args.seed)
    print(f"\n| section | history latents | context tokens | seconds |\n|---|---|---|---|")
    for s in stats:
        print(f"| {s.index} | {s.history_latents} | {s.context_tokens} | {s.seconds:.2f} |")
    print(f"\ncontext tokens stay at {max(s.context_tokens for s in stats)} however long the history grows.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the CPU demo (random tiny weights until the demo model ships)")
    demo.add_argument("--sections", type=_positive, default=6, help="number of sections to generate (default 6)")
    demo.add_argument("--steps", type=_positive, default=4, help="sampling steps per section (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"framepack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
