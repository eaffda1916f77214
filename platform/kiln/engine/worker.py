"""The one training loop. Every kiln entry point ends here.

``train_loop_per_worker`` is what Ray Train's ``TorchTrainer`` runs: in the driver
process when ``num_workers=0`` (Ray Train local mode), or in each of N worker actors
with DDP otherwise. It reads top to bottom:

    setup:      seed -> model (DDP, or FSDP: strategy.py) -> optimizer/scheduler
                (names or the user's factories) -> data shards -> resume
    for epoch:  hooks.on_epoch_start
                TrainingLoop.run_epoch     (steps: forward, loss, backward, clip, step)
                  every eval_every_n_steps optimizer steps: validate (history "evals")
                  every save_every_n_steps optimizer steps: rank 0 checkpoints mid-epoch
                ValidationLoop.run_epoch
                all-reduce sums -> metrics are means over every rank's samples
                custom metrics (Trainer(metrics=)): synchronised over ranks the same way
                hooks.on_validation_end / on_epoch_end   (every rank, same metrics;
                                                          numbers they add join the record)
                early-stop decision (agreed across ranks)
                rank 0: checkpoint (snapshot now, write in the background);
                fsdp: every rank writes its shards (sharded_checkpoint.py)
                ray.train.report(metrics)  (every rank: it is a barrier; paced, below)
                  worker actors, on a checkpoint epoch: rank 0 writes the checkpoint
                  to node-local staging, every rank reports it (Ray Train uploads it to
                  storage), then rank 0 commits the manifest there (_publish_checkpoint)
    teardown:   wait for checkpoint writes; rank 0 returns the run summary

Its only input is a picklable :class:`WorkerPlan`; it never opens a database.

A mid-epoch checkpoint records the epoch, the batches trained, the epoch's running
sums and the data order's random state; resuming from it skips those batches and
continues at exactly the next one (:mod:`kiln.engine.steps`).

A resumed run takes its learning rate, weight decay and momentum from its config:
the checkpoint restores the optimizer's moments and the schedule's step, then each
param group gets ``lr = config.learning_rate * schedule(step)`` and the weight decay
and momentum ``build_optimizer`` gives it. With the checkpoint's own config this
changes nothing; with a new one (a PBT trial cloning another's checkpoint, or a user
resuming with other settings) the new values take effect from the first step.

In-process inside a Ray Tune trial with ``WorkerPlan.report_checkpoints`` (what PBT
needs), rank 0 checkpoints every epoch, waits for the write, and hands that epoch's
directory to Tune with the report.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import TaskSpec, TaskType, TrainingConfig
from kiln.engine import strategy as _strategy  # ddp | fsdp, activation checkpointing
from kiln.engine.callbacks import (
    CallbackBase,
    CallbackList,
    EarlyStoppingCallback,
    HookDispatcher,
    TrainingHooks,
)
from kiln.engine.checkpoint import (
    CheckpointManager,
    CheckpointState,
    resolve_checkpoint,
    saves_trainable_only,
)
from kiln.engine.checkpoint_storage import StagedCheckpoints, is_uri, local_copy
from kiln.engine.custom_metrics import EpochMetrics, MetricSet, added_metrics
from kiln.engine.custom_optim import make_optimizer, make_scheduler
from kiln.engine.data_plan import DataKind
from kiln.engine.gradients import GradientAccumulator, GradientMonitor
from kiln.engine.loops import TrainingLoop, ValidationLoop, metrics_from_sums
from kiln.engine.loss import LOSSES, get_loss_strategy, loss_for_task
from kiln.engine.optim import Precision
from kiln.engine.progress import EpochProgress, count_batches
from kiln.engine.seed import set_random_seed, set_rng_state
from kiln.engine.sharded_checkpoint import (  # strategy="fsdp"
    load_sharded,
    read_resume_state,
    save_sharded,
)
from kiln.engine.shards import _in_tune, broadcast, data_for_rank, world
from kiln.engine.steps import (
    EPOCH_DATA_KEY,
    MID_EPOCH_KEY,
    EpochPosition,
    StepSchedule,
    epoch_batches,
)
from kiln.errors import CheckpointError, ModelConfigError
from kiln.tracking.metrics import AlertConfig, AlertMonitor


@dataclass
class WorkerPlan:
    """Everything a worker needs, as plain picklable values."""

    config: TrainingConfig
    task: TaskSpec
    model_factory: Callable[[], nn.Module]
    checkpoint_dir: str
    data_kind: DataKind  # RAY: Ray Data shards; MEMORY: the arrays below; TORCH: the DataLoaders
    num_train_rows: int
    cache_shards: bool = True
    loaders: dict[str, Any] | None = None
    arrays: dict[str, tuple[Any, Any]] | None = None
    hooks: list[Any] = field(default_factory=list)
    resume_from: str | None = None
    checkpoint_metadata: dict[str, Any] = field(default_factory=dict)
    report_checkpoints: bool = False  # in a Tune trial: every epoch's checkpoint goes to Tune
    losses: dict[str, Any] = field(default_factory=dict)  # losses the user registered by name
    # Trainer(optimizer=, lr_scheduler=, metrics=): the user's own pieces (kiln.engine.custom_*)
    optimizer_factory: Callable[..., Any] | None = None
    lr_scheduler_factory: Callable[..., Any] | None = None
    metrics: MetricSet | None = None
    # In-process runs whose checkpoint_dir is a URI: the driver-local folder they stage in.
    staging_dir: str | None = None


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point: ``loop_config = {"plan": WorkerPlan, "log_level": str}``."""
    from kiln._ray import quiet_ray_logs

    quiet_ray_logs(loop_config.get("log_level"))  # this worker's Ray loggers (kiln console)
    run = _setup(loop_config["plan"])
    run.hooks.training_start()
    for epoch in range(run.start_epoch + 1, run.cfg.epochs + 1):
        metrics = _train_epoch(run, epoch)
        stop = _agree(run.hooks.stop_training, run.distributed)
        done = run.train_loop.reached_max_steps  # max_steps reached: the run is complete
        run.history.append(metrics)
        _save_and_report(run, epoch, metrics, last=stop or done or epoch == run.cfg.epochs)
        if stop:
            run.stopped_early = True
        if stop or done:
            break
    return _finish(run)


