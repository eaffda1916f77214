"""Score a trained model on a labelled set: loss and the task's metrics.

    from kiln.predict import evaluate
    result = evaluate("digits@production", "digits", split="val")
    result.metrics["accuracy"], result.per_class, result.confusion_matrix

``Trainer.evaluate`` and ``kiln eval`` end here. The model comes from a checkpoint
(a folder kiln wrote, or ``NAME@TAG`` / ``NAME:VERSION`` from the registry) and is
rebuilt from its metadata, or is the caller's own module with the checkpoint's
weights loaded into it. The metrics are ``torchmetrics`` objects
(:mod:`kiln.predict.metrics`):

    in-process (num_workers=0):  batches -> model -> TaskMetrics.update -> compute
    num_workers=N:               Ray Train TorchTrainer, N workers; every worker reads
                                 the set in one fixed order and scores every N-th row;
                                 TaskMetrics.compute() gathers the states over gloo
                                 (torch.distributed), rank 0 returns the result

Your own metrics (``metrics=``, as ``Trainer(metrics=...)`` takes them: torchmetrics
objects, callables ``fn(outputs, targets) -> float``, or a dict of them) are computed
over the same batches and synced over the ranks the same way; each is reported under
its own name beside kiln's. ``Trainer.evaluate`` scores the trainer's own by default.

The result is recorded against the registered model whose checkpoint it scored
(found by the checkpoint's sha256), so ``kiln models show`` lists it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import TaskSpec
from kiln.engine.custom_metrics import MetricSet
from kiln.engine.loss import ModelOutput, get_loss_strategy, loss_for_task
from kiln.errors import CheckpointError, ConfigError
from kiln.paths import RunPaths
from kiln.predict._eval_data import resolve_data, to_ray
from kiln.predict.metrics import TaskMetrics

__all__ = [
    "EvaluationResult",
    "evaluate",
    "evaluate_checkpoint",
    "score_arrays",
    "score_batches",
    "SPLITS",
]

logger = logging.getLogger(__name__)

SPLITS = ("all", "train", "val", "test")
DEFAULT_BATCH_SIZE = 512


@dataclass
class EvaluationResult:
    """What an evaluation measured.

    Attributes:
        metrics: scalar metrics (``loss``, ``accuracy``, ``f1_macro``... / ``mae``,
            ``rmse``, ``r2`` / ``perplexity``) and ``num_rows``.
        task_type: the task the model was trained for.
        checkpoint: the checkpoint folder that was scored.
        dataset: what was scored (dataset id, path, or a description).
        split: the part of it that was scored (see :data:`SPLITS`).
        per_class: classification: one dict per class (precision, recall, f1, support).
        confusion_matrix: classification: rows are true classes, columns predictions.
        class_names: classification: the names of the classes, when known.
        model: ``NAME:VERSION`` of the registered model scored (recorded against), when
            known.
        evaluation_id: the registry's id of the recorded evaluation.
        world_size: ranks that shared the work.
    """

    metrics: dict[str, float]
    task_type: str
    checkpoint: str
    dataset: str
    split: str
    per_class: list[dict[str, Any]] | None = None
    confusion_matrix: list[list[int]] | None = None
    class_names: list[str] | None = None
    model: str | None = None
    evaluation_id: int | None = None
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot_confusion_matrix(self, path: str | os.PathLike[str]) -> Path:
        """Draw the confusion matrix to a PNG (atomically); return its path."""
        from kiln.predict.plot import plot_confusion_matrix

        if self.confusion_matrix is None:
            raise ConfigError(
                f"a confusion matrix exists for classification only; this model's task is "
                f"{self.task_type!r}"
            )
        title = f"{self.model or Path(self.checkpoint).name} on {self.dataset} ({self.split})"
        return plot_confusion_matrix(self.confusion_matrix, self.class_names, path, title=title)


# ---------------------------------------------------------------------- entry points
def evaluate(
    model: str | os.PathLike[str],
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    record: bool = True,
    paths: RunPaths | None = None,
    metrics: Any = None,
) -> EvaluationResult:
    """Evaluate a checkpoint folder, run folder, or registered ``NAME@TAG`` / ``NAME:VERSION``.

    Args:
        model: where the weights are; the architecture is rebuilt from the checkpoint.
        data: a dataset id, a parquet/csv/jsonl path, a ``kiln.data`` dataset, a
            ``ray.data.Dataset`` with the task's columns, or an ``(X, y)`` pair.
        split: ``all`` (default), ``train``/``val`` (the split the run trained with),
            or ``test`` (the dataset's own test split; the validation rows when it has none).
        batch_size: rows per forward pass.
        num_workers: 0 scores in this process; N >= 1 uses N Ray Train workers.
        record: record the result against the registered model with these weights.
        paths: kiln's locations (registry); resolved from ``$KILN_HOME`` when None.
        metrics: your own metrics, as ``Trainer(metrics=...)`` takes them; each lands in
            ``result.metrics`` under its name.
    """
    from kiln.export.from_checkpoint import is_model_ref

    metrics = MetricSet.from_user(metrics)  # a bad one is refused before anything is read
    paths = paths or RunPaths.resolve()
    source = os.fspath(model)
    if is_model_ref(source):
        from kiln.export import registered_checkpoint

        checkpoint, entry = registered_checkpoint(source, paths.db, paths.artifacts)
    else:
        from kiln.engine.checkpoint import resolve_checkpoint

        checkpoint, entry = resolve_checkpoint(source), None
    result = evaluate_checkpoint(
        checkpoint,
        data,
        split=split,
        batch_size=batch_size,
        num_workers=num_workers,
        record=record,
        paths=paths,
        metrics=metrics,
    )
    if result.model is None and entry is not None:
        result.model = entry.ref
    return result


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: Any,
    *,
    model_factory: Callable[[], nn.Module] | None = None,
    task: TaskSpec | None = None,
    split: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    record: bool = True,
    paths: RunPaths | None = None,
    metrics: Any = None,
) -> EvaluationResult:
    """Evaluate one checkpoint folder (see :func:`evaluate`).

    ``model_factory`` builds the module to load the weights into (a user's own
    ``nn.Module``); without it the architecture in the checkpoint's metadata is built.
    """
    from kiln.engine.checkpoint import load_checkpoint_state, resolve_checkpoint

    custom = MetricSet.from_user(metrics)  # checked before anything is loaded
    problems = []
    if split is not None and split not in SPLITS:
        problems.append(f"split={split!r} is not allowed; use one of {', '.join(SPLITS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r} must be an int >= 1")
    if not isinstance(num_workers, int) or num_workers < 0:
        problems.append(f"num_workers={num_workers!r} must be an int >= 0")
    if problems:
        raise ConfigError(problems)
    ckpt = resolve_checkpoint(checkpoint)
    state, _, meta = load_checkpoint_state(ckpt)
    user = {**meta, **meta.get("user", {})}
    task = task or _task_from(user, ckpt)
    factory = model_factory or _metadata_factory(user, ckpt)
    paths = paths or RunPaths.resolve()
    x, y, label, split_used, notes = resolve_data(data, split or "all", user, paths.datasets)
    job = _EvalJob(
        factory=factory,
        state=state,
        task=task,
        loss=(user.get("training_config") or {}).get("loss"),
        batch_size=batch_size,
        custom=custom,
    )
    if num_workers == 0:
        values = job.run(_local_batches(x, y, task, batch_size))
        world_size = 1
    else:
        values = _run_on_workers(job, x, y, num_workers, paths.runs)
        world_size = num_workers
    result = _result(values, task, ckpt, label, split_used, world_size, notes)
    if record:
        _record(result, ckpt, paths)
    return result


# ---------------------------------------------------------------------- the scoring
@dataclass
class _EvalJob:
    """What a rank needs to score batches: plain, picklable values."""

    factory: Callable[[], nn.Module]
    state: dict[str, Any]
    task: TaskSpec
    loss: str | None
    batch_size: int
    custom: MetricSet | None = None

    def run(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Score ``batches`` and return ``TaskMetrics.compute()`` (synced when distributed)."""
        model = self.factory()
        model.load_state_dict(self.state)
        return score_batches(model, self.task, self.loss, batches, custom=self.custom)


def score_batches(
    model: nn.Module,
    task: TaskSpec,
    loss: str | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    custom: MetricSet | None = None,
) -> dict[str, Any]:
    """Loss and the task's metrics of ``model`` over ``batches`` (``TaskMetrics.compute()``;
    synchronised over ranks when a process group exists), and ``custom``'s under their names.

    Args:
        loss: The loss name the model was trained with (None: the task's default).
        custom: Your own metrics (a :class:`~kiln.engine.custom_metrics.MetricSet`).
    """
    model.eval()
    strategy = get_loss_strategy(loss or loss_for_task(task.task_type))
    if task.task_type == "language_modeling" and task.pad_token_id is not None:
        strategy = get_loss_strategy("language_modeling", pad_token_id=task.pad_token_id)
    metrics = TaskMetrics.for_task(task)
    extra = custom.for_epoch(_CUSTOM_SPLIT, "cpu") if custom is not None else None
    with torch.inference_mode():
        for x, y in batches:
            logits = ModelOutput.from_raw(model(x)).logits
            metrics.update(logits, y, strategy.compute_loss(logits, y))
            if extra is not None:
                extra.update(logits, y)
    values = metrics.compute()
    if extra is not None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        for key, value in extra.compute(distributed).items():
            name = key.removeprefix(f"{_CUSTOM_SPLIT}_")
            if name in values:
                raise ConfigError(
                    f"metric name {name!r} is one kiln's evaluation already reports "
                    f"({', '.join(sorted(k for k in values if isinstance(values[k], float)))}); "
                    "name yours differently"
                )
            values[name] = value
    return values


_CUSTOM_SPLIT = "eval"  # EpochMetrics names a value "<split>_<name>"; reported as "<name>"


def score_arrays(
    model: nn.Module, meta: dict[str, Any], x: Any, y: Any, batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[str, Any]:
    """``score_batches`` of an in-memory ``(x, y)`` for a model loaded from a checkpoint
    whose metadata ``meta`` names its task and loss."""
    user = {**meta, **meta.get("user", {})}
    task = _task_from(user, Path(str(meta.get("checkpoint_path", "the checkpoint"))))
    loss = (user.get("training_config") or {}).get("loss")
    return score_batches(model, task, loss, _local_batches(x, y, task, batch_size))


def _local_batches(
    x: Any, y: Any, task: TaskSpec, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of an in-memory pair, or of a ``ray.data.Dataset`` (``x`` then None)."""
    if y is None:  # a Ray dataset
        columns = (task.input_column, task.label_column)
        for batch in x.iter_torch_batches(batch_size=batch_size):
            yield batch[columns[0]], batch[columns[1]]
        return
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for start in range(0, len(xt), batch_size):
        yield xt[start : start + batch_size], yt[start : start + batch_size]


def _run_on_workers(
    job: _EvalJob, x: Any, y: Any, num_workers: int, storage: Path
) -> dict[str, Any]:
    """Score on ``num_workers`` Ray Train workers; the metrics are synced over gloo.

    Ray Train keeps the job's state under ``storage/evaluations`` (kiln's runs folder:
    on a cluster, storage every node sees); the folder is removed afterwards.
    """
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kiln._ray import ensure_ray
    from kiln.engine.trainer import _ordered_execution

    ensure_ray()
    ds = x if y is None else to_ray(x, y, job.task)
    root = storage / "evaluations"
    root.mkdir(parents=True, exist_ok=True)
    name = f"eval-{uuid.uuid4().hex[:8]}"
    try:
        trainer = TorchTrainer(
            # Ray types the loop as returning None; rank 0's return value is the result.
            _eval_loop_per_worker,  # type: ignore[arg-type]
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=num_workers),
            datasets={"eval": ds},
            # Not split by Ray (streaming_split(equal=True) may drop rows): every worker
            # reads the set in the same order and keeps every N-th row.
            dataset_config=DataConfig(datasets_to_split=[], execution_options=_ordered_execution()),
            run_config=RunConfig(name=name, storage_path=str(root)),
        )
        result = trainer.fit()
    finally:
        shutil.rmtree(root / name, ignore_errors=True)
    return result.return_value  # type: ignore[attr-defined]  # Train V2's Result has it


def _eval_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train

    job: _EvalJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("eval")
    columns = (job.task.input_column, job.task.label_column)

    def mine() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=job.batch_size):
            n = len(batch[columns[0]])
            keep = (torch.arange(seen, seen + n) % world) == rank
            seen += n
            if bool(keep.any()):
                yield batch[columns[0]][keep], batch[columns[1]][keep]

    values = job.run(mine())  # compute() all-gathers the metric states: every rank joins
    return values if rank == 0 else None


# ---------------------------------------------------------------------- inputs
def _task_from(meta: dict[str, Any], ckpt: Path) -> TaskSpec:
    spec = meta.get("task_spec")
    if not spec:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has no task_spec in its metadata, so kiln does not know "
            "what it predicts; pass task=TaskSpec(...)"
        )
    return TaskSpec.from_dict(spec)


def _metadata_factory(meta: dict[str, Any], ckpt: Path) -> Callable[[], nn.Module]:
    from kiln.engine.trainer import _SpecFactory
    from kiln.export.from_checkpoint import REQUIRED_METADATA

    if meta.get("model_config") is None or any(k not in meta for k in REQUIRED_METADATA):
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} does not describe its architecture (it was trained "
            "from a user-defined nn.Module); evaluate it with Trainer(model=...).evaluate(...)"
        )
    return _SpecFactory(meta["model_config"], tuple(meta["input_shape"]), meta["num_outputs"])


# ---------------------------------------------------------------------- results
def _result(
    values: dict[str, Any],
    task: TaskSpec,
    ckpt: Path,
    label: str,
    split: str,
    world_size: int,
    notes: list[str],
) -> EvaluationResult:
    values = dict(values)
    matrix = values.pop("confusion_matrix", None)
    per_class = values.pop("per_class", None)
    names = [str(n) for n in task.class_names] if task.class_names else None
    if per_class is not None and names is not None:
        per_class = [{"class": r["class"], "name": names[r["class"]], **r} for r in per_class]
    return EvaluationResult(
        metrics=values,
        task_type=task.task_type,
        checkpoint=str(ckpt),
        dataset=label,
        split=split,
        per_class=per_class,
        confusion_matrix=matrix,
        class_names=names,
        world_size=world_size,
        notes=notes,
    )


def _record(result: EvaluationResult, ckpt: Path, paths: RunPaths) -> None:
    """Record against every registered version holding these weights (none: not recorded)."""
    if not paths.db.exists():
        return
    from kiln.tracking import ModelRegistry
    from kiln.tracking._artifacts import sha256_of

    registry = ModelRegistry(paths.db, paths.artifacts)
    try:
        entries = registry.find_by_sha256(sha256_of(ckpt))
        if not entries:
            logger.info("checkpoint %s is not registered: evaluation not recorded", ckpt)
            return
        details = {
            k: getattr(result, k)
            for k in ("per_class", "confusion_matrix", "class_names", "checkpoint", "world_size")
        }
        for entry in entries:
            result.evaluation_id = registry.record_evaluation(
                entry.model_id, result.dataset, result.split, result.metrics, details
            )
        result.model = entries[-1].ref
    finally:
        registry.close()


# ---------------------------------------------------------------------- Trainer.evaluate
def evaluate_for_trainer(
    trainer: Any, data: Any, checkpoint: str = "best", **options: Any
) -> EvaluationResult:
    """``Trainer.evaluate``: resolve ``checkpoint`` against the trainer's runs, then score.

    "best"/"latest" are this trainer's last ``train()`` result, else the newest run of
    its ``run_name`` under its storage; a user's own module gets the weights loaded.
    """
    from kiln.engine.checkpoint import resolve_checkpoint
    from kiln.engine.trainer import _ModuleFactory
    from kiln.export.from_checkpoint import is_model_ref

    paths = trainer.paths
    text = os.fspath(checkpoint)
    if text in ("best", "latest"):
        results = trainer.results or {}
        found = results.get("checkpoint_path" if text == "best" else "latest_checkpoint_path")
        ckpt = Path(found) if found else Path(trainer._resolve_resume(text))
    elif is_model_ref(text):
        from kiln.export import registered_checkpoint

        ckpt, _ = registered_checkpoint(text, paths.db, paths.artifacts)
    else:
        ckpt = resolve_checkpoint(text)
    model = trainer.model
    factory = _ModuleFactory(model) if isinstance(model, nn.Module) else model
    return evaluate_checkpoint(ckpt, data, model_factory=factory, paths=paths, **options)
