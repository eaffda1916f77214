"""Trainer: the driver side of a run.

It assembles a config, a data plan and a Ray Train ``TorchTrainer`` around the one
worker loop (:func:`kiln.engine.worker.train_loop_per_worker`), then hands the
outcome to small objects that record the run and register the model. With
``num_workers=0`` the loop runs in this process (Ray Train local mode); with
``num_workers>=1`` it runs in that many Ray Train worker actors with DDP.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import nn

from kiln._ray import ensure_ray
from kiln.config import TaskSpec, TaskType, TrainingConfig
from kiln.config.modes import MetricMode
from kiln.engine.checkpoint_reader import (
    load_model_state,
    read_metadata,
    resolve_checkpoint,
    saves_trainable_only,
)
from kiln.engine.checkpoint_storage import CheckpointStore, is_uri, local_copy, split_location
from kiln.engine.data_plan import DataPlan, data_profile, plan_data
from kiln.engine.loss import LOSSES
from kiln.engine.worker import WorkerPlan, train_loop_per_worker
from kiln.errors import CheckpointError, ConfigError, ModelConfigError, WorkerDiedError
from kiln.paths import RunPaths

logger = logging.getLogger(__name__)


class _PreparedRun(NamedTuple):
    """What :meth:`Trainer._prepare` resolved before training starts."""

    cfg: TrainingConfig
    plan: DataPlan
    factory: Callable[[], nn.Module]
    model_config: dict[str, Any] | None
    name: str
    dir: Path
    checkpoint_dir: str
    resume: str | None
    worker_plan: WorkerPlan


class Trainer:
    """Train a model on Ray Train and return the run's results (seed 002).

    Args:
        model: an ``nn.Module``, a zero-argument factory returning one, or None to build
            the architecture described by ``training_config.model`` / ``config``.
        config: the architecture config under its older name; prefer ``model_config``.
        training_config: hyperparameters and run settings.
        task_spec: what is predicted; completed from the data where it is silent.
        hooks: a TrainingHooks/CallbackBase object or a list of them (run in the workers).
        device: "cpu" or "cuda" (cuda sets ``use_gpu``).
        storage_path: where run folders and their checkpoints go (Ray Train's
            storage_path); default ``$KILN_HOME/runs``. A local path, a mount every node
            sees (NFS), or a URI pyarrow understands (``s3://bucket/runs``, ``gs://...``,
            ``file:///mnt/runs``); with a URI the driver keeps its own copies of the
            checkpoints it reads (and the export bundle) under ``$KILN_HOME/runs``.
        db_path: experiment/registry database; default ``training_config.tracking_db`` or
            ``$KILN_HOME/kiln.db``.
        data_dir: where local datasets such as MNIST live; default ``$KILN_HOME/datasets``.
        ray_callbacks: extra Ray Train ``RunConfig`` callbacks, e.g. Tune's
            ``TuneReportCallback`` when a Tune trial runs this Trainer with num_workers>=1.
        report_checkpoints: in-process (num_workers=0) inside a Ray Tune trial, checkpoint
            every epoch and hand each checkpoint to Tune with that epoch's report, so a
            scheduler such as PBT can restart trials from it; ignored elsewhere.
        model_config: optional architecture config (dict or SimpleNamespace, e.g.
            ``{"name": "mlp", "hidden": [64]}``) merged into ``training_config.model``.
        verbose: progress from rank 0 (:mod:`kiln.engine.progress`): one line per epoch
            through the ``kiln.progress`` logger, and step events a live display shows.
        optimizer: a name (as ``TrainingConfig.optimizer``) or a factory
            ``(params, cfg) -> torch.optim.Optimizer`` (:mod:`kiln.engine.custom_optim`).
        lr_scheduler: a name (as ``TrainingConfig.lr_scheduler``) or a factory
            ``(optimizer, cfg, total_steps) -> LRScheduler``, stepped per optimizer step.
        metrics: ``torchmetrics`` metrics or callables ``(outputs, targets) -> float``
            (one, a list, or a dict by name), reported per epoch as ``train_<name>`` and
            ``val_<name>`` and usable as ``monitor`` (:mod:`kiln.engine.custom_metrics`).
        paths: every location at once (:class:`kiln.paths.RunPaths`), as an entry point
            resolved them; ``storage_path``, ``db_path``, ``artifacts_dir`` and
            ``data_dir`` override single ones. Artifacts sit next to the database.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module] | None = None,
        config: dict[str, Any] | SimpleNamespace | None = None,
        training_config: TrainingConfig | None = None,
        task_spec: TaskSpec | None = None,
        hooks: Any = None,
        device: str = "cpu",
        *,
        storage_path: str | os.PathLike[str] | None = None,
        db_path: str | os.PathLike[str] | None = None,
        artifacts_dir: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        ray_callbacks: Sequence[Any] = (),
        report_checkpoints: bool = False,
        paths: RunPaths | None = None,
        model_config: dict[str, Any] | SimpleNamespace | None = None,
        verbose: bool = True,
        optimizer: str | Callable[..., Any] | None = None,
        lr_scheduler: str | Callable[..., Any] | None = None,
        metrics: Any = None,
    ) -> None:
        cfg = training_config or TrainingConfig()
        cfg, self.custom = _custom_pieces(cfg, optimizer, lr_scheduler, metrics)
        if config is not None and model_config is not None:
            raise ConfigError(
                "pass the architecture as model_config= or as config= (its older name), not both"
            )
        architecture = model_config if model_config is not None else config
        if architecture is not None:
            extra = (
                vars(architecture)
                if isinstance(architecture, SimpleNamespace)
                else dict(architecture)
            )
            cfg = cfg.replace(model={**cfg.model, **extra})
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda"):
            raise ConfigError(f"device={device!r} must be 'cpu' or 'cuda'")
        if str(device).startswith("cuda") and not cfg.use_gpu:
            cfg = cfg.replace(use_gpu=True)
        if cfg.use_gpu and cfg.num_workers == 0 and not torch.cuda.is_available():
            raise ConfigError(
                "device='cuda' / use_gpu=true, but this machine has no CUDA device; use 'cpu'"
            )
        self.model = model
        self.training_config = cfg.validate()
        self.task_spec = task_spec
        self.hooks = _as_list(hooks)
        if verbose:
            from kiln.engine.progress import EpochProgress

            self.hooks.append(EpochProgress(cfg.epochs))
        self.device = device
        # A URI stays a URI (Path() would turn "s3://b/x" into a local folder "s3:/b/x").
        self.storage_uri = (
            os.fspath(storage_path) if storage_path and is_uri(storage_path) else None
        )
        overrides = dict(
            runs=None if self.storage_uri else storage_path,
            db=db_path or cfg.tracking_db,
            artifacts=artifacts_dir,
            datasets=data_dir,
        )
        self.paths = (paths or RunPaths.resolve()).with_overrides(**overrides)
        self.ray_callbacks = list(ray_callbacks)
        self.report_checkpoints = bool(report_checkpoints)
        self.trained_model: nn.Module | None = None
        self.results: dict[str, Any] | None = None

    def train(
        self, train_data: Any = None, val_data: Any = None, resume_from: str | None = None
    ) -> dict[str, Any]:
        """Run training; return best_epoch, best_val_loss, history, checkpoint_path, ...

        ``checkpoint_path`` and the other paths are folders the driver reads (in storage
        for a path, downloaded copies for a URI); ``checkpoint_location`` is where the
        run's checkpoints live in storage, and ``worker_nodes`` each rank's Ray node id.

        It reads: plan the data and the model -> fit on Ray Train (the worker loop) ->
        score the held-out test rows -> export -> record the run and register the model.
        """
        from kiln.tracking.recorder import RunRecorder

        run = self._prepare(train_data, val_data, resume_from)
        cfg, plan = run.cfg, run.plan
        recorder = RunRecorder(self.paths.db, self.paths.artifacts) if cfg.tracking else None
        run_id = None
        if recorder is not None:
            params = {**_run_params(cfg, plan, run.resume), "checkpoint_dir": run.checkpoint_dir}
            params.update(self.custom.params())
            run_id = recorder.start(run.name, cfg.to_dict(), params, notes=cfg.notes)
        live = _live_tensorboard(cfg, run.dir)  # each epoch's scalars as it ends
        started = time.perf_counter()
        try:
            fitted = _fit(
                run.worker_plan, plan, cfg, run.name, self._location(), self.ray_callbacks
            )
        except BaseException as exc:
            if live is not None:
                live.close()  # a failed run keeps the epochs it wrote
            died = _worker_died(exc, cfg, run.checkpoint_dir)
            if recorder is not None:
                stopped = isinstance(exc, KeyboardInterrupt)
                recorder.finish(run_id, "stopped" if stopped else "failed", error=died or exc)
            if died is not None:
                raise died from exc
            raise
        finally:
            if live is not None:
                from kiln.engine.progress import remove_sink

                remove_sink(live)
        summary = _fetch_checkpoints(fitted.return_value or {}, run.checkpoint_dir, run.dir)
        results = _results(summary, cfg, plan, run.name, run.dir, time.perf_counter() - started)
        results["checkpoint_location"] = run.checkpoint_dir  # in storage (a path or a URI)
        self.trained_model = self._final_model(run.factory, summary.get("latest_checkpoint"))
        best = results["checkpoint_path"]
        if plan.test is not None and best:
            custom = self.custom.metrics
            results["test_metrics"] = _score_test(run.factory, best, plan, cfg, custom)
        if cfg.export_formats and best:
            bundle = _export_best(run.factory, best, run.model_config, plan, cfg, run.dir)
            results["bundle_path"] = str(bundle)
        self._record(run, results, recorder, run_id, live)
        self.results = results
        return results

    def _prepare(self, train_data: Any, val_data: Any, resume_from: str | None) -> _PreparedRun:
        """Everything known before training starts: data, model, run name, resume point."""
        cfg = self.training_config
        if cfg.loss not in (None, "model") and cfg.loss not in LOSSES:
            raise ConfigError(
                f"loss={cfg.loss!r} is not a registered loss; known: {', '.join(LOSSES.names())} "
                "(kiln.engine.loss.register_loss adds yours)"
            )
        if cfg.loss == "model" and self.custom.metrics is not None:
            raise ConfigError(
                f"metrics={self.custom.metrics.names!r} need the model's outputs, but with "
                "loss='model' the model computes its own loss and kiln sees no outputs; use a "
                "loss strategy, or add the numbers from a hook's on_epoch_end"
            )
        plan = plan_data(train_data, val_data, self.task_spec, cfg, data_dir=self.paths.datasets)
        has_val = "val" in (plan.datasets or plan.arrays or plan.loaders or {})
        if not has_val and cfg.monitor.startswith("val_"):
            fallback = "train_" + cfg.monitor[len("val_") :]
            logger.warning("no validation data: monitoring %r instead of %r", fallback, cfg.monitor)
            cfg = cfg.replace(monitor=fallback)
        factory, model_config = self._model_factory(plan)
        name = _unique_run_name(cfg.run_name or plan.task.name)
        run_dir = self._storage() / name  # on the driver: the bundle, copies of URI checkpoints
        checkpoint_dir = _checkpoint_location(cfg.checkpoint_dir, self._location(), name)
        resume = self._resolve_resume(resume_from)
        self._check_epochs_left(resume)
        worker_plan = WorkerPlan(
            config=cfg,
            task=plan.task,
            model_factory=factory,
            checkpoint_dir=checkpoint_dir,
            staging_dir=(
                str(run_dir / "checkpoints")
                if is_uri(checkpoint_dir) and cfg.num_workers == 0
                else None
            ),
            data_kind=plan.data_kind,
            num_train_rows=plan.num_train_rows,
            cache_shards=plan.cache_shards,
            loaders=plan.loaders,
            arrays=plan.arrays,
            hooks=_with_progress(self.hooks, cfg),
            resume_from=resume,
            report_checkpoints=self.report_checkpoints,
            losses=LOSSES.user_entries(),
            optimizer_factory=self.custom.optimizer_factory,
            lr_scheduler_factory=self.custom.lr_scheduler_factory,
            metrics=self.custom.metrics,
            checkpoint_metadata={
                "model_config": model_config,
                "input_shape": list(plan.input_shape),
                "num_outputs": plan.task.output_dim,
                "task_spec": plan.task.to_dict(),
                "training_config": cfg.to_dict(),
                "run_name": name,
            },
        )
        return _PreparedRun(
            cfg,
            plan,
            factory,
            model_config,
            name,
            run_dir,
            checkpoint_dir,
            resume,
            worker_plan,
        )

    def _record(
        self, run: _PreparedRun, results: dict[str, Any], recorder: Any, run_id, live: Any = None
    ) -> None:
        """The run's record (history, checkpoints, profile), TensorBoard, W&B, MLflow, and
        the registration."""
        cfg, plan = run.cfg, run.plan
        if recorder is not None or cfg.register_as:
            results["run_id"] = run_id
        if recorder is not None and run_id is not None:
            recorder.complete(
                run_id,
                "stopped" if results["stopped_early"] else "completed",
                results["history"],
                results["checkpoints"],
                profile=data_profile(plan, self.trained_model),
                final_metrics=results.get("test_metrics"),
            )
        if cfg.wandb_project:
            from kiln.tracking.wandb_log import log_run_to_wandb

            log_run_to_wandb(cfg.wandb_project, run.name, cfg.to_dict(), results["history"])
        mlflow = "mlflow" in cfg.report_to and recorder is not None and run_id is not None
        key = recorder.run_key(run_id) if mlflow else None
        _report_elsewhere(cfg, run.name, results, run_id, self.custom.params(), live, key)
        if recorder is not None or cfg.register_as:
            entry = _register(self.paths, cfg, plan, results, run_id) if cfg.register_as else None
            results["model_id"] = entry.model_id if entry is not None else None
            if entry is not None:
                results["registered"] = f"{entry.name}:{entry.version}"

    # ------------------------------------------------------------------ helpers
    def _model_factory(
        self, plan: DataPlan
    ) -> tuple[Callable[[], nn.Module], dict[str, Any] | None]:
        model = self.model
        if isinstance(model, nn.Module):
            return _ModuleFactory(model), None
        if model is not None:
            if not callable(model):
                raise ModelConfigError(
                    f"model must be an nn.Module, a zero-argument factory, or None; got {type(model).__name__}"
                )
            return model, None
        from kiln.models import validate_model_config

        spec = self.training_config.model_spec() or _default_architecture(plan)
        problems = validate_model_config(
            spec, input_shape=plan.input_shape, num_outputs=plan.task.output_dim
        )
        if problems:
            dataset = plan.dataset_id or plan.task.name
            raise ModelConfigError(
                f"the model does not fit dataset {dataset!r} (input shape {list(plan.input_shape)}, "
                f"{plan.task.output_dim} outputs):\n" + "\n".join(f"  - {p}" for p in problems)
            )
        return _SpecFactory(spec, plan.input_shape, plan.task.output_dim), spec

    def _storage(self) -> Path:
        """The driver's run folders (also the storage, unless storage_path is a URI)."""
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        return self.paths.runs

    def _location(self) -> str:
        """Where run folders and checkpoints go: a URI, or the local runs folder."""
        return self.storage_uri or str(self._storage())

    def _resolve_resume(self, resume_from: str | None) -> str | None:
        if resume_from is None:
            return None
        if resume_from not in ("latest", "best"):
            if is_uri(resume_from):
                return resume_from  # a checkpoint folder in storage; the workers read it
            return str(resolve_checkpoint(resume_from, None))
        cfg = self.training_config
        if cfg.checkpoint_dir:  # the config writes there, so "latest" looks there
            where: Any = cfg.checkpoint_dir
            candidates = [_checkpoint_location(cfg.checkpoint_dir, "", "")]
        elif self.storage_uri:
            where = self.storage_uri
            candidates = _uri_runs_newest_first(self.storage_uri, cfg.run_name)
        else:
            where = self._storage()
            runs = _runs_newest_first(where, cfg.run_name)
            candidates = [str(run / "checkpoints") for run in runs]
        for folder in candidates:
            try:
                if is_uri(folder):
                    return CheckpointStore(folder).resolve(resume_from)
                return str(resolve_checkpoint(resume_from, folder))
            except CheckpointError:
                continue
        named = cfg.run_name
        which = f"no run named {named!r}" if named else "no run"
        raise CheckpointError(
            f"resume_from={resume_from!r}, but {which} under {str(where)!r} "
            "has a checkpoint; pass a checkpoint directory instead"
        )

    def _check_epochs_left(self, resume: str | None) -> None:
        """A checkpoint already at ``epochs`` would train nothing and return no checkpoint."""
        if resume is None:
            return
        try:
            with local_copy(resume) as folder:
                meta = read_metadata(folder)
            epoch = int(meta["epoch"])
        except (CheckpointError, ValueError, KeyError, TypeError):
            return  # loading it in the worker reports what is wrong with it
        if meta.get("user", {}).get("mid_epoch"):
            epoch -= 1  # taken inside that epoch: the rest of it is left to train
        epochs = self.training_config.epochs
        if epoch >= epochs:
            raise ConfigError(
                f"resume_from checkpoint {resume!r} is at epoch {epoch} and epochs={epochs}: "
                f"nothing is left to train; set epochs above {epoch} to continue the run"
            )

    def _final_model(
        self, factory: Callable[[], nn.Module], latest: str | None
    ) -> nn.Module | None:
        if latest is None:
            return None
        state = load_model_state(latest)
        target = self.model if isinstance(self.model, nn.Module) else factory()
        target.load_state_dict(state, strict=not saves_trainable_only(target))
        return target

    def evaluate(self, data: Any, checkpoint: str = "best", **options: Any) -> Any:
        """Loss and the task's metrics of ``checkpoint`` ("best", "latest", a path or
        "NAME@TAG") on ``data``, with this trainer's own ``metrics`` unless ``metrics=``
        says otherwise; options as :func:`kiln.predict.evaluate_checkpoint`."""
        from kiln.predict.evaluation import evaluate_for_trainer

        options.setdefault("metrics", self.custom.metrics)
        return evaluate_for_trainer(self, data, checkpoint, **options)


