"""Seeding repeats random streams; RNG state round-trips through torch.load(weights_only=True)."""

from __future__ import annotations

import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from kiln.engine.seed import SeedManager, get_rng_state, set_random_seed, set_rng_state
from kiln.errors import ConfigError


def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = False


def test_set_random_seed_repeats_all_streams():
    set_random_seed(123)
    first = _draw()
    set_random_seed(123)
    assert _draw() == first
    set_random_seed(124)
    assert _draw() != first


def test_deterministic_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_random_seed(1, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    set_random_seed(1, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "7", True])
def test_seed_validation(bad):
    with pytest.raises(ConfigError, match="seed must be"):
        set_random_seed(bad)
    with pytest.raises(ConfigError):
        SeedManager(bad)


def test_rng_state_round_trip_weights_only():
    set_random_seed(7)
    random.gauss(0, 1)  # populate python's gauss_next cache
    np.random.standard_normal()
    state = get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    expected = (random.gauss(0, 1), _draw())
    set_random_seed(999)
    set_rng_state(loaded)
    assert (random.gauss(0, 1), _draw()) == expected


def test_seed_manager_generator_and_worker_init():
    sm = SeedManager(5)
    a = torch.randperm(10, generator=sm.generator()).tolist()
    b = torch.randperm(10, generator=sm.generator()).tolist()
    c = torch.randperm(10, generator=sm.generator(offset=1)).tolist()
    assert a == b and a != c
    sm.seed_everything()
    first = _draw()
    sm.seed_everything()
    assert _draw() == first

    torch.manual_seed(42)
    sm.worker_init_fn(0)
    w = (random.random(), float(np.random.rand()))
    torch.manual_seed(42)
    sm.worker_init_fn(0)
    assert (random.random(), float(np.random.rand())) == w

    clone = pickle.loads(pickle.dumps(sm))
    assert clone.seed == 5 and repr(clone) == "SeedManager(seed=5, deterministic=False)"


def test_worker_init_fn_in_dataloader():
    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor(np.random.rand())

    sm = SeedManager(3)

    def run():
        loader = torch.utils.data.DataLoader(
            DS(),
            batch_size=1,
            num_workers=2,
            worker_init_fn=sm.worker_init_fn,
            generator=sm.generator(),
        )
        return [float(x) for x in loader]

    first = run()
    assert first == run()
    assert len(set(first)) == 4  # workers do not repeat each other's numbers
