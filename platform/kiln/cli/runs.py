"""`kiln runs`: list, show, compare, plot and export recorded training runs.

    kiln runs list [--group G] [--status S] [--limit N]
    kiln runs show RUN
    kiln runs compare RUN RUN... [--metric NAME ...] [--agg last|min|max|mean]
    kiln runs plot RUN [--metric NAME ...] [-o out.png]
    kiln runs export RUN --to mlflow [--tracking-uri URI] [--experiment NAME]

RUN is a run id or a run name (the newest run of that name). The database is
``--db`` or ``$KILN_HOME/kiln.db``. Unknown runs print a message and exit with 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError

if TYPE_CHECKING:
    import pandas as pd

    from kiln.paths import RunPaths

__all__ = ["add_output_options", "db_path", "emit", "print_table", "register", "run_paths"]


def run_paths(args: argparse.Namespace) -> RunPaths:
    """The locations ``kiln`` resolved once from ``--home`` / ``--db`` (see :mod:`kiln.paths`)."""
    from kiln.paths import RunPaths

    paths = getattr(args, "paths", None)
    if paths is None:
        paths = RunPaths.resolve(getattr(args, "home", None), db=getattr(args, "db", None))
        args.paths = paths
    return paths


def db_path(args: argparse.Namespace) -> Path:
    """The SQLite file: ``--db`` when given, else ``<home>/kiln.db``."""
    return run_paths(args).db


def handles_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn kiln's errors into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (KilnError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper


def _console() -> Any:
    from rich.console import Console

    # $COLUMNS, else the terminal's width; 120 columns for a pipe or a file.
    width = shutil.get_terminal_size((120, 24)).columns
    return Console(width=width, soft_wrap=False)


def _cell(value: Any) -> str:
    import pandas as pd  # imported lazily: keeps `kiln --help` fast

    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def print_table(
    df: pd.DataFrame, title: str | None = None, *, keep_whole: Sequence[str] = ()
) -> None:
    """Print a DataFrame as a rich table.

    With ``keep_whole`` (a listing's key columns) no cell is wrapped: columns that do not
    fit the width are left out from the right, and a note says how many.
    """
    from rich.table import Table

    console = _console()
    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    columns = [str(c) for c in df.columns]
    hidden = 0
    if keep_whole:
        widths = [max([len(c), *(len(r[i]) for r in cells)]) + 3 for i, c in enumerate(columns)]
        while len(columns) > 1 and sum(widths) + 1 > console.width:
            if columns[-1] in keep_whole:
                break
            columns, widths, hidden = columns[:-1], widths[:-1], hidden + 1
            cells = [r[: len(columns)] for r in cells]
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=bool(keep_whole))
    for row in cells:
        table.add_row(*row)
    console.print(table)
    if hidden:
        console.print(f"({hidden} more column(s) do not fit this width; --wide shows every column)")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--format table|json|csv`` and ``--wide``, for the listing commands."""
    parser.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="table for people; json or csv for scripts (every column) (default: table)",
    )
    parser.add_argument(
        "--wide", action="store_true", help="every column in the table, not the usual few"
    )


def emit(
    df: pd.DataFrame,
    args: argparse.Namespace,
    columns: Sequence[str],
    *,
    title: str,
    keep_whole: Sequence[str] = (),
) -> None:
    """Write ``df`` as ``args.format`` asks; a table shows ``columns`` unless ``--wide``."""
    fmt = getattr(args, "format", "table")
    if fmt == "json":
        print(df.to_json(orient="records", date_format="iso", default_handler=str))
        return
    if fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
        return
    shown = df if getattr(args, "wide", False) else df[[c for c in columns if c in df.columns]]
    print_table(shown, title=title, keep_whole=keep_whole)


def _open(args: argparse.Namespace) -> Any:
    from kiln.tracking.experiments import ExperimentDB

    return ExperimentDB(db_path(args))


@handles_errors
def cmd_list(args: argparse.Namespace) -> int:
    db = _open(args)
    db.mark_interrupted_runs()  # runs whose driver was killed are not 'running' forever
    df = db.list_runs(group=args.group, status=args.status, limit=args.limit)
    if df.empty:
        print("no runs recorded yet")
        return 0
    if args.format == "table":
        df["started_at"] = df["started_at"].str.slice(0, 16).str.replace("T", " ")
    columns = ["run_id", "run_name", "status", "started_at", "duration_s", "group"]
    emit(df, args, columns, title="runs (newest first)", keep_whole=("run_name",))
    return 0


def _epoch_table(metrics: pd.DataFrame) -> pd.DataFrame:
    per_epoch = metrics[metrics["epoch"].notna()]
    if per_epoch.empty:
        return per_epoch
    wide = per_epoch.pivot_table(index="epoch", columns="name", values="value", aggfunc="last")
    wide = wide.reset_index()
    wide.columns.name = None
    return wide