def _score_test(
    factory: Callable[[], nn.Module],
    checkpoint: str,
    plan: DataPlan,
    cfg: TrainingConfig,
    custom: Any = None,
) -> dict[str, float]:
    """The best checkpoint's loss and accuracy (or MAE), and ``test_<name>`` of the
    custom metrics (a MetricSet or None), on the held-out test rows.

    Scored once, in this process, after the run: no epoch or checkpoint was chosen by it.
    """
    from kiln.engine.loops import ValidationLoop, metrics_from_sums
    from kiln.engine.loss import get_loss_strategy, loss_for_task

    model = factory()  # a fresh copy, also of a user's module
    model.load_state_dict(load_model_state(checkpoint))
    assert plan.test is not None
    x, y = (torch.as_tensor(a) for a in plan.test)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
    task = plan.task
    loop = ValidationLoop(
        get_loss_strategy(cfg.loss or loss_for_task(task.task_type)), task_type=task.task_type
    )
    extra = custom.for_epoch("test", "cpu") if custom is not None else None
    on_outputs = extra.update if extra is not None else None
    sums = loop.run_epoch(0, model, batches, on_outputs=on_outputs).sums
    assert sums is not None  # a validation epoch always returns its sums
    metrics = metrics_from_sums(sums, loop.classification, loop.regression, "test")
    if extra is not None:
        metrics.update(extra.compute(distributed=False))
    metrics["test_rows"] = float(len(x))
    return metrics


