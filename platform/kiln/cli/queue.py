"""`kiln queue`: submit, list, show, cancel and retry queued jobs.

    kiln queue submit examples/digits_mlp.yaml [--type training] [--priority 7] [--max-retries 3]
    kiln queue submit --type evaluation '{"model": "digits@production", "dataset": "digits"}'
    kiln queue list [--status pending] [--type training] [--limit 50]
    kiln queue show ID           # every field and the tail of its log
    kiln queue cancel ID         # a running job's run is stopped by its worker
    kiln queue retry ID
    kiln queue decisions [MODEL] # recorded retraining decisions with their reasons

CONFIG is a YAML/JSON file, or an inline JSON/YAML mapping. ``kiln worker`` runs the
jobs. The queue lives in ``--db`` or ``$KILN_HOME/kiln.db``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kiln.cli.runs import handles_errors, print_table, run_paths
from kiln.errors import ConfigError

__all__ = ["register"]


def _manager(args: argparse.Namespace) -> Any:
    from kiln.queue.manager import JobManager

    return JobManager(paths=run_paths(args))


def read_config(text: str, job_type: str) -> Any:
    """A job config from a file path or an inline mapping (training keeps the path)."""
    from kiln.config import read_mapping
    from kiln.config.training import load_yaml

    if Path(text).expanduser().is_file():
        return text if job_type == "training" else read_mapping(text)
    if text.lstrip().startswith("{"):
        value = load_yaml(text)
        if isinstance(value, dict):
            return value
    raise ConfigError(
        f"CONFIG={text!r} is neither an existing file nor an inline mapping like "
        '\'{"model": "digits@production", "dataset": "digits"}\''
    )


@handles_errors
def cmd_submit(args: argparse.Namespace) -> int:
    config = read_config(args.config, args.type)
    job_id = _manager(args).submit_job(
        args.type,
        config,
        priority=args.priority,
        max_retries=args.max_retries,
        not_before=args.not_before,
        depends_on=args.depends_on,
    )
    print(
        f"job {job_id} queued ({args.type}, priority {args.priority}); `kiln queue show {job_id}`"
    )
    return 0


@handles_errors
def cmd_list(args: argparse.Namespace) -> int:
    frame = _manager(args).list_jobs(status=args.status, job_type=args.type, limit=args.limit)
    if frame.empty:
        print("no jobs")
        return 0
    frame = frame.rename(columns={"job_type": "type", "worker_id": "worker"})
    frame["retries"] = [
        f"{r}/{m}" for r, m in zip(frame["retry_count"], frame["max_retries"], strict=True)
    ]
    frame["created"] = frame["created_at"].str.slice(0, 19)
    frame["error"] = frame["error_message"].map(lambda e: e[:60] if isinstance(e, str) else "")
    columns = ["job_id", "type", "status", "priority", "worker", "attempt", "retries", "result",
               "created", "error"]  # fmt: skip
    print_table(frame[columns], title="jobs (newest first)")
    return 0


@handles_errors
def cmd_show(args: argparse.Namespace) -> int:
    from kiln.queue.executor import log_tail

    job = _manager(args).get_job(args.job_id)
    for name, value in vars(job).items():
        if name in ("config", "details"):
            continue
        shown = getattr(value, "value", value)
        print(f"{name:>16}: {'' if shown is None else shown}")
    print(f"{'config':>16}: {json.dumps(job.config, default=str)}")
    if job.details:
        print(f"{'details':>16}: {json.dumps(job.details, default=str)}")
    tail = log_tail(job.log_path, args.lines)
    if tail:
        print(f"\n--- last {args.lines} lines of {job.log_path} ---\n{tail}")
    return 0


@handles_errors
def cmd_cancel(args: argparse.Namespace) -> int:
    job = _manager(args).cancel_job(args.job_id)
    print(
        f"job {job.job_id} cancelled"
        + (f" (its worker {job.worker_id} stops the run)" if job.worker_id else "")
    )
    return 0


@handles_errors
def cmd_retry(args: argparse.Namespace) -> int:
    job = _manager(args).retry_job(args.job_id)
    print(f"job {job.job_id} queued again")
    return 0


@handles_errors
def cmd_decisions(args: argparse.Namespace) -> int:
    from kiln.queue.retraining import retrain_decisions

    frame = retrain_decisions(model=args.model, paths=run_paths(args))
    if frame.empty:
        print("no retraining decisions recorded")
        return 0
    frame["reasons"] = frame["reasons"].map("; ".join)
    print_table(frame.drop(columns=["numbers"]), title="retraining decisions (newest first)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kiln queue`` and its subcommands."""
    queue = subparsers.add_parser(
        "queue", help="submit and inspect queued jobs", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="queue a job")
    p.add_argument("config", help="config file, or an inline JSON/YAML mapping")
    p.add_argument("--type", default="training",
                   help="training, evaluation, export, retraining or noop (default training)")  # fmt: skip
    p.add_argument("--priority", type=int, default=5, help="1 (least urgent) to 10 (default 5)")
    p.add_argument("--max-retries", type=int, default=3, help="retries after failures (default 3)")
    p.add_argument("--not-before", help="ISO 8601 time before which the job does not start")
    p.add_argument(
        "--depends-on", type=int, action="append", help="job id that must complete first"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("list", help="jobs, newest first")
    p.add_argument("--status", help="pending, running, completed, failed or cancelled")
    p.add_argument("--type", help="only jobs of this type")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one job and the tail of its log")
    p.add_argument("job_id", type=int)
    p.add_argument("--lines", type=int, default=20, help="log lines to show (default 20)")
    p.set_defaults(func=cmd_show)

    for name, func, text in (
        ("cancel", cmd_cancel, "cancel a pending or running job"),
        ("retry", cmd_retry, "queue a failed or cancelled job again"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", type=int)
        p.set_defaults(func=func)

    p = sub.add_parser("decisions", help="retraining decisions and their reasons")
    p.add_argument("model", nargs="?", help="only this model name (NAME or NAME@TAG)")
    p.set_defaults(func=cmd_decisions)