@dataclass
class _Run:
    """Everything one rank holds during a run (built by :func:`_setup`)."""

    plan: WorkerPlan
    rank: int
    world_size: int
    distributed: bool
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train_loop: TrainingLoop
    val_loop: ValidationLoop
    grad_monitor: GradientMonitor | None
    train_batches: Callable[[int], Any]
    val_batches: Callable[[int], Any] | None
    hooks: _Hooks
    manager: CheckpointManager | None  # rank 0 writes checkpoints
    reporter: _ReportPacer
    to_tune: bool  # in a Tune trial: each epoch's checkpoint goes to Tune with its report
    resume: str | None
    staged: StagedCheckpoints | None = None  # checkpoints bound for storage (see _open_staging)
    nodes: list[str] = field(default_factory=list)  # each rank's Ray node id, by rank
    alerts: AlertMonitor = field(default_factory=lambda: AlertMonitor(AlertConfig()))
    printed_alerts: set[str] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    stopped_early: bool = False
    sharded: bool = False  # strategy="fsdp": each rank holds shards; every rank checkpoints
    # step-level control inside epochs (kiln.engine.steps)
    batches_per_epoch: int = 0
    steps: StepSchedule = field(default_factory=StepSchedule)
    position: EpochPosition | None = None  # a mid-epoch checkpoint to resume from
    step_evals: list[dict[str, Any]] = field(default_factory=list)  # this epoch's
    epoch_data: dict[str, Any] = field(default_factory=dict)  # this epoch's data state
    save_due: bool = False  # a step checkpoint fell on the epoch's last batch

    @property
    def cfg(self) -> TrainingConfig:
        return self.plan.config


def _setup(plan: WorkerPlan) -> _Run:
    """Seed, model (DDP), data shards, optimizer, step loops, hooks, checkpoint manager;
    then restore from ``plan.resume_from`` or this run's own latest checkpoint."""
    import ray.train.torch

    cfg = plan.config
    rank, world_size = world()
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    set_random_seed(cfg.random_seed, cfg.deterministic)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    model = plan.model_factory()
    if not isinstance(model, nn.Module):
        raise ModelConfigError(
            f"the model factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    staged = _open_staging(plan, rank)
    # Resume: an explicit checkpoint, else this run's own latest (a restart after a failure).
    resume = plan.resume_from
    if resume is None and rank == 0:
        resume = staged.store.latest_ref() if staged else _latest_or_none(plan.checkpoint_dir)
    resume = broadcast(resume, distributed)
    restored = _load_resume(resume) if resume else None  # sharded: no model_state here
    if restored is not None and restored.model_state:
        # before DDP wraps it: every rank loads (an adapter-only checkpoint: not strict)
        try:
            model.load_state_dict(restored.model_state, strict=not saves_trainable_only(model))
        except RuntimeError as exc:  # another architecture: say so, not torch's key dump
            raise CheckpointError(
                f"resume checkpoint {resume!r} holds a model of another shape than this "
                "run's model config (the run it came from used other model settings); "
                "resume with the same model settings, or pass a checkpoint of this model. "
                f"torch said: {str(exc).splitlines()[0]}"
            ) from None
    # activation checkpointing, then FSDP (strategy="fsdp") or DDP; torch.compile between
    model = _strategy.prepare_model(model, cfg, device, distributed)
    train_batches, val_batches, batches_per_epoch = data_for_rank(plan, device, world_size)

    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, math.ceil(cfg.max_steps / cfg.gradient_accumulation_steps))
    optimizer = make_optimizer(model, cfg, plan.optimizer_factory)
    scheduler = make_scheduler(optimizer, cfg, total_steps, plan.lr_scheduler_factory)
    precision = Precision.from_config(cfg, device)
    train_loop, val_loop, grad_monitor = _step_loops(plan, precision)
    run = _Run(
        plan=plan,
        rank=rank,
        world_size=world_size,
        distributed=distributed,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=precision.make_scaler(),
        train_loop=train_loop,
        val_loop=val_loop,
        grad_monitor=grad_monitor,
        train_batches=train_batches,
        val_batches=val_batches,
        # In-process runs call the user's own hook objects; worker actors get copies.
        hooks=_Hooks(
            list(plan.hooks), cfg, model, optimizer, rank, world_size, batches_per_epoch, device
        ),
        manager=_checkpoint_manager(plan, staged) if rank == 0 else None,
        reporter=_ReportPacer(cfg.report_interval_s, distributed),
        to_tune=plan.report_checkpoints and _in_tune(),
        resume=resume,
        sharded=_strategy.is_sharded(model),
        batches_per_epoch=batches_per_epoch,
        steps=StepSchedule(cfg.eval_every_n_steps, cfg.save_every_n_steps),
        staged=staged,
        nodes=_node_ids(distributed),
    )
    if restored is not None:
        _restore(run, restored)
    return run


