"""Seeding and RNG state for reproducible runs.

``set_random_seed`` seeds Python, NumPy and torch (CPU and every CUDA device);
``deterministic=True`` also asks torch for deterministic kernels. The RNG state
from :func:`get_rng_state` holds only tensors, ints, floats, strings, tuples,
lists, dicts and None, so a checkpoint stores it and
``torch.load(..., weights_only=True)`` reads it back.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from kiln.errors import ConfigError

__all__ = ["set_random_seed", "SeedManager", "get_rng_state", "set_rng_state"]

_MAX_SEED = 2**32 - 1


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int in [0, {_MAX_SEED}]; got {seed!r}")
    if not 0 <= int(seed) <= _MAX_SEED:
        raise ConfigError(f"seed must be in [0, {_MAX_SEED}]; got {seed!r}")
    return int(seed)


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels.

    Args:
        seed: in ``[0, 2**32 - 1]``.
        deterministic: True turns on ``torch.use_deterministic_algorithms`` (warning,
            not failing, on ops without a deterministic version), cuDNN deterministic
            mode with benchmarking off, and sets ``CUBLAS_WORKSPACE_CONFIG`` if unset.
            False lets cuDNN benchmark (faster, not bit-exact on GPU).
    """
    seed = _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        # Only switch it off when it is on: the call itself imports torch's compiler
        # stack (~1.7 s), which an ordinary run never needs.
        if torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states, loadable with ``weights_only=True``."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state from :func:`get_rng_state`; keys that are missing are left alone."""
    py = state.get("python")
    if py is not None:
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((py["version"], internal, py["gauss_next"]))
    npst = state.get("numpy")
    if npst is not None:
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )
    if state.get("torch_cpu") is not None:
        torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda][: torch.cuda.device_count()])


class SeedManager:
    """One seed for a run: seeds the process, DataLoader workers and generators.

    Args:
        seed: in ``[0, 2**32 - 1]``.
        deterministic: see :func:`set_random_seed`.
    """

    def __init__(self, seed: int, deterministic: bool = False) -> None:
        self.seed = _check_seed(seed)
        self.deterministic = bool(deterministic)

    def seed_everything(self) -> None:
        """Seed Python, NumPy and torch with ``seed``."""
        set_random_seed(self.seed, self.deterministic)

    def worker_init_fn(self, worker_id: int) -> None:
        """``DataLoader(worker_init_fn=...)``: seed NumPy and Python in each loader worker.

        torch already gives each worker ``base_seed + worker_id``; this derives the
        NumPy and Python seeds from it, so workers differ and runs repeat.
        """
        worker_seed = torch.initial_seed() % 2**32
        np.random.seed(worker_seed)
        random.seed(worker_seed)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with ``seed + offset`` (e.g. for shuffling)."""
        g = torch.Generator()
        g.manual_seed(self.seed + offset)
        return g

    def get_rng_state(self) -> dict[str, Any]:
        """See :func:`get_rng_state`."""
        return get_rng_state()

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """See :func:`set_rng_state`."""
        set_rng_state(state)

    def __repr__(self) -> str:
        return f"SeedManager(seed={self.seed!r}, deterministic={self.deterministic!r})"
