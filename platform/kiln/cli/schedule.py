"""`kiln schedule`: cron schedules that queue jobs.

    kiln schedule add nightly --cron "30 2 * * *" --tz Europe/Berlin examples/digits_mlp.yaml
    kiln schedule add retrain --type retraining --cron "0 3 * * *" retrain.yaml
    kiln schedule list
    kiln schedule next NAME [-n 5]
    kiln schedule trigger NAME      # queue its job now
    kiln schedule pause NAME | resume NAME | remove NAME

Fires are queued by ``kiln scheduler`` or ``kiln worker --with-scheduler``.
"""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.queue import read_config
from kiln.cli.runs import handles_errors, print_table, run_paths

__all__ = ["register"]


def _scheduler(args: argparse.Namespace) -> Any:
    from kiln.queue.scheduler import TrainingScheduler

    return TrainingScheduler(paths=run_paths(args))


@handles_errors
def cmd_add(args: argparse.Namespace) -> int:
    sid = _scheduler(args).create_schedule(
        args.name,
        args.type,
        read_config(args.config, args.type),
        args.cron,
        priority=args.priority,
        timezone=args.tz,
        catch_up=args.catch_up,
    )
    nxt = _scheduler(args).next_fire_times(sid, 1)[0]
    print(f"schedule {args.name!r} (id {sid}) added; next fire {nxt}")
    return 0


@handles_errors
def cmd_list(args: argparse.Namespace) -> int:
    frame = _scheduler(args).list_schedules()
    if frame.empty:
        print("no schedules")
        return 0
    print_table(frame, title="schedules")
    return 0


@handles_errors
def cmd_next(args: argparse.Namespace) -> int:
    for when in _scheduler(args).next_fire_times(args.name, args.n):
        print(when)
    return 0


@handles_errors
def cmd_trigger(args: argparse.Namespace) -> int:
    job_id = _scheduler(args).trigger_schedule(args.name)
    print(f"schedule {args.name!r}: job {job_id} queued")
    return 0


def _action(method: str, done: str):
    @handles_errors
    def command(args: argparse.Namespace) -> int:
        getattr(_scheduler(args), method)(args.name)
        print(f"schedule {args.name!r} {done}")
        return 0

    return command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kiln schedule`` and its subcommands."""
    schedule = subparsers.add_parser(
        "schedule", help="cron schedules that queue jobs", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")

    p = sub.add_parser("add", help="add a schedule")
    p.add_argument("name")
    p.add_argument("config", help="job config file, or an inline JSON/YAML mapping")
    p.add_argument("--cron", required=True, help="cron expression, e.g. '0 2 * * *'")
    p.add_argument("--tz", default="UTC", help="IANA time zone of the cron times (default UTC)")
    p.add_argument("--type", default="training", help="job type (default training)")
    p.add_argument("--priority", type=int, default=5, help="1-10 (default 5)")
    p.add_argument("--catch-up", default="latest", choices=["latest", "all", "none"],
                   help="missed fires: queue the latest (default), all, or none")  # fmt: skip
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("list", help="schedules and their next fires")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("next", help="the next fire times of a schedule")
    p.add_argument("name")
    p.add_argument("-n", type=int, default=5, help="how many (default 5)")
    p.set_defaults(func=cmd_next)

    for name, func, text in (
        ("trigger", cmd_trigger, "queue the schedule's job now"),
        ("pause", _action("pause", "paused"), "stop firing"),
        ("resume", _action("resume", "resumed"), "fire again (missed fires are skipped)"),
        ("remove", _action("delete_schedule", "removed"), "delete a schedule"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("name", help="schedule name or id")
        p.set_defaults(func=func)
