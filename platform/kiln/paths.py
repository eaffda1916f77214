"""Where kiln keeps its files. Read only by entry points (CLI, jobs/, facades)."""

from __future__ import annotations

import os
from pathlib import Path


def kiln_home(override: str | os.PathLike[str] | None = None) -> Path:
    """Return kiln's home directory: ``override``, else ``$KILN_HOME``, else ``~/.kiln``."""
    raw = override or os.environ.get("KILN_HOME") or Path.home() / ".kiln"
    home = Path(raw).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_db_path(home: Path) -> Path:
    """The SQLite file holding runs, the model registry and the job queue."""
    return home / "kiln.db"


def default_runs_dir(home: Path) -> Path:
    """Ray Train's storage_path: one folder per run with its checkpoints."""
    return home / "runs"


def default_artifacts_dir(home: Path) -> Path:
    """Content-addressed copies of registered checkpoints and bundles."""
    return home / "artifacts"


def default_datasets_dir(home: Path) -> Path:
    """Local datasets such as the MNIST files."""
    return home / "datasets"