def _export_best(
    factory, checkpoint: str, model_config, plan: DataPlan, cfg: TrainingConfig, run_dir: Path
) -> Path:
    """Export the best checkpoint as a bundle in ``<run_dir>/bundle`` (config.export_formats)."""
    from kiln.export import create_export_bundle

    model = factory()
    model.load_state_dict(load_model_state(checkpoint))
    return create_export_bundle(
        model.eval(),
        model_config,
        plan.task.to_dict(),
        cfg.to_dict(),
        run_dir,
        formats=cfg.export_formats,
        input_shape=plan.input_shape,
        bundle_name="bundle",
    )


# ---------------------------------------------------------------------- Ray Train
def _fit(
    worker_plan: WorkerPlan,
    plan: DataPlan,
    cfg: TrainingConfig,
    run_name: str,
    storage: str,
    callbacks: Sequence[Any] = (),
):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    from kiln._ray import (
        log_level,
        prepare_train_driver,
        quiet_ray_logs,
        torch_trainer_class,
        train_logging_config,
    )
    from kiln.engine.progress import relay_progress

    quiet_ray_logs()
    if plan.datasets or cfg.num_workers > 0:
        ensure_ray()
    prepare_train_driver(cfg.num_workers)  # env Ray Train reads at fit(): poll, dashboard
    if cfg.num_workers > 0:
        _check_resources(cfg)
    resources = {"CPU": cfg.cpus_per_worker} if cfg.cpus_per_worker else None
    data_config = DataConfig(datasets_to_split="all")
    if worker_plan.cache_shards:
        # In-memory data (it already sits in the driver): every rank reads all of it in a
        # fixed order and keeps its own rows. No streaming_split, so no split coordinator
        # actor to start (seconds on a small machine), and resumed runs see the same rows.
        data_config = DataConfig(datasets_to_split=[], execution_options=_ordered_execution())
    storage_path, name = storage, run_name
    if cfg.num_workers > 0:  # Ray Train uploads to <storage_path>/<name>/<checkpoint_dir_name>
        storage_path, name, _ = split_location(worker_plan.checkpoint_dir)
    trainer = torch_trainer_class()(  # TorchTrainer, without a cleaner that cannot work
        # Ray types the loop as returning None; rank 0's return value is the run summary.
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config={"plan": worker_plan, "log_level": log_level()},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        datasets=plan.datasets,
        dataset_config=data_config,
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2's RunConfig: logging_config
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks) or None,
            logging_config=train_logging_config(),  # no ray.train INFO lines by default
        ),
    )
    with relay_progress(worker_plan.hooks, cfg.num_workers):  # rank 0's steps -> here
        return trainer.fit()


