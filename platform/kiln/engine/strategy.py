"""How a worker holds its model: a whole copy per rank (DDP) or sharded per block (FSDP2).

The worker loop makes one call, :func:`prepare_model`, which does, in order::

    activation checkpointing   (config.activation_checkpointing) on the blocks below
    strategy "fsdp":           fully_shard(block) for every block, then fully_shard(model),
                               over a 1-D mesh of every Ray Train worker (gloo on CPU,
                               nccl on CUDA)
    torch.compile              (config.compile_mode)
    strategy "ddp":            ray.train.torch.prepare_model (DDP) with 2+ workers,
                               else model.to(device)

Blocks (:func:`shard_units`) are the units FSDP gathers one at a time in forward and
backward, so a rank holds at most one block's full parameters beside its shards:

- a Hugging Face model's ``_no_split_modules`` classes (its decoder layers);
- else the members of each ``nn.ModuleList`` of same-typed modules (kiln's
  ``TinyTransformer`` blocks);
- else every direct child that holds parameters (the layers of an MLP).

A sharded model's state moves through ``torch.distributed.checkpoint.state_dict``:
:func:`sharded_state` / :func:`load_sharded_state` (model and optimizer, each rank its
shards; what :mod:`kiln.engine.sharded_checkpoint` writes with DCP) and
:func:`full_model_state` (gathered on rank 0, on the CPU, for export and registration).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import TrainingConfig
from kiln.engine.checkpoint import _to_cpu
from kiln.errors import CheckpointError, ConfigError

__all__ = [
    "full_model_state",
    "in_lockstep",
    "is_sharded",
    "load_full_optimizer_state",
    "load_sharded_state",
    "local_state_bytes",
    "prepare_model",
    "shard_units",
    "sharded_state",
]

_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod")  # activation ckpt, compile


# ---------------------------------------------------------------------- the policy
def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that FSDP shards (and activation checkpointing wraps) one by one."""
    names = getattr(model, "_no_split_modules", None)  # Hugging Face: its layer classes
    if names:
        found = [m for m in model.modules() if type(m).__name__ in set(names) and m is not model]
        if found:
            return found
    layers = [
        block
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len({type(c) for c in m}) == 1
        for block in m
        if _holds_parameters(block)
    ]
    if layers:
        return layers
    return [c for c in model.children() if _holds_parameters(c)]


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _slots(model: nn.Module, units: list[nn.Module]) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of each unit, so a wrapper can take its place."""
    wanted = {id(u) for u in units}
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if id(child) in wanted
    ]


# ---------------------------------------------------------------------- preparing the model
def prepare_model(
    model: nn.Module, cfg: TrainingConfig, device: torch.device, distributed: bool
) -> nn.Module:
    """The model as the loop trains it: checkpointed, sharded or DDP-wrapped, compiled."""
    if cfg.activation_checkpointing:
        model = apply_activation_checkpointing(model)
    if cfg.strategy == "fsdp":
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "strategy='fsdp' needs a torch.distributed process group (Ray Train worker "
                "actors, num_workers >= 1); this process has none. Set num_workers, or "
                "strategy='ddp'"
            )
        model = _fully_shard(model, device)
    if cfg.compile_mode:
        model = torch.compile(model, mode=cfg.compile_mode)  # type: ignore[assignment]
    if cfg.strategy == "fsdp":
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model) if distributed else model.to(device)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward (Hugging Face: its own switch)."""
    if getattr(model, "supports_gradient_checkpointing", False):  # Hugging Face
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if callable(enable):
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            older = getattr(model, "gradient_checkpointing_enable")  # noqa: B009
            older(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for parent, name in _slots(model, shard_units(model)):
        # The wrapper's state-dict hooks drop its prefix: checkpoints keep the plain keys.
        setattr(parent, name, checkpoint_wrapper(getattr(parent, name)))
    return model


def _fully_shard(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.get_world_size() == 1:
        print("kiln: strategy='fsdp' with 1 worker shards nothing (use 2 or more)", flush=True)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: what no block holds (embeddings, head)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model :func:`prepare_model` sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def _fsdp_root(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _reshard(model: nn.Module) -> None:
    """Free gathered parameters (FSDP keeps the root's after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---------------------------------------------------------------------- state dicts
def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}``: this rank's shards, keyed by parameter name (DCP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _reshard(model)
    model_state, optim_state = get_state_dict(_fsdp_root(model), optimizer)
    return {"model": model_state, "optim": optim_state}


def load_sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Put what :func:`sharded_state` returned (filled by DCP) into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        _fsdp_root(model),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )


def full_model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, Any]:
    """The whole model's state dict on rank 0, on the CPU ({} on other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(_fsdp_root(model), options=options)
    if not trainable_only:
        return state
    trainable = {_clean(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a plain ``optimizer.state_dict()`` (a ddp checkpoint) into a sharded optimizer.

    The plain dict numbers parameters in ``param_groups`` order; the optimizer was built
    the same way, so each number maps to a parameter name, which torch then shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    groups = state.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(groups)} parameter groups and this run's "
            f"has {len(optimizer.param_groups)}; resume with the same optimizer settings"
        )
    names = {id(p): _clean(n) for n, p in model.named_parameters()}
    fqn: dict[int, str] = {}
    for saved, group in zip(groups, optimizer.param_groups, strict=True):
        fqn.update((i, names[id(p)]) for i, p in zip(saved["params"], group["params"], strict=True))
    converted: dict[str, Any] = {
        "state": {fqn[i]: s for i, s in state.get("state", {}).items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in groups],
    }
    set_optimizer_state_dict(
        _fsdp_root(model), optimizer, converted, options=StateDictOptions(full_state_dict=True)
    )


def _clean(name: str) -> str:
    """A parameter's name without the wrappers' path parts (the names torch's state dicts use)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


# ---------------------------------------------------------------------- measuring
def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds (its shards under FSDP)."""
    _reshard(model)
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            optim += sum(_local_bytes(v) for v in per_param.values() if torch.is_tensor(v))
    return {"param_bytes": params, "optimizer_bytes": optim}


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


# ---------------------------------------------------------------------- validation
_END = object()


def in_lockstep(
    batches: Iterable[Any], run_filler: Callable[[Any], Any], device: torch.device
) -> Iterator[Any]:
    """Yield this rank's batches while every rank makes the same number of forward passes.

    Each FSDP forward gathers parameters from every rank, so ranks with fewer
    validation batches (rows are split without padding) run ``run_filler`` on a batch
    whose result is dropped until the last rank is done. A rank that has no batch
    at all gets one from the first rank that has one.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    it, filler = iter(batches), None
    while True:
        batch = next(it, _END)
        flags = torch.zeros(2 * world, device=device)  # [has a batch..., needs a filler...]
        flags[rank] = float(batch is not _END)
        flags[world + rank] = float(batch is _END and filler is None)
        dist.all_reduce(flags)
        has = flags[:world].tolist()
        if not any(has):
            return
        if any(flags[world:].tolist()):
            box = [_to_cpu(batch) if rank == has.index(1.0) else None]
            dist.broadcast_object_list(box, src=has.index(1.0), device=device)
            filler = filler if filler is not None else box[0]
        if batch is _END:
            run_filler(filler)
            continue
        filler = batch if filler is None else filler
        yield batch