def _step_loops(
    plan: WorkerPlan, precision: Precision
) -> tuple[TrainingLoop, ValidationLoop, GradientMonitor | None]:
    cfg, task = plan.config, plan.task
    for name, entry in plan.losses.items():  # a worker actor's registry has the built-ins only
        LOSSES.register(name, entry, overwrite=True)
    # loss="model": the model computes its own loss from dict batches (model(**batch).loss).
    loss = (
        None
        if cfg.loss == "model"
        else get_loss_strategy(cfg.loss or loss_for_task(task.task_type))
    )
    is_lm = task.task_type == TaskType.LANGUAGE_MODELING
    if loss is not None and is_lm and task.pad_token_id is not None:
        loss = get_loss_strategy("language_modeling", pad_token_id=task.pad_token_id)
    columns = {"input_column": task.input_column, "label_column": task.label_column}
    grad_monitor = (
        GradientMonitor(check_interval=cfg.gradient_check_interval)
        if cfg.gradient_check_interval
        else None
    )
    train_loop = TrainingLoop(
        GradientAccumulator(cfg.gradient_accumulation_steps, cfg.max_grad_norm),
        grad_monitor,
        loss,
        cfg.max_grad_norm,
        precision=precision,
        task_type=task.task_type,
        log_every_n_steps=cfg.log_every_n_steps,
        max_steps=cfg.max_steps,
        num_classes=task.num_classes,
        **columns,
    )
    val_loop = ValidationLoop(
        loss, precision=precision, task_type=task.task_type, num_classes=task.num_classes, **columns
    )
    return train_loop, val_loop, grad_monitor


def _checkpoint_manager(plan: WorkerPlan, staged: StagedCheckpoints | None) -> CheckpointManager:
    cfg = plan.config
    return CheckpointManager(
        staged.dir if staged is not None else plan.checkpoint_dir,
        keep_best_k=cfg.keep_best_k,
        keep_last_n=cfg.keep_last_n,
        monitor=cfg.monitor,
        mode=cfg.mode,
        save_interval_epochs=cfg.save_every_n_epochs,
        on_error=cfg.on_checkpoint_error,
    )


