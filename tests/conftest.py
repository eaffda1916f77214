"""Shared fixtures: one local Ray per test session, and an isolated KILN_HOME."""

from __future__ import annotations

import os

import pytest

# Fast report round-trips in actor mode (see README: the controller polls workers at this
# interval; Ray's default of ~2 s per report dominates tiny test jobs).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every integration test in the session."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh Ray for the tests, even if `ray start` runs here.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture()
def kiln_home(tmp_path, monkeypatch):
    """An empty KILN_HOME for one test."""
    home = tmp_path / "kiln_home"
    home.mkdir()
    monkeypatch.setenv("KILN_HOME", str(home))
    return home


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests under tests/integration carry the ``integration`` marker; tests marked
    ``requires_gpu`` are skipped, with the reason, where no CUDA device is present."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present here")
    gpu_checked = None
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("requires_gpu"):
            if gpu_checked is None:
                gpu_checked = _cuda_available()
            if not gpu_checked:
                item.add_marker(no_gpu)
