"""The one training loop. Every kiln entry point ends here.

``train_loop_per_worker`` is what Ray Train's ``TorchTrainer`` runs: in the driver
process when ``num_workers=0`` (Ray Train local mode), or in each of N worker actors
with DDP otherwise. It reads top to bottom:

    setup:      seed -> model (DDP) -> optimizer/scheduler -> data shards -> resume
    for epoch:  hooks.on_epoch_start
                TrainingLoop.run_epoch     (steps: forward, loss, backward, clip, step)
                ValidationLoop.run_epoch
                all-reduce sums -> metrics are means over every rank's samples
                hooks.on_validation_end / on_epoch_end   (every rank, same metrics)
                early-stop decision (agreed across ranks)
                rank 0: checkpoint (snapshot now, write in the background)
                ray.train.report(metrics)  (every rank: it is a barrier; paced, below)
    teardown:   wait for checkpoint writes; rank 0 returns the run summary

Its only input is a picklable :class:`WorkerPlan`; it never opens a database.

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

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import TaskSpec, TrainingConfig
from kiln.engine.callbacks import (
    CallbackBase,
    CallbackList,
    EarlyStoppingCallback,
    HookDispatcher,
    TrainingHooks,
)
from kiln.engine.checkpoint import (
    CheckpointManager,
    load_checkpoint_state,
    resolve_checkpoint,
    saves_trainable_only,
)
from kiln.engine.gradients import GradientAccumulator, GradientMonitor
from kiln.engine.loops import TrainingLoop, ValidationLoop, metrics_from_sums
from kiln.engine.loss import get_loss_strategy, loss_for_task
from kiln.engine.optim import Precision, build_optimizer, build_scheduler
from kiln.engine.seed import set_random_seed, set_rng_state


@dataclass
class WorkerPlan:
    """Everything a worker needs, as plain picklable values."""

    config: TrainingConfig
    task: TaskSpec
    model_factory: Callable[[], nn.Module]
    checkpoint_dir: str
    data: str  # "ray": Ray Data shards; "memory": the arrays below; "torch": the DataLoaders
    num_train_rows: int
    cache_shards: bool = True
    loaders: dict[str, Any] | None = None
    arrays: dict[str, tuple[Any, Any]] | None = None
    hooks: list[Any] = field(default_factory=list)
    resume_from: str | None = None
    checkpoint_metadata: dict[str, Any] = field(default_factory=dict)
    report_checkpoints: bool = False  # in a Tune trial: every epoch's checkpoint goes to Tune


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point: ``loop_config = {"plan": WorkerPlan}``."""
    plan: WorkerPlan = loop_config["plan"]
    cfg, task = plan.config, plan.task
    import ray.train
    import ray.train.torch

    rank, world_size = world()
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

    # ---- setup -------------------------------------------------------------
    set_random_seed(cfg.random_seed, cfg.deterministic)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    model = plan.model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    # Resume: an explicit checkpoint, else this run's own latest (a restart after a failure).
    resume = plan.resume_from
    if resume is None and rank == 0:
        resume = _latest_or_none(plan.checkpoint_dir)
    resume = _broadcast(resume, distributed)
    restored = load_checkpoint_state(resume) if resume else None
    if restored is not None:  # before DDP wraps it: every rank loads
        model.load_state_dict(restored[0], strict=not saves_trainable_only(model))
    if cfg.compile_mode:
        model = torch.compile(model, mode=cfg.compile_mode)
    model = ray.train.torch.prepare_model(model) if distributed else model.to(device)
    train_batches, val_batches, batches_per_epoch = _data_for_rank(plan, device, world_size)

    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, math.ceil(cfg.max_steps / cfg.gradient_accumulation_steps))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    precision = Precision.from_config(cfg, device)
    scaler = precision.make_scaler()
    # loss="model": the model computes its own loss from dict batches (model(**batch).loss).
    loss = (
        None
        if cfg.loss == "model"
        else get_loss_strategy(cfg.loss or loss_for_task(task.task_type))
    )
    if loss is not None and task.task_type == "language_modeling" and task.pad_token_id is not None:
        loss = get_loss_strategy("language_modeling", pad_token_id=task.pad_token_id)
    accumulator = GradientAccumulator(cfg.gradient_accumulation_steps, cfg.max_grad_norm)
    columns = {"input_column": task.input_column, "label_column": task.label_column}
    grad_monitor = (
        GradientMonitor(check_interval=cfg.gradient_check_interval)
        if cfg.gradient_check_interval
        else None
    )
    train_loop = TrainingLoop(
        accumulator,
        grad_monitor,
        loss,
        cfg.max_grad_norm,
        precision=precision,
        task_type=task.task_type,
        log_every_n_steps=cfg.log_every_n_steps,
        max_steps=cfg.max_steps,
        **columns,
    )
    val_loop = ValidationLoop(loss, precision=precision, task_type=task.task_type, **columns)

    # In-process runs call the user's own hook objects; worker actors get pickled copies.
    hooks = _Hooks(list(plan.hooks), cfg, model, optimizer, rank, world_size)
    manager = (
        CheckpointManager(
            plan.checkpoint_dir,
            keep_best_k=cfg.keep_best_k,
            keep_last_n=cfg.keep_last_n,
            monitor=cfg.monitor,
            mode=cfg.mode,
            save_interval_epochs=cfg.save_every_n_epochs,
        )
        if rank == 0
        else None
    )

    to_tune = plan.report_checkpoints and _in_tune()
    reporter = _ReportPacer(cfg.report_interval_s, distributed)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if restored is not None:
        _, train_state, meta = restored
        configured = _Hyperparameters.read(optimizer, scheduler)
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None and train_state.get(name) is not None:
                obj.load_state_dict(train_state[name])
        configured.apply(optimizer, scheduler)
        set_rng_state(train_state["rng"])
        extra = meta.get("user", {})
        start_epoch = int(meta["epoch"])
        history = list(extra.get("history", []))
        train_loop.global_step = int(extra.get("global_step", 0))
        hooks.restore(extra.get("callbacks"))

    # ---- epochs ------------------------------------------------------------
    hooks.training_start()
    stopped_early = False
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        hooks.epoch_start(epoch)
        checks_before = grad_monitor.check_count if grad_monitor is not None else 0
        train = train_loop.run_epoch(
            epoch,
            model,
            train_batches(epoch),
            optimizer,
            scheduler,
            device,
            metrics_callback=hooks.batch_end if hooks.wants_batch_end else None,
            scaler=scaler,
        )
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics.update(_reduce(train.sums, train_loop, "train", distributed))
        if val_batches is not None:
            val = val_loop.run_epoch(
                epoch, _for_validation(model, distributed), val_batches(epoch), device
            )
            val_metrics = _reduce(val.sums, val_loop, "val", distributed)
            if loss is None and task.task_type == "language_modeling":  # token cross-entropy
                val_metrics["val_perplexity"] = math.exp(min(val_metrics["val_loss"], 50.0))
            metrics.update(val_metrics)
            hooks.validation_end(val_metrics)
        metrics["learning_rate"] = train.learning_rate
        metrics["epoch_duration_seconds"] = train.epoch_duration_seconds
        metrics["global_step"] = train_loop.global_step
        if "train_tokens_per_s" in train.metrics:  # this rank's rate; ranks run in step
            metrics["train_tokens_per_s"] = train.metrics["train_tokens_per_s"] * world_size
        metrics["timestamp"] = time.time()
        if train_loop.last_grad_norm is not None:
            metrics["grad_norm"] = float(train_loop.last_grad_norm)
        if grad_monitor is not None:  # gradients are all-reduced: every rank sees the same
            metrics.update(_gradient_health(grad_monitor, checks_before))
        if train.step_log:
            metrics["steps"] = train.step_log
        hooks.epoch_end(epoch, metrics)
        stop = _agree(hooks.stop_training, distributed)
        history.append(metrics)
        done = train_loop.reached_max_steps  # max_steps reached: the run is complete
        last = stop or done or epoch == cfg.epochs
        saved = None
        if manager is not None and (to_tune or manager.should_save(epoch) or last):
            extra = {
                **plan.checkpoint_metadata,
                "history": history,
                "global_step": train_loop.global_step,
                "callbacks": hooks.state(),
                "world_size": world_size,
            }
            saved = manager.save_checkpoint(
                epoch,
                _scalars(metrics),
                _unwrap(model),
                optimizer,
                scheduler,
                metadata=extra,
                scaler=scaler,
                blocking=to_tune,  # Tune copies the directory during the report
            )
        if to_tune or reporter.due(last):
            _report(_scalars(metrics), saved.path if to_tune and saved is not None else None)
        if stop:
            stopped_early = True
            break
        if done:
            break

    # ---- teardown ----------------------------------------------------------
    hooks.training_end()
    if manager is None:
        return None
    manager.wait()
    manager.close()
    return {
        "history": history,
        "stopped_early": stopped_early,
        "world_size": world_size,
        "best_checkpoint": manager.get_best_checkpoint(),
        "latest_checkpoint": manager.get_latest_checkpoint(),
        "checkpoints": [c.path for c in manager.checkpoints],
        "resumed_from": resume,
    }