def _restore(run: _Run, restored: CheckpointState) -> None:
    """Optimizer, schedule, scaler, RNG, epoch, history and hook state of a checkpoint."""
    train_state, meta = restored.train_state, restored.metadata
    configured = _Hyperparameters.read(run.optimizer, run.scheduler)
    # strategy: a sharded checkpoint's model + optimizer come from its shards (any layout);
    # a plain optimizer state goes into a sharded model's optimizer by parameter name.
    assert run.resume is not None  # restored from it
    if not restored.model_state:  # sharded (read_resume_state left the model out)
        with local_copy(run.resume) as folder:
            load_sharded(folder, run.model, run.optimizer)
    elif run.sharded and train_state.get("optimizer") is not None:
        full_optimizer = train_state.pop("optimizer")
        _strategy.load_full_optimizer_state(run.model, run.optimizer, full_optimizer)
    for name, obj in (("optimizer", run.optimizer), ("scheduler", run.scheduler),
                      ("scaler", run.scaler)):  # fmt: skip
        if obj is not None and train_state.get(name) is not None:
            obj.load_state_dict(train_state[name])
    if run.plan.lr_scheduler_factory is None:  # a custom schedule keeps its own restored state
        configured.apply(run.optimizer, run.scheduler)
    set_rng_state(train_state["rng"])
    extra = meta.get("user", {})
    run.start_epoch = int(meta["epoch"])
    run.history = list(extra.get("history", []))
    run.train_loop.global_step = int(extra.get("global_step", 0))
    run.train_loop.optimizer_steps = int(
        extra.get(
            "optimizer_steps",
            run.train_loop.global_step // run.plan.config.gradient_accumulation_steps,
        )
    )
    run.hooks.restore(extra.get("callbacks"))
    run.position = EpochPosition.from_checkpoint(extra, train_state)
    if run.position is not None:  # taken inside an epoch: that epoch is resumed, not redone
        run.start_epoch = run.position.epoch - 1


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One epoch's steps and validation; its metrics, all-reduced, so every rank agrees."""
    hooks, train_loop, monitor = run.hooks, run.train_loop, run.grad_monitor
    hooks.epoch_start(epoch)
    checks_before = monitor.check_count if monitor is not None else 0
    train_custom = _custom_metrics(run, "train")
    position = _resume_position(run, epoch)
    train = train_loop.run_epoch(
        epoch,
        run.model,
        count_batches(
            epoch_batches(
                run.train_batches(epoch),
                run.epoch_data,
                position,
                lookahead=run.cfg.gradient_accumulation_steps > 1,
            ),
            hooks.step_counters,
        ),
        run.optimizer,
        run.scheduler,
        run.device,
        metrics_callback=hooks.batch_end if hooks.wants_batch_end else None,
        scaler=run.scaler,
        on_outputs=train_custom.update if train_custom is not None else None,
        start_batch=position.batches if position is not None else 0,
        start_sums=position.sums if position is not None else None,
        step_end=_step_end(run, epoch) if run.steps.active else None,
    )
    metrics: dict[str, Any] = {"epoch": epoch}
    metrics.update(_reduce(train.sums, train_loop, "train", run.distributed))
    if train_custom is not None:  # a collective: every rank computes, in the same order
        metrics.update(train_custom.compute(run.distributed))
    if run.val_batches is not None:
        val_metrics = _validate(run, epoch, custom=True)
        metrics.update(val_metrics)
        hooks.validation_end(val_metrics)
    if run.step_evals:
        metrics["evals"] = run.step_evals
    metrics["learning_rate"] = train.learning_rate
    metrics["epoch_duration_seconds"] = train.epoch_duration_seconds
    metrics["global_step"] = train_loop.global_step
    if "train_tokens_per_s" in train.metrics:  # this rank's rate; ranks run in step
        metrics["train_tokens_per_s"] = train.metrics["train_tokens_per_s"] * run.world_size
    metrics["timestamp"] = time.time()
    if train_loop.last_grad_norm is not None:
        metrics["grad_norm"] = float(train_loop.last_grad_norm)
    if monitor is not None:  # gradients are all-reduced: every rank sees the same
        metrics.update(_gradient_health(monitor, checks_before))
    if train.step_log:
        metrics["steps"] = train.step_log
    hooks.epoch_end(epoch, metrics)
    raised = run.alerts.observe_row(metrics)  # metrics are all-reduced: ranks agree
    if raised:
        metrics["alerts"] = raised
        if run.rank == 0:
            _print_alerts(raised, run.printed_alerts)
    return metrics


def _save_and_report(run: _Run, epoch: int, metrics: dict[str, Any], *, last: bool) -> None:
    """Rank 0 checkpoints (snapshot now, written in the background); every rank reports."""
    saved = None
    due, run.save_due = run.save_due, False
    # the same on every rank: with storage, every rank reports the checkpoint
    wanted = run.to_tune or epoch % run.cfg.save_every_n_epochs == 0 or last or due
    own_shards = None  # strategy="fsdp" on another node than rank 0: this rank's shards
    if run.sharded and wanted:  # strategy="fsdp": every rank writes its shards
        own_shards = _own_shards_dir(run, epoch)
        saved = _save_sharded(run, epoch, metrics, own_shards)
    elif run.manager is not None and wanted:
        saved = run.manager.save_checkpoint(
            epoch,
            _scalars(metrics),
            _unwrap(run.model),
            run.optimizer,
            run.scheduler,
            metadata=_checkpoint_extra(run),
            scaler=run.scaler,
            step=run.train_loop.global_step,
            # Tune copies the directory during the report; storage gets it right away
            blocking=run.to_tune or run.staged is not None,
        )
    if run.staged is not None and wanted:
        _publish_checkpoint(run, epoch, _scalars(metrics), saved, own_shards=own_shards)
        if run.staged.via_ray:  # the checkpoint's report was this epoch's report
            return
    if run.to_tune or run.reporter.due(last):
        checkpoint = saved.path if run.to_tune and saved is not None else None
        _report(_scalars(metrics), checkpoint)


def _own_shards_dir(run: _Run, epoch: int) -> Path | None:
    """A folder on this rank's node for its shards when rank 0's staging folder is on
    another node (None: it writes into rank 0's folder, as every rank on rank 0's node does).
    """
    if run.staged is None or run.rank == 0 or run.nodes[run.rank] == run.nodes[0]:
        return None
    return run.staged.root / f"shards-epoch_{epoch:04d}-{uuid.uuid4().hex[:8]}"


