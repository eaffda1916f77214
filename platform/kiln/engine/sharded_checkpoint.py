"""Checkpoints of sharded (FSDP) runs: every rank writes its shards with DCP.

A sharded checkpoint is an ordinary kiln checkpoint folder with one more entry::

    epoch_0003/
        shards/             torch.distributed.checkpoint: one __<rank>_0.distcp per rank,
                            .metadata last (its presence marks the folder as sharded)
        model.pt            the whole model, gathered on rank 0 (export, registry, serving)
        train_state.pt      scheduler, scaler, RNG, epoch, step (the optimizer is in shards/)
        metadata.json

Order of a save (:func:`save_sharded`, called by every rank)::

    rank 0: CheckpointManager.stage(epoch) -> epoch_0003.tmp-<uuid>/, path sent to all
    every rank: dcp.save(model + optimizer shards) into .../shards   (.metadata written last)
    every rank: its shard files and their sizes gathered onto rank 0 (for metadata.json)
    every rank: gather the whole model onto rank 0's CPU (a collective)
    rank 0: CheckpointManager.save_checkpoint(staged=...): model.pt, train_state.pt,
            metadata.json, fsync, rename to epoch_0003, manifest, retention (best-k/last-n)

so a crash at any point leaves a ``*.tmp-*`` folder that is never loaded and is removed
when a manager next opens the directory.

A rank on another node than rank 0 cannot write into rank 0's folder: it writes its
shards into a folder of its own on its node (``own_dir``), which it reports to Ray
Train with the same ``checkpoint_dir_name``; Ray Train's upload merges every rank's
``shards/`` into the one checkpoint folder in storage before rank 0 commits it. All files of one checkpoint live in its one
folder. Resume (:func:`load_sharded`) reads the shards into any layout: FSDP over any
number of workers, DDP, or one process.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.engine.checkpoint import CheckpointManager, CheckpointMetadata, saves_trainable_only
from kiln.engine.checkpoint_reader import (
    METADATA_FILE,
    SHARDS_DIR,
    TRAIN_STATE_FILE,
    CheckpointState,
    _torch_load,
    is_sharded_checkpoint,
    load_checkpoint_state,
    read_metadata,
    resolve_checkpoint,
)
from kiln.engine.shards import broadcast, gather
from kiln.engine.strategy import full_model_state, load_sharded_state, sharded_state
from kiln.errors import CheckpointError, CheckpointWriteError

__all__ = [
    "SHARDS_DIR",
    "is_sharded_checkpoint",
    "load_sharded",
    "read_resume_state",
    "save_sharded",
]

logger = logging.getLogger(__name__)

_DCP_METADATA = ".metadata"  # written by DCP's coordinator once every rank's shards are in


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def save_sharded(
    manager: CheckpointManager | None,
    epoch: int,
    metrics: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    metadata: dict[str, Any],
    *,
    scaler: Any = None,
    on_error: str = "raise",
    blocking: bool = False,
    own_dir: Path | None = None,
) -> CheckpointMetadata | None:
    """Write one sharded checkpoint; every rank calls it, rank 0 passes its ``manager``.

    Rank 0 finishes the checkpoint in the background unless ``blocking`` (its folder
    goes to storage or to Tune right after). A rank > 0 on another node than rank 0
    passes ``own_dir``: its shards go to ``own_dir/shards`` (the caller uploads that
    folder into the checkpoint's folder in storage, then removes it).

    Returns what rank 0's manager returns (None on other ranks, and for a save that
    failed with ``on_error="warn"``: nothing of it is kept, and the run goes on).
    """
    import torch.distributed.checkpoint as dcp

    staged = broadcast(str(manager.stage(epoch)) if manager is not None else None, _multi_rank())
    target = Path(own_dir if own_dir is not None else staged) / SHARDS_DIR
    try:  # DCP: the coordinator (rank 0) writes .metadata into its own target, last
        dcp.save(sharded_state(model, optimizer), checkpoint_id=target)
    except Exception as exc:  # DCP raises on every rank when any rank failed to write
        message = (
            f"sharded checkpoint of epoch {epoch} could not be written to "
            f"{str(target.parent)!r}: {exc}. "
            "Nothing of it was kept and earlier checkpoints are intact; free some space, or "
            "set on_checkpoint_error='warn' to keep training without it"
        )
        if manager is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        if on_error == "raise":
            raise CheckpointWriteError(message) from exc
        if manager is not None:
            manager.failed_saves.append(
                {"epoch": epoch, "name": Path(staged).name, "error": message}
            )
            logger.warning("%s", message)
        return None
    # Every shard file with its size goes into metadata.json: a reader adopts a folder
    # that is not in the manifest yet only when each one is there whole (a rank's upload
    # to storage may have stopped part way). On one node rank 0's folder holds them all.
    mine = _listing(target) if own_dir is not None or manager is not None else {}
    files = gather(mine, _multi_rank())
    full = full_model_state(model, trainable_only=saves_trainable_only(model))
    if manager is None:
        return None
    return manager.save_checkpoint(
        epoch,
        metrics,
        model,
        None,  # the optimizer's state is in the shards
        scheduler,
        metadata=metadata,
        scaler=scaler,
        blocking=blocking,
        model_state=full,
        staged=Path(staged),
        staged_files={name: size for listing in files for name, size in listing.items()},
    )


def _listing(shards: Path) -> dict[str, int]:
    """``{"shards/<file>": bytes}`` of the files in a rank's shards folder."""
    return {f"{SHARDS_DIR}/{p.name}": p.stat().st_size for p in shards.iterdir() if p.is_file()}


def read_resume_state(path: str | os.PathLike[str]) -> CheckpointState:
    """What a resuming worker reads before its model is built: for a sharded checkpoint the
    train state and metadata only (``model_state`` is empty: the shards hold it), else the
    whole checkpoint, as :func:`~kiln.engine.checkpoint_reader.load_checkpoint_state`."""
    ckpt = resolve_checkpoint(path)
    if not is_sharded_checkpoint(ckpt):
        return load_checkpoint_state(ckpt)
    train_path = ckpt / TRAIN_STATE_FILE
    train_state = _torch_load(train_path, "cpu") if train_path.exists() else {}
    return CheckpointState({}, train_state, read_metadata(ckpt))


def load_sharded(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Fill the (wrapped) model and its optimizer from a sharded checkpoint; every rank calls it."""
    import torch.distributed.checkpoint as dcp

    ckpt = resolve_checkpoint(path)
    if not is_sharded_checkpoint(ckpt):
        raise CheckpointError(
            f"{str(ckpt)!r} has no {SHARDS_DIR}/{_DCP_METADATA}: it is not a sharded checkpoint "
            f"(its {METADATA_FILE} lists {read_metadata(ckpt).get('files')})"
        )
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=ckpt / SHARDS_DIR)
    except Exception as exc:  # DCP names the missing or misshapen keys
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"resume checkpoint {str(ckpt)!r} holds a model or optimizer of another shape than "
            "this run's (the run it came from used other model or optimizer settings); "
            f"resume with the same settings. torch said: {first}"
        ) from None
    load_sharded_state(model, optimizer, state)
