"""The ``kiln`` command.

    kiln train examples/digits_mlp.yaml [--set key=value ...] [--workers N] [--resume latest]
    kiln datasets
    kiln runs list | show | compare | plot
    kiln models list | show | promote | history | rollback | retire
    kiln export CHECKPOINT|NAME@TAG -o DIR
    kiln serve BUNDLE|NAME@TAG [--port 8000]
    kiln tune CONFIG --space SPACE.yaml --samples N
    kiln queue submit | list | show | cancel | retry | decisions
    kiln worker [--address URL] [--with-scheduler]  |  kiln scheduler
    kiln schedule add | list | next | trigger | pause | resume | remove
    kiln eval NAME@TAG|CHECKPOINT DATA [--split test] [--plot cm.png]
    kiln predict NAME@TAG|BUNDLE INPUT -o OUTPUT [--keep id] [--concurrency N]
    kiln llm train CONFIG | status | generate | merge | tiny-model | serve

Bad input exits with status 2 and a one-paragraph message (``--debug`` shows the
traceback). Environment variables (KILN_HOME, RAY_ADDRESS, KILN_LOG_LEVEL) are read
here, once.

Every command takes ``--verbose`` (Ray's logs as Ray prints them: KILN_LOG_LEVEL=INFO)
and ``--quiet`` (only the final summary and errors: KILN_LOG_LEVEL=ERROR), before or
after the command's name. Without either, KILN_LOG_LEVEL (default WARNING) decides.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kiln.errors import ConfigError, KilnError

# Subcommand modules; each exposes register(subparsers) and sets func=handler(args) -> int.
_COMMANDS = (
    "train", "datasets", "runs", "models", "export", "serve", "tune", "eval", "predict",
    "queue", "worker", "schedule", "llm",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Train, track, export and serve PyTorch models on Ray."
    )
    parser.add_argument("--home", help="kiln's home directory (default: $KILN_HOME or ~/.kiln)")
    parser.add_argument("--db", help="SQLite database (default: <home>/kiln.db)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"kiln.cli.{name}")
        except ModuleNotFoundError as exc:  # an optional piece that is not installed
            if exc.name and exc.name.startswith("kiln.cli"):
                continue
            raise
        module.register(subparsers)
    _add_verbosity(parser, top=True)
    _polish_help(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--verbose`` / ``--quiet`` on ``parser``; below the top level they default to
    SUPPRESS, so ``kiln --quiet train`` and ``kiln train --quiet`` mean the same."""
    group = parser.add_mutually_exclusive_group()
    default = False if top else argparse.SUPPRESS
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="show Ray's own logs too (KILN_LOG_LEVEL=INFO)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="print only the final summary and errors (KILN_LOG_LEVEL=ERROR)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbosity(sub)


def apply_verbosity(args: argparse.Namespace) -> str:
    """Set KILN_LOG_LEVEL from --verbose/--quiet (else keep it) and return the level:
    the library reads it in one place (:func:`kiln._ray.log_level`), and Ray jobs and
    subprocesses that kiln starts inherit it."""
    import os

    from kiln._ray import LOG_LEVEL_ENV, log_level

    if args.verbose and args.quiet:
        raise ConfigError("--verbose and --quiet cannot be used together")
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "INFO"
    elif args.quiet:
        os.environ[LOG_LEVEL_ENV] = "ERROR"
    level = log_level()
    args.quiet = logging.getLevelName(level) >= logging.ERROR
    args.verbose = logging.getLevelName(level) <= logging.INFO
    if not (sys.stdout.isatty() and sys.stderr.isatty()):  # no colour codes in a pipe:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # none around "(Worker pid=...)"
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # "[repeated 3x ...]" is always green
    return level


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (examples keep their lines); each option shows its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS, [])
        if shown and "%(default)" not in text and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def _polish_help(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command: plain text (no reStructuredText ``quotes``), defaults shown."""
    parser.formatter_class = _HelpFormatter
    if parser.description:
        parser.description = parser.description.replace("``", "")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _polish_help(sub)
        elif action.help:
            action.help = action.help.replace("``", "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `kiln serve` re-runs itself
    from kiln.paths import RunPaths

    args.paths = RunPaths.resolve(args.home, db=args.db)  # the one place --home/--db are read
    try:
        level = apply_verbosity(args)
    except KilnError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else level,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.quiet:
        logging.getLogger("kiln.progress").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (KilnError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"error: {type(exc).__name__}: {exc}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