def _save_sharded(run: _Run, epoch: int, metrics: dict[str, Any], own_dir: Path | None) -> Any:
    """strategy="fsdp": every rank writes its shards (DCP), rank 0 publishes the checkpoint
    (and gets its metadata back; other ranks None)."""
    extra = {**_checkpoint_extra(run), "strategy": "fsdp"}
    return save_sharded(
        run.manager,
        epoch,
        _scalars(metrics),
        run.model,
        run.optimizer,
        run.scheduler,
        extra,
        scaler=run.scaler,
        on_error=run.cfg.on_checkpoint_error,
        blocking=run.to_tune or run.staged is not None,  # its folder is read right after
        own_dir=own_dir,
    )


def _finish(run: _Run) -> dict[str, Any] | None:
    """Hooks' end; rank 0 waits for its checkpoint writes and returns the run summary."""
    run.hooks.training_end()
    manager = run.manager
    if manager is None:
        if run.staged is not None:
            run.staged.close()
        return None
    manager.wait()
    manager.close()
    where = _storage_ref(run.staged)
    for failed in manager.failed_saves:  # on_checkpoint_error="warn": the history says so
        for row in run.history:
            if row["epoch"] == failed["epoch"]:
                row["checkpoint_error"] = failed["error"]
    summary = {
        "history": run.history,
        "stopped_early": run.stopped_early,
        "world_size": run.world_size,
        "best_checkpoint": where(manager.get_best_checkpoint()),
        "latest_checkpoint": where(manager.get_latest_checkpoint()),
        "checkpoints": [where(c.path) for c in manager.checkpoints],
        "resumed_from": run.resume,
        "worker_nodes": run.nodes,
    }
    if run.staged is not None:
        run.staged.close()
    return summary


def _reduce(
    sums: torch.Tensor | None, loop: Any, prefix: str, distributed: bool
) -> dict[str, float]:
    assert sums is not None  # every epoch of the step loops returns its sums
    if distributed:
        sums = sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return metrics_from_sums(sums, loop.classification, loop.regression, prefix)


def _custom_metrics(run: _Run, split: str) -> EpochMetrics | None:
    """Fresh accumulators of the user's metrics for one pass over ``split``, or None."""
    if run.plan.metrics is None:
        return None
    return run.plan.metrics.for_epoch(split, run.device)


def _agree(flag: bool, distributed: bool) -> bool:
    """True when any rank wants to stop (ranks must leave the loop together)."""
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------------- checkpoints to storage
def _open_staging(plan: WorkerPlan, rank: int) -> StagedCheckpoints | None:
    """Where this rank stages checkpoints before they go to storage; None when rank 0
    writes straight into ``plan.checkpoint_dir`` (in-process, to a plain path)."""
    via_ray = plan.config.num_workers > 0
    if not via_ray and not is_uri(plan.checkpoint_dir):
        return None
    return StagedCheckpoints.open(plan.checkpoint_dir, rank, via_ray, plan.staging_dir)


def _publish_checkpoint(
    run: _Run,
    epoch: int,
    metrics: dict[str, Any],
    saved: Any,
    name: str | None = None,
    own_shards: Path | None = None,
) -> None:
    """Send this epoch's staged checkpoint to storage, then commit it there (rank 0).

    Worker actors: every rank reports (a barrier), with the folder it staged (rank 0's
    checkpoint; a sharded checkpoint's ranks on other nodes: their own shards), and Ray
    Train uploads each into ``<checkpoints>/epoch_NNNN`` (the folders merge). Once every
    rank is past its upload, rank 0 commits the manifest. In-process: rank 0 uploads
    the folder itself, then commits.
    """
    staged = run.staged
    assert staged is not None
    folder = saved.path if saved is not None else None  # None: not saved ("warn") or rank > 0
    if run.sharded and len(set(run.nodes)) > 1:  # ranks with shards of their own (all agree)
        # their shards go up only with rank 0's checkpoint (its save may have failed, "warn")
        kept = broadcast(folder is not None if run.rank == 0 else None, run.distributed)
        if kept and own_shards is not None and own_shards.is_dir():
            folder = own_shards
    if staged.via_ray:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=staged.dir_name(epoch, name),
            delete_local_checkpoint_after_upload=False,  # retention decides, in staging
        )
        run.reporter.last = time.monotonic()
        if run.distributed:
            dist.barrier()  # every rank's files are in storage
        if own_shards is not None:  # uploaded: rank 0's staging folder keeps the checkpoint
            shutil.rmtree(own_shards, ignore_errors=True)
    elif folder:
        staged.upload(folder)
    if run.rank == 0 and folder:
        staged.commit()


def _load_resume(ref: str) -> CheckpointState:
    """The checkpoint to resume from, read from a path or downloaded from a URI (a
    sharded one: its train state and metadata; the shards are read once the model is
    wrapped)."""
    with local_copy(ref) as folder:
        return read_resume_state(folder)


