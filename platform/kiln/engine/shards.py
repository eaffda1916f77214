"""Each rank's batches: what the worker loop iterates over, per epoch.

Three kinds of data reach a rank (:class:`~kiln.engine.data_plan.DataKind`):

- RAY: a Ray Data shard (``ray.train.get_dataset_shard``). In-memory data is read
  whole in a fixed order and each rank keeps rows ``rank::world`` (no split
  coordinator); files and ``ray.data`` inputs arrive already split by Ray.
- MEMORY: arrays shipped with the run; each rank keeps an equal slice.
- TORCH: the user's DataLoaders, sharded by ``prepare_data_loader``; validation
  rows are split without padding, so no row is counted twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from kiln.engine.data_plan import DataKind

if TYPE_CHECKING:
    from kiln.engine.worker import WorkerPlan

__all__ = ["broadcast", "data_for_rank", "world"]


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


def broadcast(value: Any, distributed: bool) -> Any:
    """Rank 0's ``value`` on every rank (itself when not ``distributed``)."""
    if not distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, distributed: bool) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` when not ``distributed``)."""
    if not distributed:
        return [value]
    import torch.distributed as dist

    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box


def _rank() -> int:
    return world()[0]


def data_for_rank(plan: WorkerPlan, device: torch.device, world_size: int):
    """Return (train_batches(epoch), val_batches(epoch) or None, train batches per epoch).

    The batch count plans the LR schedule, so it comes from what this rank iterates: a
    user's DataLoader has its own batch size, which need not be ``config.batch_size``.
    """
    if plan.data_kind == DataKind.TORCH:
        return _torch_batches(plan, world_size)
    if plan.data_kind == DataKind.MEMORY:
        return _memory_batches(plan, world_size)
    return _ray_batches(plan, world_size)


def _torch_batches(plan: WorkerPlan, world_size: int):
    """The user's DataLoaders, sharded per rank (validation without padding)."""
    import ray.train.torch

    cfg = plan.config
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


def _memory_batches(plan: WorkerPlan, world_size: int):
    """Arrays shipped with the run: an equal slice per rank, batched in this process."""
    cfg = plan.config
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


def _ray_batches(plan: WorkerPlan, world_size: int):
    """Ray Data shards: read whole and kept per rank (in-memory sources), else streamed."""
    import ray.train

    cfg = plan.config
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
        sampler: Any = getattr(loader, "sampler", None)
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