@handles_errors
def cmd_show(args: argparse.Namespace) -> int:
    import pandas as pd  # imported lazily: keeps `kiln --help` fast

    db = _open(args)
    run = db.get_run(args.run)
    console = _console()
    console.print(f"[bold]run {run['run_id']}[/bold]  {run['run_name']}  status: {run['status']}")
    for key in ("group", "notes", "started_at", "ended_at", "duration_s", "error"):
        if run[key] not in (None, ""):
            console.print(f"  {key}: {run[key]}")
    if run["config"]:
        items = pd.DataFrame(
            [(k, json.dumps(v, default=str)) for k, v in sorted(run["config"].items())],
            columns=["key", "value"],
        )
        print_table(items, title="config")
    if run["params"]:
        items = pd.DataFrame(sorted(run["params"].items()), columns=["param", "value"])
        print_table(items, title="params")
    metrics = db.get_metrics(run["run_id"])
    table = _epoch_table(metrics)
    if not table.empty:
        print_table(table, title="metrics per epoch")
    elif not metrics.empty:
        print_table(pd.DataFrame(sorted(run["metrics"].items()), columns=["metric", "last"]),
                    title="metrics (last values)")  # fmt: skip
    if run["artifacts"]:
        print_table(pd.DataFrame(run["artifacts"]), title="checkpoints and artifacts")
    return 0


@handles_errors
def cmd_compare(args: argparse.Namespace) -> int:
    df = _open(args).compare_runs(args.runs, metrics=args.metric, agg=args.agg)
    print_table(df, title=f"runs compared ({args.agg} value of each metric)")
    return 0


def _plot_names(
    table: pd.DataFrame, wanted: list[str] | None, custom: Sequence[str] = ()
) -> list[str]:
    """The metrics asked for; by default losses, accuracies and the run's custom metrics."""
    names = [c for c in table.columns if c not in ("epoch", "step")]
    if wanted:
        missing = [m for m in wanted if m not in names]
        if missing:
            raise KilnError(f"metrics {missing!r} were not logged per epoch; logged: {names}")
        return list(wanted)
    ours = {f"{split}_{name}" for split in ("train", "val") for name in custom}
    return [n for n in names if "loss" in n.lower() or "acc" in n.lower() or n in ours]


@handles_errors
def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    db = _open(args)
    run = db.get_run(args.run)
    table = _epoch_table(db.get_metrics(run["run_id"]))
    if table.empty:
        raise KilnError(f"run {run['run_id']} ({run['run_name']}) has no per-epoch metrics to plot")
    names = _plot_names(table, args.metric, run["params"].get("custom_metrics") or ())
    if not names:
        raise KilnError(
            f"run {run['run_id']} has no loss or accuracy metrics; pick some with --metric "
            f"from: {[c for c in table.columns if c != 'epoch']}"
        )
    loss = [n for n in names if "loss" in n.lower()]
    rest = [n for n in names if n not in loss]
    acc = [n for n in rest if "acc" in n.lower()]
    panels = (
        {"loss": loss, "other": rest}
        if args.metric
        else {"loss": loss, "accuracy": acc, "custom metrics": [n for n in rest if n not in acc]}
    )
    panels = {k: v for k, v in panels.items() if v}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels.items(), strict=True):
        for col in cols:
            ax.plot(table["epoch"], table[col], marker="o", label=col)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"run {run['run_id']}: {run['run_name']}")
    fig.tight_layout()
    out = Path(args.output or f"run-{run['run_id']}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


@handles_errors
def cmd_export(args: argparse.Namespace) -> int:
    import os

    from kiln.tracking.mlflow_export import export_recorded_run

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # read once, here
    mlflow_id = export_recorded_run(
        db_path(args), args.run, tracking_uri=uri, experiment=args.experiment
    )
    print(f"exported run {args.run} to MLflow run {mlflow_id} ({uri or 'MLflow default'})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``runs`` command and its subcommands to the kiln CLI."""
    runs = subparsers.add_parser("runs", help="list, show, compare, plot and export training runs")
    sub = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="recorded runs, newest first")
    p.add_argument("--group", help="only runs of this group (e.g. a Tune search id)")
    p.add_argument("--status", help="only runs with this status")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    add_output_options(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="a run's config, params, metrics and checkpoints")
    p.add_argument("run", help="run id or name")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("compare", help="runs side by side")
    p.add_argument("runs", nargs="+", help="run ids or names")
    p.add_argument("--metric", action="extend", nargs="+", help="metrics to show (default all)")
    p.add_argument(
        "--agg",
        default="last",
        choices=["last", "min", "max", "mean"],
        help="which value of each metric over the epochs",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="loss and accuracy curves per epoch, as a PNG")
    p.add_argument("run", help="run id or name")
    p.add_argument("--metric", action="extend", nargs="+", help="metrics to plot")
    p.add_argument("-o", "--output", help="PNG path (default run-<id>.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "export", help="send a run (params, metrics, tags, best checkpoint) to MLflow"
    )
    p.add_argument("run", help="run id or name")
    p.add_argument("--to", required=True, choices=["mlflow"], help="where to send it")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="kiln", help="MLflow experiment name")
    p.set_defaults(func=cmd_export)
