"""Step-level control inside an epoch: evaluations and checkpoints every N optimizer
steps, and the position a mid-epoch checkpoint records so that a resumed run
continues at exactly the next batch.

Where a mid-epoch resume gets its exactness from:

* The data order of an epoch is fixed by the random state when its first batch is
  drawn: the global RNGs (a ``RandomSampler`` without a generator, augmentations),
  and the loader's own ``torch.Generator`` (which seeds its sampler and workers).
  :func:`epoch_batches` records both at that moment; samplers with ``set_epoch``
  (``DistributedSampler``) and kiln's cached shards depend on the epoch alone.
* A mid-epoch checkpoint stores that epoch-start state, the number of batches
  already trained, the epoch's running loss sums and the RNG state at the save.
* On resume the epoch-start state is put back, the trained batches are drawn and
  dropped, and then the RNG state of the save is restored, at the point in the
  draw where the interrupted run was when it saved (after the next batch was
  fetched when the loop looks one batch ahead, for gradient accumulation).

The resumed run's weights then equal the uninterrupted run's. One exception: with
gradient accumulation (the loop fetches a batch ahead), a dataset whose
``__getitem__`` draws from the global RNGs (random augmentation) may give the first
resumed batch other random draws.

In a DDP run rank 0 writes the checkpoint and every rank restores its states, as
epoch-end resumes do; a ``DistributedSampler``'s order depends on the epoch alone.
Streaming Ray Data shards (``cache_shards=False``) resume by skipping the same
number of batches; their order is Ray Data's and need not repeat.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.engine.seed import get_rng_state, set_rng_state

__all__ = ["EpochPosition", "StepSchedule", "epoch_batches"]

MID_EPOCH_KEY = "mid_epoch"  # checkpoint metadata (JSON): epoch, batches, sums, evals
EPOCH_DATA_KEY = "epoch_data"  # train_state (tensors): the RNG state where the epoch began


@dataclass(frozen=True)
class StepSchedule:
    """Which optimizer steps evaluate and which checkpoint (``None``: never inside an epoch)."""

    eval_every: int | None = None
    save_every: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.eval_every or self.save_every)

    def evaluates(self, optimizer_step: int) -> bool:
        return _due(self.eval_every, optimizer_step)

    def saves(self, optimizer_step: int) -> bool:
        return _due(self.save_every, optimizer_step)


def _due(every: int | None, step: int) -> bool:
    return every is not None and every > 0 and step % every == 0


@dataclass
class EpochPosition:
    """Where a mid-epoch checkpoint was taken, and what the resumed epoch needs.

    Attributes:
        epoch: the epoch in progress (counted from 1).
        batches: batches of it already trained (on each rank).
        sums: the epoch's running ``[loss_sum, correct, abs_err, samples, batches]``.
        evals: the step evaluations of this epoch so far.
        epoch_data: RNG states when the epoch drew its first batch (tensors).
        rng: RNG states at the save.
    """

    epoch: int
    batches: int
    sums: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    epoch_data: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        """The JSON part (the RNG states go into the checkpoint's train state)."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "sums": [float(v) for v in self.sums],
            "evals": list(self.evals),
        }

    @classmethod
    def from_checkpoint(
        cls, user_metadata: dict[str, Any], train_state: dict[str, Any]
    ) -> EpochPosition | None:
        """The position a checkpoint recorded, or None for an epoch-end checkpoint."""
        mid = user_metadata.get(MID_EPOCH_KEY)
        if not mid:
            return None
        return cls(
            epoch=int(mid["epoch"]),
            batches=int(mid["batches"]),
            sums=[float(v) for v in mid.get("sums", [])],
            evals=list(mid.get("evals", [])),
            epoch_data=train_state.get(EPOCH_DATA_KEY),
            rng=train_state.get("rng"),
        )


def _loader_generator(batches: Any) -> torch.Generator | None:
    generator = getattr(batches, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def capture_data_state(batches: Any) -> dict[str, Any]:
    """The random state that decides an epoch's order, taken before its first draw."""
    generator = _loader_generator(batches)
    return {
        "rng": get_rng_state(),
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_data_state(batches: Any, state: dict[str, Any]) -> None:
    set_rng_state(state["rng"])
    generator = _loader_generator(batches)
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def epoch_batches(
    batches: Iterable[Any],
    record: dict[str, Any],
    position: EpochPosition | None = None,
    *,
    lookahead: bool = False,
) -> Iterator[Any]:
    """Yield an epoch's batches; record its data state in ``record["state"]``.

    With ``position`` (a mid-epoch checkpoint of this epoch): restore the epoch's
    data state, skip the batches already trained, and restore the RNG state of the
    save. ``lookahead``: the loop fetches one batch ahead (gradient accumulation),
    so the save happened after the next batch was fetched.
    """
    if position is not None and position.epoch_data is not None:
        restore_data_state(batches, position.epoch_data)
    record["state"] = capture_data_state(batches)
    if position is None:
        yield from batches  # one iter(): a loader draws its seeds once, as without this
        return
    it = iter(batches)  # below only next(): iter() again restarts some loaders
    for _ in range(position.batches):
        if next(it, _END) is _END:
            return
    if not lookahead and position.rng is not None:
        set_rng_state(position.rng)
    batch = next(it, _END)
    if batch is not _END and lookahead and position.rng is not None:
        set_rng_state(position.rng)
    while batch is not _END:
        yield batch
        batch = next(it, _END)


_END = object()