def _worker_died(exc: BaseException, cfg: TrainingConfig, checkpoint_dir: str):
    """A WorkerDiedError saying how to resume, when a worker process died; else None."""
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError
    if not failures:
        return None
    from ray.exceptions import RayActorError

    dead = sorted(
        rank
        for rank, err in failures.items()  # Ray wraps a dead actor in a health-check error
        if isinstance(err, RayActorError)
        or isinstance(getattr(err, "health_check_failure", None), RayActorError)
    )
    if not dead:
        return None
    ref = CheckpointStore(checkpoint_dir).latest_ref()
    latest = f"latest: {ref.rstrip('/').rpartition('/')[2]}" if ref else "none saved yet"
    budget = (
        "max_failures=0 allows no restart"
        if cfg.max_failures == 0
        else f"its max_failures={cfg.max_failures} restarts were used up"
    )
    return WorkerDiedError(
        f"training worker rank {', '.join(map(str, dead))} died (its process ended without "
        f"an error: kill -9, the OOM killer, a lost node) and {budget}. Checkpoints are in "
        f"{checkpoint_dir!r} ({latest}); resume with `kiln train RUN_FILE --resume "
        "latest` or Trainer.train(..., resume_from='latest'), or set max_failures >= 1 "
        "(-1: no limit) to restart workers automatically"
    )


