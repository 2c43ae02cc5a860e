"""``python -m framepack.ui``: the same as ``framepack ui``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import UI_OPTIONS, main_ui


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m framepack.ui", description="Serve the FramePack web app.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    for flags, kwargs in UI_OPTIONS:
        parser.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return main_ui(args)
    except (ValueError, OSError) as exc:
        print(f"framepack ui: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