def _storage_ref(staged: StagedCheckpoints | None) -> Callable[[str | None], str | None]:
    """Maps a staged checkpoint's path to where it lives in storage (identity without staging)."""
    if staged is None:
        return lambda path: path
    return lambda path: staged.store.ref(os.path.basename(path)) if path else None


def _node_ids(distributed: bool) -> list[str]:
    """Every rank's Ray node id, by rank (empty without Ray)."""
    import ray

    mine = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    if not distributed:
        return [mine] if mine else []
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [str(n) for n in out]


def _latest_or_none(checkpoint_dir: str) -> str | None:
    from kiln.errors import CheckpointError

    try:
        return str(resolve_checkpoint("latest", checkpoint_dir))
    except CheckpointError:
        return None


def _for_validation(model: nn.Module, distributed: bool) -> nn.Module:
    """The module to validate: DDP's inner module, with rank 0's buffers on every rank.

    Ranks validate different numbers of rows (no padding), possibly none. Through DDP,
    the first forward after training would broadcast buffers (BatchNorm statistics),
    a collective that a rank with no validation rows never joins. One broadcast here,
    which every rank reaches, gives the same buffers without that risk; the next
    training forward broadcasts them from rank 0 anyway.
    """
    if not distributed:
        return model
    inner = getattr(model, "module", model)
    for buffer in inner.buffers():
        dist.broadcast(buffer, src=0)
    return inner


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _gradient_health(monitor: GradientMonitor, checks_before: int) -> dict[str, float]:
    """This epoch's largest per-parameter gradient norm and the run's warning counts."""
    out = {"grad_warnings": float(monitor.warnings), "grad_criticals": float(monitor.criticals)}
    checked = monitor.max_norm_history[checks_before:]
    if checked:  # an epoch shorter than the interval has no check
        out["grad_max_norm"] = max(checked)
    return out


def _print_alerts(raised: list[dict[str, Any]], printed: set[str]) -> None:
    """Print the first alert of each type in a run; later ones are only recorded."""
    for alert in raised:
        if alert["type"] in printed:
            continue
        printed.add(alert["type"])
        print(
            f"alert ({alert['type']}): {alert['message']} (later alerts of this type are "
            "kept in the run's history, not printed)",
            flush=True,
        )


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The epoch's numbers for checkpoints and Ray reports (step logs and alerts stay out)."""
    return {k: v for k, v in metrics.items() if k not in ("steps", "alerts", "evals")}


class _ReportPacer:
    """Decides which epochs go to ``ray.train.report`` when ranks are worker actors.

    In an actor, each report waits until the Ray Train controller's next poll takes the
    previous one (a queue of one, polled every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``),
    so reporting every epoch of a job whose epochs are shorter than the poll interval
    costs about one poll per epoch. Reports are therefore at least ``interval`` seconds
    apart, and the last epoch is always reported. Ranks agree (a report is a barrier):
    an epoch is reported when any rank's clock says it is due. In-process runs (no
    controller poll) and Tune trials (schedulers read every epoch) report every epoch.
    """

    def __init__(self, interval: float | None, distributed: bool) -> None:
        if not distributed:
            interval = 0.0
        elif interval is None:
            interval = _controller_poll_s()
        self.interval, self.distributed = interval, distributed
        self.last = time.monotonic()

    def due(self, last_epoch: bool) -> bool:
        if self.interval <= 0:
            return True
        now = time.monotonic()
        due = _agree(last_epoch or now - self.last >= self.interval, self.distributed)
        if due:
            self.last = now
        return due


def _controller_poll_s() -> float:
    """The Ray Train controller's poll interval, as Ray reads it (propagated to workers)."""
    from ray.train.v2._internal.constants import (
        DEFAULT_HEALTH_CHECK_INTERVAL_S,
        HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    )

    try:
        return max(0.0, float(os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR]))
    except (KeyError, ValueError):
        return float(DEFAULT_HEALTH_CHECK_INTERVAL_S)


def _report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
    """Hand one epoch's metrics to Ray (Tune's session when run in-process in a trial),
    with the epoch's checkpoint directory when Tune asked for checkpoints."""
    if _in_tune():
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)
    else:
        import ray.train

        ray.train.report(metrics)


