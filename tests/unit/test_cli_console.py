"""The console of issue 13: --verbose/--quiet on every command, rank 0's progress events
(bounded rate, ETA, the relay mailbox), the live display on a terminal and plain lines
elsewhere, Ray's loggers kept quiet, and Tune's per-trial lines naming their values."""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle

import pytest

from kiln import _ray
from kiln.cli import apply_verbosity, build_parser, main
from kiln.engine import progress as progress_mod
from kiln.engine.progress import EpochProgress, add_listener, publish, remove_listener


# ---------------------------------------------------------------------- --verbose / --quiet
def _leaf_parsers(parser, path=("kiln",)):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


@pytest.mark.parametrize("flag", ["--verbose", "--quiet"])
def test_every_command_takes_verbose_and_quiet(flag):
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) > 30
    for path, parser in leaves:
        dests = {a.dest for a in parser._actions if flag in a.option_strings}
        assert dests == {flag.lstrip("-")}, f"{' '.join(path)} lacks {flag}"


def test_verbosity_before_or_after_the_command_and_env(monkeypatch):
    monkeypatch.delenv("KILN_LOG_LEVEL", raising=False)
    parser = build_parser()
    for argv in (["--quiet", "train", "x.yaml"], ["train", "x.yaml", "-q"]):
        args = parser.parse_args(argv)
        assert apply_verbosity(args) == "ERROR" and args.quiet and not args.verbose
    args = parser.parse_args(["runs", "list", "--verbose"])
    assert apply_verbosity(args) == "INFO" and args.verbose and not args.quiet
    monkeypatch.setenv("KILN_LOG_LEVEL", "error")  # the env var alone means the same
    args = parser.parse_args(["datasets"])
    assert apply_verbosity(args) == "ERROR" and args.quiet
    monkeypatch.setenv("KILN_LOG_LEVEL", "loud")  # not a level: the default
    assert _ray.log_level() == "WARNING"


def test_verbose_and_quiet_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--verbose", "datasets", "--quiet"])
    assert exc.value.code == 2
    assert "--verbose and --quiet" in capsys.readouterr().err


# ---------------------------------------------------------------------- progress events
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    return clock


@pytest.fixture()
def events():
    seen: list[dict] = []
    add_listener(seen.append)
    yield seen
    remove_listener(seen.append)


def _run_epoch(hook, clock, epoch, steps, step_s=0.001, metrics=None):
    hook.on_epoch_begin(epoch)
    for batch in range(steps):
        clock.now += step_s
        hook.on_batch_end(batch, {"loss": 1.0 / (batch + 1)})
    hook.on_epoch_end(epoch, metrics or {"train_loss": 0.5, "val_accuracy": 0.9})


def test_step_events_are_rate_bounded_and_carry_eta(clock, events):
    hook = EpochProgress(epochs=4)
    hook.on_train_begin({"steps_per_epoch": 1024})
    _run_epoch(hook, clock, 1, 1024, step_s=1 / 1024)  # 1 s: one event per 0.25 s at most
    steps = [e for e in events if e["kind"] == "step"]
    assert len(steps) == 4
    first = steps[0]
    assert first["epoch"] == 1 and first["epochs"] == 4 and first["steps"] == 1024
    assert first["step"] == 256 and first["steps_per_s"] == pytest.approx(1024)
    assert first["loss"] == pytest.approx(1 / 256)
    assert first["eta_s"] == pytest.approx(3.75)  # 3 3/4 epochs left at 1 s an epoch
    epoch = events[-1]
    assert epoch["kind"] == "epoch" and epoch["metrics"]["train_loss"] == 0.5
    assert epoch["line"].startswith("epoch   1/4  train_loss 0.5000  val_accuracy 90.00%")
    assert epoch["eta_s"] == pytest.approx(3.0, rel=0.01)


def test_other_ranks_stay_silent_and_unknown_lengths_are_learned(clock, events):
    quiet = EpochProgress(epochs=2)
    quiet.set_context(rank=1, world_size=2)
    quiet.on_train_begin({})
    _run_epoch(quiet, clock, 1, 500)
    assert events == []
    hook = EpochProgress(epochs=2)
    hook.on_train_begin({})  # a DataLoader without a length: learned after epoch 1
    _run_epoch(hook, clock, 1, 500)
    assert {e["steps"] for e in events if e["kind"] == "step"} == {None}
    assert hook.steps_per_epoch == 500