def _ordered_execution():
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options


def _check_resources(cfg: TrainingConfig) -> None:
    import ray

    total = ray.cluster_resources()
    cpus = (cfg.cpus_per_worker or 1) * cfg.num_workers
    problems = []
    if cpus > total.get("CPU", 0):
        problems.append(
            f"num_workers={cfg.num_workers} x {cfg.cpus_per_worker or 1} CPU needs {cpus:g} CPUs but the "
            f"Ray cluster has {total.get('CPU', 0):g}; lower num_workers or cpus_per_worker, or add nodes"
        )
    if cfg.use_gpu and cfg.num_workers > total.get("GPU", 0):
        problems.append(
            f"use_gpu=true with num_workers={cfg.num_workers} needs {cfg.num_workers} GPUs but the Ray "
            f"cluster has {total.get('GPU', 0):g}; set use_gpu=false or lower num_workers"
        )
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------- storage
def _checkpoint_location(configured: str | None, storage: str, run_name: str) -> str:
    """A run's checkpoints: ``checkpoint_dir`` when set, else ``<storage>/<run>/checkpoints``."""
    if configured:
        return configured if is_uri(configured) else str(Path(configured).expanduser().resolve())
    return f"{storage.rstrip('/')}/{run_name}/checkpoints"


def _fetch_checkpoints(summary: dict[str, Any], location: str, run_dir: Path) -> dict[str, Any]:
    """The run summary with checkpoints the driver can read: a URI's committed
    checkpoints are downloaded into ``<run_dir>/checkpoints`` (paths are read in place)."""
    if not is_uri(location) or not summary.get("latest_checkpoint"):
        return summary
    local = CheckpointStore(location).download(run_dir / "checkpoints")

    def here(ref: str | None) -> str | None:
        return str(local / ref.rstrip("/").rpartition("/")[2]) if ref else None

    return {
        **summary,
        "best_checkpoint": here(summary.get("best_checkpoint")),
        "latest_checkpoint": here(summary.get("latest_checkpoint")),
        "checkpoints": [here(c) for c in summary.get("checkpoints", [])],
    }


