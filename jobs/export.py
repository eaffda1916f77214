"""Export a checkpoint or registered model as a bundle, as a Ray job.

    ray job submit --working-dir . -- python jobs/export.py CHECKPOINT|NAME@TAG -o DIR \
        [--formats onnx,pytorch] [--db PATH]
"""

from __future__ import annotations

import argparse
import sys

from kiln.cli.export import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/export.py")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
