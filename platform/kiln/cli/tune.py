"""``kiln tune CONFIG --space SPACE.yaml``: search hyperparameters over kiln runs.

    kiln tune examples/digits_mlp.yaml --space examples/tune_space.yaml --samples 8
    kiln tune examples/digits_mlp.yaml --space examples/tune_space.yaml --resume

CONFIG is a run file as for ``kiln train``; SPACE.yaml maps fields to domains
(``learning_rate: {loguniform: [1.0e-4, 1.0e-1]}``, ``model.hidden: [[64], [128]]``,
``preset: [quick_prototype, baseline]``) and may hold search settings under
``tune:``. Flags override the file. Prints a table of trials as they report and
the winner at the end; ``--resume`` continues an interrupted search.

CONFIG may also be a fine-tuning config (as for ``kiln llm train``): each trial is then
one fine-tuning job, exactly as ``kiln llm tune`` runs it, over dotted keys such as
``hyperparams.learning_rate`` and ``model.lora.r``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from kiln.cli.runs import run_paths
from kiln.cli.train import load_run_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="run file (.yaml/.yml/.json)")
    p.add_argument("--space", required=True, help="search space file (.yaml/.json)")
    p.add_argument("--samples", type=int, help="samples drawn from the space (default 1)")
    p.add_argument("--scheduler", help="asha (default), median, fifo or pbt (in-process trials)")
    p.add_argument("--metric", help="metric that ranks trials (default val_loss)")
    p.add_argument("--mode", choices=("min", "max"), help="min or max (default min)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        dest="max_concurrent_trials",
        help="at most this many trials at once (default: as many as the CPUs hold)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        dest="time_budget_s",
        metavar="SECONDS",
        help="stop the whole search after this many seconds",
    )
    p.add_argument("--name", help="search id (default: generated; --resume: the newest)")
    p.add_argument("--register-as", dest="register_as", help="register the winner's checkpoint")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln._ray import ensure_ray
    from kiln.cli._live import stdout_is_terminal
    from kiln.config.training import read_mapping
    from kiln.llm.config import is_llm_mapping
    from kiln.tune import search
    from kiln.tune.spaces import load_search_file

    if is_llm_mapping(read_mapping(args.config)):
        from kiln.cli.llm import cmd_tune

        return cmd_tune(args)
    config, task = load_run_file(args.config, args.overrides, None)
    space, settings = load_search_file(args.space)
    for key in ("scheduler", "metric", "mode", "max_concurrent_trials", "time_budget_s"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key in ("name", "register_as"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.samples is not None:
        settings["num_samples"] = args.samples
    ensure_ray(args.address)
    metric = settings.get("metric", "val_loss")
    quiet = getattr(args, "quiet", False)
    table = live_table(metric, config.epochs)
    if not quiet:
        print(
            f"kiln: searching {len(space)} field(s) of {config.dataset or 'data'} "
            f"with {settings.get('num_samples', 1)} sample(s), "
            f"scheduler {settings.get('scheduler', 'asha')}",
            flush=True,
        )
    with _trial_steps(table, config.epochs, live=not quiet and stdout_is_terminal()) as hooks:
        try:
            result = search(
                config,
                task,
                None,
                None,
                space,
                resume=args.resume,
                paths=run_paths(args),
                hooks=hooks,
                callbacks=[] if quiet else [table],
                **settings,
            )
        finally:
            table.close()
    print_result(result)
    return 0


@contextlib.contextmanager
def _trial_steps(table: Any, epochs: int, *, live: bool) -> Iterator[list[Any]]:
    """On a terminal: a progress hook for every trial, posting its steps to a mailbox
    this process drains into the live table (the step column). Elsewhere: nothing."""
    if not live:
        yield []
        return
    from kiln.engine.progress import EpochProgress, add_listener, progress_mailbox, remove_listener

    with progress_mailbox() as mailbox:
        hook = EpochProgress(epochs)
        hook.relay = mailbox
        add_listener(table.on_progress)
        try:
            yield [hook]
        finally:
            remove_listener(table.on_progress)


def live_table(metric: str, epochs: int | None = None) -> Any:
    """A Tune callback that keeps a rich table of trials up to date while they run
    (one line per finished trial when stdout is not a terminal, e.g. under Ray Jobs,
    each value named: ``trial ID done: learning_rate=0.01  epoch 5/30  val_loss 0.1234``)."""
    from ray.tune import Callback

    class _Live(Callback):
        def __init__(self) -> None:
            self.metric = metric
            self.epochs = epochs
            self.rows: dict[str, dict[str, Any]] = {}
            self.console: Any = None
            self.live: Any = None

        def __getstate__(self) -> dict[str, Any]:  # Tune saves callbacks with its state
            return {**self.__dict__, "console": None, "live": None}

        def _start(self) -> None:
            from rich.console import Console
            from rich.live import Live

            self.console = Console(file=sys.stdout, width=120)
            if self.console.is_terminal:
                self.live = Live(console=self.console, auto_refresh=False)
                self.live.start()

        def _update(self, trial, status: str, result: dict | None = None) -> None:
            row = self.rows.setdefault(trial.trial_id, {"params": _params(trial.config)})
            row["status"] = status
            row["epochs"] = trial.config.get("epochs", self.epochs)
            if result:
                row["epoch"] = result.get("epoch")
                row["seconds"] = result.get("time_total_s")
                value = result.get(self.metric)
                if isinstance(value, (int, float)):
                    row["last"] = value
            if self.console is None:
                self._start()
            if self.live is None:
                if status != "running" or result is None:
                    line = _fmt_row(row, self.metric)
                    print(f"trial {trial.trial_id} {status}: {line}", flush=True)
                return
            self.live.update(self._table(), refresh=True)

        def _table(self):
            from rich.table import Table

            table = Table(title="trials")
            for col in ("trial", "params", "epoch", "step", self.metric, "time", "status"):
                table.add_column(col)
            for tid, row in self.rows.items():
                last, seconds = row.get("last"), row.get("seconds")
                table.add_row(
                    tid,
                    row["params"],
                    _epoch(row),
                    row.get("step", "-") if row["status"] == "running" else "-",
                    "-" if last is None else f"{last:.4f}",
                    "-" if seconds is None else f"{seconds:.1f} s",
                    row["status"],
                )
            return table

        def on_progress(self, event: dict[str, Any]) -> None:
            """A trial's step event (from its in-process loop): the row's step column."""
            row = self.rows.get(event.get("trial") or "")
            if row is None or event.get("kind") != "step" or self.live is None:
                return
            steps = event.get("steps")
            shown = f"{event['step']}/{steps}" if steps else str(event["step"])
            row["step"] = f"{shown} of epoch {event['epoch']}"
            self.live.update(self._table(), refresh=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._update(trial, "running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._update(trial, "running", result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._update(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._update(trial, "error")

        def close(self) -> None:
            if self.live is not None:
                self.live.stop()

    return _Live()


def print_result(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    frame = result.trials
    table = Table(title=f"search {result.search_id}")
    for col in frame.columns:
        if col not in ("error", "run_id"):
            table.add_column(str(col))
    for _, row in frame.iterrows():
        table.add_row(*[_cell(row[c]) for c in frame.columns if c not in ("error", "run_id")])
    Console(file=sys.stdout, width=160).print(table)
    value = result.best_metrics.get(result.metric)
    print(
        f"winner: trial {result.best_trial_id}  {result.metric}={value:.4f} "
        f"at epoch {result.best_metrics.get('epoch')}"
    )
    searched = [
        c
        for c in frame.columns
        if c not in _FIXED_COLUMNS and not c.startswith(("final_", "best_"))
    ]
    best_row = frame[frame["trial_id"] == result.best_trial_id].iloc[0]
    for key in searched:
        print(f"  {key} = {_cell(best_row[key])}")
    print(f"best checkpoint: {result.best_checkpoint}")
    stopped = int(frame["stopped_early"].sum())
    print(
        f"{len(frame)} trials, {stopped} stopped early, {int(frame['epochs'].sum())} epochs in all"
    )
    if result.model_id is not None:
        print(f"registered model id: {result.model_id}")
    if result.interrupted:
        print("the search was interrupted; continue it with --resume")


_FIXED_COLUMNS = {
    "trial_id", "epochs", "max_epochs", "status", "stopped_early", "run_id", "error",
    "restored_from",
}  # fmt: skip


def _params(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in config.items())


def _fmt_row(row: dict[str, Any], metric: str) -> str:
    """A trial's line with every value named: ``lr=0.01  epoch 5/30  val_loss 0.1234``."""
    last = row.get("last")
    parts = [row["params"], f"epoch {_epoch(row)}", f"{metric} " + _metric(last)]
    if row.get("seconds") is not None:
        parts.append(f"time {row['seconds']:.1f} s")
    return "  ".join(p for p in parts if p)


def _epoch(row: dict[str, Any]) -> str:
    epoch, epochs = row.get("epoch"), row.get("epochs")
    if epoch is None:
        return "-"
    return f"{epoch}/{epochs}" if epochs else str(epoch)


def _metric(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