def _uri_runs_newest_first(storage: str, run_name: str | None) -> list[str]:
    """The checkpoints locations of the runs under a storage URI, newest manifest first."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    own = re.compile(re.escape(_run_slug(run_name)) + f"({_RUN_SUFFIX})?") if run_name else None
    stores = [
        CheckpointStore(f"{storage.rstrip('/')}/{info.base_name}/checkpoints")
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory
        and (own is None or own.fullmatch(info.base_name))
    ]
    dated = [(store.modified(), store.location) for store in stores]
    return [location for mtime, location in sorted(dated, reverse=True) if mtime > 0]


# ---------------------------------------------------------------------- results
def _results(
    summary: dict,
    cfg: TrainingConfig,
    plan: DataPlan,
    run_name: str,
    run_dir: Path,
    total_time: float,
) -> dict[str, Any]:
    history = summary.get("history", [])
    scored = [h for h in history if cfg.monitor in h]
    best = MetricMode(cfg.mode).best(scored, key=lambda h: h[cfg.monitor])
    if best is None:
        best = history[-1] if history else {}
    final = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if k not in ("steps", "alerts", "evals")
    }
    return {
        "best_epoch": best.get("epoch"),
        "best_val_loss": best.get("val_loss", best.get("train_loss")),
        "best_metric": {cfg.monitor: best.get(cfg.monitor)},
        "total_time": total_time,
        "final_metrics": final,
        "history": history,
        "checkpoint_path": summary.get("best_checkpoint") or summary.get("latest_checkpoint"),
        "latest_checkpoint_path": summary.get("latest_checkpoint"),
        "checkpoints": summary.get("checkpoints", []),
        "world_size": summary.get("world_size", max(1, cfg.num_workers)),
        "stopped_early": summary.get("stopped_early", False),
        "alerts": [a for row in history for a in row.get("alerts", [])],
        "resumed_from": summary.get("resumed_from"),
        "worker_nodes": summary.get("worker_nodes", []),
        "run_name": run_name,
        "run_dir": str(run_dir),
        "task": plan.task.to_dict(),
    }


# ---------------------------------------------------------------------- small pieces
class _CustomPieces(NamedTuple):
    """``Trainer(optimizer=, lr_scheduler=, metrics=)`` beyond names: the user's own."""

    optimizer_factory: Callable[..., Any] | None
    lr_scheduler_factory: Callable[..., Any] | None
    metrics: Any  # kiln.engine.custom_metrics.MetricSet | None

    def params(self) -> dict[str, Any]:
        """What the run record says about them."""
        from kiln.engine.custom_optim import factory_name

        out: dict[str, Any] = {}
        if self.optimizer_factory is not None:
            out["optimizer_factory"] = factory_name(self.optimizer_factory)
        if self.lr_scheduler_factory is not None:
            out["lr_scheduler_factory"] = factory_name(self.lr_scheduler_factory)
        if self.metrics is not None:
            out["custom_metrics"] = self.metrics.describe()
        return out