def test_without_listeners_epoch_lines_go_to_the_kiln_progress_logger(clock):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = progress_mod.progress_logger()
    logger.addHandler(handler)
    progress_mod._announced = False
    try:
        hook = EpochProgress(epochs=1)
        hook.on_train_begin({"steps_per_epoch": 10})
        _run_epoch(hook, clock, 1, 10, step_s=0.1)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "kiln: epoch 1 running: step 3/10 (10.0 steps/s)",  # once: training has started
        "epoch   1/1  train_loss 0.5000  val_accuracy 90.00%  (0.00 s)",
    ]


def test_worker_actors_post_to_the_relay_instead(clock, events):
    posted = []

    class _Method:
        def remote(self, event):
            posted.append(event)

    class _Mailbox:
        post = _Method()

    hook = EpochProgress(epochs=1)
    hook.relay = _Mailbox()
    hook.on_train_begin({"steps_per_epoch": 600})
    _run_epoch(hook, clock, 1, 600)
    assert events == []  # nothing published in this process
    assert [e["kind"] for e in posted][-1] == "epoch" and len(posted) >= 3
    clone = pickle.loads(pickle.dumps(EpochProgress(epochs=3)))  # ships to workers
    assert clone.epochs == 3 and clone.relay is None


def test_mailbox_keeps_every_epoch_and_only_the_newest_step():
    box = _ray.ProgressMailbox()
    for event in ({"kind": "step", "step": 1}, {"kind": "step", "step": 2},
                  {"kind": "epoch", "epoch": 1}, {"kind": "step", "step": 3}):  # fmt: skip
        box.post(event)
    assert box.drain() == [
        {"kind": "step", "step": 2},
        {"kind": "epoch", "epoch": 1},
        {"kind": "step", "step": 3},
    ]
    assert box.drain() == [] and box.flush()


# ---------------------------------------------------------------------- the display
def test_live_display_draws_steps_and_keeps_epoch_lines():
    from rich.console import Console

    from kiln.cli._live import LiveTraining

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with LiveTraining(console, "starting Ray workers") as live:
        publish({"kind": "step", "epoch": 2, "epochs": 30, "step": 21, "steps": 42,
                 "loss": 0.41234, "steps_per_s": 52.31, "eta_s": 72.4})  # fmt: skip
        task = live.progress.tasks[0]
        assert task.description == "epoch 2/30" and task.completed == 21 and task.total == 42
        assert task.fields["steps"] == "21/42 steps"
        assert task.fields["stats"] == "loss 0.4123  52.3 steps/s  ETA 0:01:12"
        publish({"kind": "epoch", "epoch": 2, "epochs": 30, "line": "epoch   2/30  x 1",
                 "eta_s": 5.0})  # fmt: skip
    assert "epoch   2/30  x 1" in out.getvalue()
    assert live not in progress_mod._listeners


def test_no_live_display_off_a_terminal(monkeypatch, capsys):
    from kiln.cli._live import training_display

    with training_display("loading data"):
        assert progress_mod._listeners == []  # plain lines from the logger instead
    with training_display("loading data", quiet=True):
        assert progress_mod._listeners == []
    assert "\x1b[" not in capsys.readouterr().out


# ---------------------------------------------------------------------- Ray's loggers
def test_quiet_ray_logs_levels(monkeypatch):
    _ray.quiet_ray_logs("WARNING")
    assert logging.getLogger("ray.train").level == logging.WARNING
    report_logger = _ray._path_loggers()[0]  # named by its file's path
    assert report_logger.endswith("ray/train/v2/_internal/execution/context.py")
    assert logging.getLogger(report_logger).level == logging.WARNING
    cleaner = "ray.data._internal.progress"  # "Progress bars disabled": kiln disabled them
    assert logging.getLogger(cleaner).level == logging.ERROR
    _ray.quiet_ray_logs("INFO")  # --verbose: Ray's own lines come back, all of them
    assert logging.getLogger("ray.train").level == logging.INFO
    assert logging.getLogger(cleaner).level == logging.INFO
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a user's own, quieter choice
    _ray.quiet_ray_logs("WARNING")
    assert logging.getLogger("ray.tune").level == logging.CRITICAL
    assert logging.getLogger(cleaner).level == logging.ERROR
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def test_cluster_runtime_env_carries_the_level_and_the_train_view():
    assert _ray._cluster_runtime_env("ERROR") == {
        "env_vars": {"KILN_LOG_LEVEL": "ERROR", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
    }


def test_prepare_train_driver_env(monkeypatch):
    for name in ("RAY_TRAIN_ENABLE_STATE_TRACKING", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_ray, "_dashboard_url", "http://127.0.0.1:8265")
    monkeypatch.setattr(_ray, "_started_locally", True)
    _ray.prepare_train_driver(0)  # in-process: nothing to set
    assert "RAY_TRAIN_ENABLE_STATE_TRACKING" not in os.environ
    _ray.prepare_train_driver(2)
    assert os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"  # the dashboard's Train view
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == _ray.DEFAULT_REPORT_POLL_S
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


# ---------------------------------------------------------------------- Tune's lines
def test_tune_trial_lines_name_their_values(capsys, monkeypatch):
    from kiln.cli.tune import live_table

    table = live_table("val_loss", epochs=30)
    table._start = lambda: setattr(table, "console", object())  # not a terminal

    class _Trial:
        trial_id = "a1b2_00001"
        config = {"learning_rate": 0.0123456, "model.hidden": [64]}

    table.on_trial_start(0, [], _Trial())
    table.on_trial_result(0, [], _Trial(), {"epoch": 5, "val_loss": 0.123456, "time_total_s": 3.21})
    table.on_trial_complete(0, [], _Trial())
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "trial a1b2_00001 running: learning_rate=0.01235, model.hidden=[64]  epoch -  val_loss -",
        "trial a1b2_00001 done: learning_rate=0.01235, model.hidden=[64]  epoch 5/30  "
        "val_loss 0.1235  time 3.2 s",
    ]


