"""Shared fixtures: one local Ray per test session, and an isolated KILN_HOME."""

from __future__ import annotations

import os

import pytest

# Fast report round-trips in actor mode (see README: the controller polls workers at this
# interval; Ray's default of ~2 s per report dominates tiny test jobs).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Rich tables as wide as on a 120-column terminal, whatever runs the tests (pytest-xdist's
# processes see COLUMNS=80). A test about a narrow terminal sets its own width.
os.environ["COLUMNS"] = "120"

# Under pytest-xdist (scripts/test runs two processes), each process gets its own
# KILN_HOME, so one process's runs, models and jobs never show up in the other's tables.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.environ.get("KILN_HOME"):
    os.environ["KILN_HOME"] = os.path.join(os.environ["KILN_HOME"], _worker)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every integration test in the session."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh Ray for the tests, even if `ray start` runs here.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _kiln_log_level(monkeypatch):
    """``kiln --verbose/--quiet`` run in-process sets KILN_LOG_LEVEL for the whole
    process (that is its job); put it back after each test so later tests start at the
    default level whatever ran before them."""
    monkeypatch.delenv("KILN_LOG_LEVEL", raising=False)


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
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = _longest_files_first(items)


def _longest_files_first(items: list) -> list:
    """Whole files, the longest-looking first: files with a ``slow`` test, ordered by the
    largest ``timeout`` among their tests (what the author allows a test), then the rest
    in collection order. Under ``pytest -n 2 --dist loadfile --no-loadscope-reorder``
    (scripts/test) the long single-test files start at once instead of last, and the
    many quick unit files fill the end of both processes."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def weight(path) -> tuple[bool, float]:
        group = files[path]
        slow = any(i.get_closest_marker("slow") for i in group)
        limits = [m.args[0] for i in group if (m := i.get_closest_marker("timeout")) and m.args]
        return (not slow, -max(limits, default=0))

    return [item for path in sorted(files, key=weight) for item in files[path]]