# ---------------------------------------------------------------------- steps in an epoch
def _validate(run: _Run, epoch: int, custom: bool = False) -> dict[str, float]:
    """One pass over the validation batches, all-reduced (every rank gets the same);
    with ``custom``, the user's own metrics too (Trainer(metrics=), epoch ends only)."""
    assert run.val_batches is not None  # called only for runs with validation data
    model = _for_validation(run.model, run.distributed)
    val_batches = run.val_batches(epoch)
    if run.sharded and run.distributed:  # strategy: each FSDP forward is a collective
        val_batches = _strategy.in_lockstep(
            val_batches,
            lambda b: run.val_loop.run_epoch(epoch, model, [b], run.device),
            run.device,
        )
    val_custom = _custom_metrics(run, "val") if custom else None
    val = run.val_loop.run_epoch(
        epoch,
        model,
        val_batches,
        run.device,
        on_outputs=val_custom.update if val_custom is not None else None,
    )
    val_metrics = _reduce(val.sums, run.val_loop, "val", run.distributed)
    if val_custom is not None:
        val_metrics.update(val_custom.compute(run.distributed))
    if run.val_loop.loss_strategy is None and run.plan.task.task_type == TaskType.LANGUAGE_MODELING:
        val_metrics["val_perplexity"] = math.exp(min(val_metrics["val_loss"], 50.0))
    return val_metrics


def _resume_position(run: _Run, epoch: int) -> EpochPosition | None:
    """Where ``epoch`` resumes (a mid-epoch checkpoint of it), or None: from its start."""
    position, run.position = run.position, None
    if position is not None and position.epoch != epoch:
        position = None
    run.step_evals = list(position.evals) if position is not None else []
    return position


def _step_end(run: _Run, epoch: int) -> Callable[[int, Callable[[], list[float]]], None]:
    """What runs after each optimizer step: step evaluations and mid-epoch checkpoints.

    Both skip the epoch's last step (and the run's last, at ``max_steps``): the epoch's
    own validation and checkpoint follow right after it.
    """

    def step_end(batches_done: int, running: Callable[[], list[float]]) -> None:
        loop, n = run.train_loop, run.train_loop.optimizer_steps
        ending = batches_done >= run.batches_per_epoch or loop.reached_max_steps
        if run.steps.evaluates(n) and run.val_batches is not None and not ending:
            val_metrics = _validate(run, epoch)
            run.model.train()
            run.step_evals.append({"step": loop.global_step, "optimizer_step": n, **val_metrics})
            run.hooks.validation_end({**val_metrics, "step": float(loop.global_step)})
        if run.steps.saves(n):
            if ending:
                run.save_due = True  # the epoch-end checkpoint is this one
                return
            sums = _rank_share(running(), run)  # every rank: an all-reduce
            saved = None
            if run.manager is not None:
                saved = _save_within_epoch(run, epoch, batches_done, sums)
            if run.staged is not None:  # to storage now (every rank: a report)
                step = run.train_loop.global_step
                name = f"epoch_{epoch:04d}_step_{step:07d}"
                progress = {"epoch": epoch, "global_step": step}
                _publish_checkpoint(run, epoch, progress, saved, name)

    return step_end


def _rank_share(sums: list[float], run: _Run) -> list[float]:
    """Running sums averaged over ranks: every rank of a resumed run starts from its share,
    so the epoch's all-reduced metrics count every rank's batches once."""
    if not run.distributed:
        return sums
    t = torch.tensor(sums, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) / run.world_size for v in t]


def _save_within_epoch(run: _Run, epoch: int, batches_done: int, sums: list[float]) -> Any:
    """Rank 0: a checkpoint of epoch ``epoch`` after ``batches_done`` of its batches
    (written in the background, unless it goes to storage next: then its metadata)."""
    assert run.manager is not None
    metrics = metrics_from_sums(
        torch.tensor(sums[:4]), run.train_loop.classification, run.train_loop.regression, "train"
    )
    last_eval = run.step_evals[-1] if run.step_evals else {}
    if last_eval.get("step") == run.train_loop.global_step:
        metrics.update({k: v for k, v in last_eval.items() if k.startswith("val_")})
    position = EpochPosition(epoch, batches_done, sums, list(run.step_evals))
    return run.manager.save_checkpoint(
        epoch,
        {**metrics, "global_step": run.train_loop.global_step},
        _unwrap(run.model),
        run.optimizer,
        run.scheduler,
        metadata={**_checkpoint_extra(run), MID_EPOCH_KEY: position.metadata()},
        scaler=run.scaler,
        step=run.train_loop.global_step,
        blocking=run.staged is not None,
        within_epoch=True,
        extra_state={EPOCH_DATA_KEY: run.epoch_data.get("state")},
    )


def _checkpoint_extra(run: _Run) -> dict[str, Any]:
    """The run's state a checkpoint's metadata carries (history, steps, hook state)."""
    return {
        **run.plan.checkpoint_metadata,
        "history": run.history,
        "global_step": run.train_loop.global_step,
        "optimizer_steps": run.train_loop.optimizer_steps,
        "callbacks": run.hooks.state(),
        "world_size": run.world_size,
    }


# ---------------------------------------------------------------------- resume
_CONFIGURED_KEYS = ("weight_decay", "momentum")