def test_on_an_accelerator_progress_counts_batches_without_the_loss(clock, events):
    import torch

    from kiln.config import TrainingConfig
    from kiln.engine.progress import count_batches
    from kiln.engine.worker import _Hooks

    cfg = TrainingConfig()
    cpu = _Hooks([EpochProgress(2)], cfg, None, None, 0, 1, 8, torch.device("cpu"))
    assert cpu.wants_batch_end and cpu.step_counters == []  # float(loss) is free on CPU
    hook = EpochProgress(2)
    gpu = _Hooks([hook], cfg, None, None, 0, 1, 8, torch.device("cuda"))
    assert not gpu.wants_batch_end and gpu.step_counters == [hook]  # no sync per step
    gpu.training_start()
    hook.on_epoch_begin(1)
    for _ in count_batches(range(8), gpu.step_counters):
        clock.now += 0.1
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == [3, 6] and {e["loss"] for e in steps} == {None}
    assert steps[0]["steps"] == 8


def test_tune_live_table_shows_each_trials_running_step():
    from rich.console import Console

    from kiln.cli.tune import live_table

    table = live_table("val_loss", epochs=30)
    out = io.StringIO()
    table.console = Console(file=out, force_terminal=True, width=160)
    table.live = type("L", (), {"update": lambda self, t, refresh: setattr(self, "last", t)})()

    class _Trial:
        trial_id = "a1b2_00001"
        config = {"learning_rate": 0.01}

    table.on_trial_start(0, [], _Trial())
    table.on_progress({"kind": "step", "trial": "a1b2_00001", "epoch": 3, "step": 21, "steps": 42})
    table.on_progress({"kind": "step", "trial": "other", "epoch": 1, "step": 1, "steps": 2})
    assert table.rows["a1b2_00001"]["step"] == "21/42 of epoch 3"
    Console(file=out, width=160).print(table.live.last)
    assert "21/42 of epoch 3" in out.getvalue()
    box = _ray.ProgressMailbox()  # steps of two trials do not replace each other
    box.post({"kind": "step", "trial": "a", "step": 1})
    box.post({"kind": "step", "trial": "b", "step": 1})
    box.post({"kind": "step", "trial": "b", "step": 2})
    assert [(e["trial"], e["step"]) for e in box.drain()] == [("a", 1), ("b", 2)]


def test_plain_output_announces_the_first_step_once_per_run():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = progress_mod.progress_logger()
    logger.addHandler(handler)
    progress_mod._announced = False
    try:
        publish({"kind": "step", "epoch": 1, "epochs": 3, "step": 12, "steps": 40,
                 "steps_per_s": 48.0})  # fmt: skip
        publish({"kind": "step", "epoch": 1, "epochs": 3, "step": 24, "steps": 40})
        publish({"kind": "epoch", "epoch": 1, "epochs": 3, "line": "epoch   1/3  x 1"})
        publish({"kind": "step", "epoch": 2, "epochs": 3, "step": 12, "steps": 40})
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "kiln: epoch 1 running: step 12/40 (48.0 steps/s)",
        "epoch   1/3  x 1",
    ]