def _custom_pieces(
    cfg: TrainingConfig, optimizer: Any, lr_scheduler: Any, metrics: Any
) -> tuple[TrainingConfig, _CustomPieces]:
    """Names go into the config; factories are checked once here and travel to workers."""
    from kiln.engine.custom_metrics import MetricSet
    from kiln.engine.custom_optim import check_factories, resolve_choice

    opt_name, opt_factory = resolve_choice("optimizer", optimizer)
    sched_name, sched_factory = resolve_choice("lr_scheduler", lr_scheduler)
    names = {"optimizer": opt_name, "lr_scheduler": sched_name}
    cfg = cfg.replace(**{k: v for k, v in names.items() if v is not None})
    check_factories(opt_factory, sched_factory, cfg)
    return cfg, _CustomPieces(opt_factory, sched_factory, MetricSet.from_user(metrics))


def _with_progress(hooks: list[Any], cfg: TrainingConfig) -> list[Any]:
    """The run's hooks; with ``tensorboard`` and no progress hook (``verbose=False``), a
    quiet one whose epoch events feed the live TensorBoard file and print nothing."""
    from kiln.engine.progress import EpochProgress

    if not cfg.tensorboard or any(isinstance(h, EpochProgress) for h in hooks):
        return hooks
    return [*hooks, EpochProgress(cfg.epochs, quiet=True)]


def _live_tensorboard(cfg: TrainingConfig, run_dir: Path) -> Any:
    """With ``tensorboard``: the run's live event file, registered as a progress sink."""
    if not cfg.tensorboard:
        return None
    from kiln.engine.progress import add_sink
    from kiln.tracking.tensorboard import LiveTensorBoard

    live = LiveTensorBoard(run_dir / "tensorboard")
    add_sink(live)
    return live


def _report_elsewhere(
    cfg: TrainingConfig,
    name: str,
    results: dict[str, Any],
    run_id: Any,
    params: dict[str, Any],
    live: Any = None,
    run_key: str | None = None,
) -> None:
    """The rest of the TensorBoard file (per-step rows, epochs not seen live), and the
    run to MLflow (report_to; ``run_key``, from the run record, lets a later export of
    the same run replace it).

    The run is trained and recorded by now: a writer that fails is a warning (and
    ``results["report_errors"]``), and loses none of it.
    """
    if live is not None:
        try:
            live.finish(results["history"])
        except OSError as exc:
            logger.warning("TensorBoard event files not written: %s", exc)
            results.setdefault("report_errors", {})["tensorboard"] = str(exc)
    if "mlflow" in cfg.report_to:
        from kiln.tracking.mlflow_export import RUN_KEY_TAG, log_run_to_mlflow

        try:
            results["mlflow_run_id"] = log_run_to_mlflow(
                name,
                config=cfg.to_dict(),
                history=results["history"],
                params=params,
                tags={
                    "kiln.run_id": run_id,
                    RUN_KEY_TAG: run_key,
                    "kiln.task": results["task"].get("task_type"),
                },
                checkpoint=results.get("checkpoint_path"),
                status=_status(results),
            )
        except Exception as exc:  # noqa: BLE001 - reported, and the run can be sent again
            again = f"`kiln runs export {run_id} --to mlflow`" if run_id else "a new run"
            logger.warning("report_to mlflow failed (%s: %s); send it with %s",
                           type(exc).__name__, exc, again)  # fmt: skip
            results.setdefault("report_errors", {})["mlflow"] = f"{type(exc).__name__}: {exc}"