@dataclass
class _Hyperparameters:
    """The optimizer settings the config asked for, read before a checkpoint overwrites them."""

    base_lrs: list[float]
    groups: list[dict[str, Any]]

    @classmethod
    def read(cls, optimizer: torch.optim.Optimizer, scheduler: Any) -> _Hyperparameters:
        groups = [{k: g[k] for k in _CONFIGURED_KEYS if k in g} for g in optimizer.param_groups]
        base = getattr(scheduler, "base_lrs", None)
        base_lrs = list(base) if base else [g["lr"] for g in optimizer.param_groups]
        return cls(base_lrs, groups)

    def apply(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Config values win over the checkpoint's; the restored schedule step is kept."""
        lambdas = getattr(scheduler, "lr_lambdas", None)
        step = getattr(scheduler, "last_epoch", 0)
        for i, (group, configured) in enumerate(
            zip(optimizer.param_groups, self.groups, strict=True)
        ):
            group.update(configured)
            base = self.base_lrs[i]
            group["initial_lr"] = base
            group["lr"] = base * lambdas[i](step) if lambdas else base
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = list(self.base_lrs)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ---------------------------------------------------------------------- hooks
class _Hooks:
    """Dispatches loop events to seed-002 TrainingHooks and seed-001 callbacks alike."""

    def __init__(
        self,
        hooks: list[Any],
        cfg: TrainingConfig,
        model,
        optimizer,
        rank: int,
        world_size: int,
        steps_per_epoch: int | None = None,  # this rank's batches: progress displays
        device: torch.device | None = None,
    ):
        if cfg.early_stopping_patience:
            hooks.append(
                EarlyStoppingCallback(
                    monitor=cfg.monitor,
                    patience=cfg.early_stopping_patience,
                    min_delta=cfg.early_stopping_min_delta,
                    mode=cfg.mode,
                )
            )
        self.callbacks = CallbackList(h for h in hooks if isinstance(h, CallbackBase))
        self.hooks = HookDispatcher([h for h in hooks if not isinstance(h, CallbackBase)])
        self.callbacks.set_context(
            model=model, optimizer=optimizer, rank=rank, world_size=world_size
        )
        progress_hooks = [cb for cb in self.callbacks.callbacks if isinstance(cb, EpochProgress)]
        progress = [cb for cb in progress_hooks if not cb.quiet]  # quiet: epoch events only
        self.wants_batch_end = any(
            type(cb).on_batch_end is not CallbackBase.on_batch_end
            for cb in self.callbacks.callbacks
            if cb not in progress_hooks
        ) or any(_overrides(h, "on_batch_end") for h in self.hooks.hooks)
        # Progress alone must not cost a host sync per step on an accelerator (the loop
        # hands batch_end hooks float(loss)): there it counts batches, without the loss.
        on_accelerator = device is not None and device.type != "cpu"
        self.step_counters = progress if on_accelerator and not self.wants_batch_end else []
        self.wants_batch_end = self.wants_batch_end or bool(progress and not self.step_counters)
        self.epochs = cfg.epochs
        self.steps_per_epoch = steps_per_epoch

    @property
    def stop_training(self) -> bool:
        return self.callbacks.stop_training or self.hooks.stop_training

    def training_start(self) -> None:
        self.hooks.on_training_start()
        self.callbacks.on_train_begin(
            {"epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch}
        )

    def epoch_start(self, epoch: int) -> None:
        self.hooks.on_epoch_start(epoch)
        self.callbacks.on_epoch_begin(epoch, {})

    def batch_end(self, loss: float, batch_idx: int) -> None:
        self.hooks.on_batch_end(batch_idx, loss)
        self.callbacks.on_batch_end(batch_idx, {"loss": loss})

    def validation_end(self, metrics: dict[str, float]) -> None:
        self.hooks.on_validation_end(dict(metrics))
        self.callbacks.on_validation_end(dict(metrics))

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Hooks, then callbacks, see one copy of the epoch's scalars; the numbers they
        add to it land in ``metrics`` (history, checkpoint ranking, reports)."""
        logs = _scalars(metrics)
        self.hooks.on_epoch_end(epoch, logs)
        self.callbacks.on_epoch_end(epoch, logs)
        metrics.update(added_metrics(metrics, logs))

    def training_end(self) -> None:
        self.hooks.on_training_end()
        self.callbacks.on_train_end({})

    def _stoppers(self) -> list[EarlyStoppingCallback]:
        return [cb for cb in self.callbacks.callbacks if isinstance(cb, EarlyStoppingCallback)]

    def state(self) -> list[dict[str, Any]]:
        """Early-stopping state (best, wait) so a resumed run keeps counting."""
        return [{"best": cb.best, "wait": cb.wait} for cb in self._stoppers()]

    def restore(self, state: list[dict[str, Any]] | None) -> None:
        for cb, saved in zip(self._stoppers(), state or [], strict=False):
            cb.best, cb.wait = saved["best"], saved["wait"]


def _overrides(obj: Any, name: str) -> bool:
    """True when ``obj`` has its own ``name`` (not TrainingHooks' no-op)."""
    fn = getattr(type(obj), name, None)
    if fn is None:
        return callable(getattr(obj, name, None))
    return fn is not getattr(TrainingHooks, name, None)