# ---------------------------------------------------------------------- data
def _data_for_rank(plan: WorkerPlan, device: torch.device, world_size: int):
    """Return (train_batches(epoch), val_batches(epoch) or None, train batches per epoch).

    The batch count plans the LR schedule, so it comes from what this rank iterates: a
    user's DataLoader has its own batch size, which need not be ``config.batch_size``.
    """
    cfg = plan.config
    if plan.data == "torch":
        import ray.train.torch

        loaders = dict(plan.loaders or {})
        if not _in_tune():  # in-process in a Tune trial: one rank, nothing to shard
            for name, loader in loaders.items():
                shard = _val_shard(loader, world_size) if name == "val" else None
                loaders[name] = (
                    shard if shard is not None else ray.train.torch.prepare_data_loader(loader)
                )
        train = loaders["train"]
        try:
            batches = len(train)  # sampler-aware: this rank's batches
        except TypeError:  # an IterableDataset has no length
            rows = math.ceil(plan.num_train_rows / world_size)
            batches = math.ceil(rows / (getattr(train, "batch_size", None) or cfg.batch_size))
        return (
            _loader_epochs(train),
            (_loader_epochs(loaders["val"]) if "val" in loaders else None),
            max(1, batches),
        )

    if plan.data == "memory":
        rank = _rank()
        parts = {
            name: _CachedShard(
                _rank_rows(x, rank, world_size, equal=name == "train"),
                _rank_rows(y, rank, world_size, equal=name == "train"),
                cfg.batch_size,
                cfg.random_seed,
                shuffle=name == "train",
            )
            for name, (x, y) in (plan.arrays or {}).items()
        }
        return _cached_epochs(parts)

    import ray.train

    shards = {"train": ray.train.get_dataset_shard("train")}
    with contextlib.suppress(KeyError, AssertionError, ValueError):
        shards["val"] = ray.train.get_dataset_shard("val")
    columns = (plan.task.input_column, plan.task.label_column)
    if plan.cache_shards:
        # In-memory sources are not split by Ray (see trainer._fit): every rank reads the
        # whole dataset in order and keeps its own rows, as the memory path does.
        rank = _rank()
        parts = {
            name: _CachedShard.read(
                shard,
                columns,
                cfg.batch_size,
                cfg.random_seed,
                shuffle=name == "train",
                rank=rank,
                world_size=world_size,
            )
            for name, shard in shards.items()
        }
        return _cached_epochs(parts)
    rows = math.ceil(plan.num_train_rows / world_size)

    def stream(name: str, shuffle: bool) -> Callable[[int], Iterator[Any]]:
        def epoch_batches(epoch: int) -> Iterator[Any]:
            return iter(
                shards[name].iter_torch_batches(
                    batch_size=cfg.batch_size,
                    local_shuffle_buffer_size=max(cfg.batch_size * 8, 1024) if shuffle else None,
                    local_shuffle_seed=cfg.random_seed + epoch if shuffle else None,
                )
            )

        return epoch_batches

    batches = max(1, math.ceil(rows / cfg.batch_size))
    return stream("train", True), (stream("val", False) if "val" in shards else None), batches