def _status(results: dict[str, Any]) -> str:
    return "stopped" if results.get("stopped_early") else "completed"


class _ModuleFactory:
    """Ships a user's module to workers; each call returns an independent copy."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> nn.Module:
        return copy.deepcopy(self.module)


class _SpecFactory:
    """Builds a kiln architecture inside each worker (after seeding, so ranks agree)."""

    def __init__(
        self, spec: dict[str, Any], input_shape: Sequence[int], num_outputs: int | None
    ) -> None:
        self.spec, self.input_shape, self.num_outputs = spec, tuple(input_shape), num_outputs

    def __call__(self) -> nn.Module:
        from kiln.models import build_model

        return build_model(self.spec, input_shape=self.input_shape, num_outputs=self.num_outputs)


def _default_architecture(plan: DataPlan) -> dict[str, Any]:
    if plan.task.task_type in (TaskType.SEQUENCE_TO_SEQUENCE, TaskType.SEGMENTATION):
        raise ConfigError(
            f"task_type={plan.task.task_type!r} has no built-in architecture; pass model= "
            "(an nn.Module or a factory) giving logits [B, T, V] for sequence_to_sequence "
            "or [B, classes, H, W] for segmentation"
        )
    if plan.task.task_type == TaskType.LANGUAGE_MODELING:
        return {"name": "tiny_transformer", "vocab_size": plan.task.vocab_size or 32}
    if len(plan.input_shape) == 3:
        return {"name": "cnn"}
    return {"name": "mlp", "hidden": [128]}


def _as_list(hooks: Any) -> list[Any]:
    if hooks is None:
        return []
    if isinstance(hooks, (list, tuple)):
        return list(hooks)
    return [hooks]


def _run_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


# A run folder is <slug>-<date>-<time>-<6 hex>; _runs_newest_first parses what this makes.
_RUN_SUFFIX = r"-\d{8}-\d{6}-[0-9a-f]{6}"


def _unique_run_name(base: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{_run_slug(base)}-{stamp}-{uuid.uuid4().hex[:6]}"


def _runs_newest_first(storage: Path, run_name: str | None) -> list[Path]:
    if not storage.is_dir():
        return []
    runs = [p for p in storage.iterdir() if (p / "checkpoints").is_dir()]
    if run_name:
        # The name's own folders only, so "digits" does not pick up "digits-mlp-...".
        own = re.compile(re.escape(_run_slug(run_name)) + f"({_RUN_SUFFIX})?")
        runs = [p for p in runs if own.fullmatch(p.name)]
    return sorted(runs, key=lambda p: (p / "checkpoints").stat().st_mtime, reverse=True)


def _run_params(cfg: TrainingConfig, plan: DataPlan, resume: str | None) -> dict[str, Any]:
    from kiln.tracking import collect_environment

    return {
        "random_seed": cfg.random_seed,
        "dataset": plan.dataset_id,
        "task": plan.task.to_dict(),
        "num_workers": cfg.num_workers,
        "resumed_from": resume,
        **collect_environment(),
    }


def _register(
    paths: RunPaths, cfg: TrainingConfig, plan: DataPlan, results: dict[str, Any], run_id
) -> Any:
    """Register the run's best checkpoint as the next version of ``cfg.register_as``."""
    from kiln.tracking.recorder import RunRecorder

    if not results.get("checkpoint_path"):
        return None
    return RunRecorder(paths.db, paths.artifacts).register(
        str(cfg.register_as),
        results["checkpoint_path"],
        config=cfg.to_dict(),
        metrics={**results["final_metrics"], **results.get("test_metrics", {})},
        task_type=plan.task.task_type,
        run_id=run_id,
        description=f"run {results['run_name']}, best epoch {results['best_epoch']}",
    )