def _rank_rows(a: Any, rank: int, world_size: int, *, equal: bool) -> torch.Tensor:
    """This rank's rows (every world_size-th). ``equal`` drops the remainder so every rank
    runs the same number of training steps (each DDP step is a collective), as Ray Data's
    equal split does."""
    t = torch.as_tensor(a)
    if equal:
        t = t[: len(t) // world_size * world_size]
    return t[rank::world_size]


def _cached_epochs(parts: dict[str, _CachedShard]):
    """(train_batches(epoch), val_batches(epoch) or None, train batches per epoch)."""
    val = parts.get("val")  # not `if val`: a rank may hold no validation rows (len 0)
    return (
        parts["train"].epoch,
        (val.epoch if val is not None else None),
        parts["train"].num_batches,
    )


def _val_shard(loader: Any, world_size: int) -> Any:
    """This rank's validation samples (every world_size-th), without padding.

    ``prepare_data_loader`` adds a ``DistributedSampler``, which repeats samples so
    every rank gets as many; validation sums would then count those twice. Ranks may
    validate different numbers of batches: validation runs no collective per batch.
    Returns None (use ``prepare_data_loader``) for one rank, an iterable dataset, or a
    loader with its own batch sampler.
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset

    dataset = loader.dataset
    if world_size <= 1 or isinstance(dataset, IterableDataset) or loader.batch_size is None:
        return None
    rank = _rank()
    return DataLoader(
        Subset(dataset, range(rank, len(dataset), world_size)),
        batch_size=loader.batch_size,
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def _loader_epochs(loader: Any) -> Callable[[int], Any]:
    def epoch_batches(epoch: int) -> Any:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return loader

    return epoch_batches


class _CachedShard:
    """A rank's rows kept as tensors and reshuffled per epoch.

    The epoch order depends only on (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, *, shuffle: bool
    ) -> None:
        self.x, self.y = x, y
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle

    @classmethod
    def read(
        cls,
        shard: Any,
        columns: tuple[str, str],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> _CachedShard:
        """Read a Ray Data iterator once (``iter_torch_batches``) and keep this rank's rows.

        ``world_size > 1`` means the iterator holds every row (an unsplit dataset): the
        rank keeps every world_size-th, training rows trimmed so ranks step equally.
        """
        xs, ys = [], []
        for batch in shard.iter_torch_batches(batch_size=8192):
            xs.append(batch[columns[0]])
            ys.append(batch[columns[1]])
        x = torch.cat(xs) if xs else torch.empty(0)
        y = torch.cat(ys) if ys else torch.empty(0)
        if world_size > 1:
            x = _rank_rows(x, rank, world_size, equal=shuffle)
            y = _rank_rows(y, rank, world_size, equal=shuffle)
        return cls(x, y, batch_size, seed, shuffle=shuffle)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_batches(self) -> int:
        """Batches per epoch (at least 1, so an empty shard still plans a schedule)."""
        return max(1, math.ceil(len(self) / self.batch_size))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        if self.shuffle:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            x, y = self.x[order], self.y[order]
        else:
            x, y = self.x, self.y
        for start in range(0, n, self.batch_size):
            yield x[start : start + self.batch_size], y[start : start + self.batch_size]


# ---------------------------------------------------------------------- ranks
def _in_tune() -> bool:
    """True in-process in a Ray Tune trial, where ``ray.train.get_context()`` raises."""
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    return bool(_in_tune_session())


def world() -> tuple[int, int]:
    """(rank, world size); an in-process run inside a Tune trial is rank 0 of 1."""
    if _in_tune():
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _rank() -> int:
    return world()[0]


def _reduce(sums: torch.Tensor, loop: Any, prefix: str, distributed: bool) -> dict[str, float]:
    if distributed:
        sums = sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return metrics_from_sums(sums, loop.classification, loop.regression, prefix)


def _agree(flag: bool, distributed: bool) -> bool:
    """True when any rank wants to stop (ranks must leave the loop together)."""
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _broadcast(value: Any, distributed: bool) -> Any:
    if not distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "steps"}


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
        self, hooks: list[Any], cfg: TrainingConfig, model, optimizer, rank: int, world_size: int
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
        self.wants_batch_end = any(
            type(cb).on_batch_end is not CallbackBase.on_batch_end
            for cb in self.callbacks.callbacks
        ) or any(_overrides(h, "on_batch_end") for h in self.hooks.hooks)
        self.epochs = cfg.epochs

    @property
    def stop_training(self) -> bool:
        return self.callbacks.stop_training or self.hooks.stop_training

    def training_start(self) -> None:
        self.hooks.on_training_start()
        self.callbacks.on_train_begin({"epochs": self.epochs})

    def epoch_start(self, epoch: int) -> None:
        self.hooks.on_epoch_start(epoch)
        self.callbacks.on_epoch_begin(epoch, {})

    def batch_end(self, loss: float, batch_idx: int) -> None:
        self.hooks.on_batch_end(batch_idx, loss)
        self.callbacks.on_batch_end(batch_idx, {"loss": loss})

    def validation_end(self, metrics: dict[str, float]) -> None:
        self.hooks.on_validation_end(dict(metrics))

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.hooks.on_epoch_end(epoch, _scalars(metrics))
        self.callbacks.on_epoch_end(epoch, _scalars(metrics))

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
