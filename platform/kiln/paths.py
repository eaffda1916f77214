"""Where kiln keeps its files: one :class:`RunPaths`, resolved once per entry point.

Entry points (the CLI, ``Trainer``, ``kiln.tune.search``, ``kiln serve``, ``jobs/*.py``,
the job queue) call :meth:`RunPaths.resolve` once and pass the result down; nothing
below them reads ``$KILN_HOME``.

The rule for each location, when it is not given explicitly:

- ``home``: the argument, else ``$KILN_HOME``, else ``~/.kiln``;
- ``db``: ``home/kiln.db``;
- ``artifacts``: next to the database (``db.parent/artifacts``), because the registry
  records artifact paths relative to it: a registry and its artifacts travel together;
- ``runs`` (Ray Train's ``storage_path``), ``datasets``, ``bundles``, ``tune``, ``logs``:
  under ``home``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["RunPaths", "kiln_home"]

PathLike = str | os.PathLike[str]


def kiln_home(override: PathLike | None = None) -> Path:
    """Return kiln's home directory: ``override``, else ``$KILN_HOME``, else ``~/.kiln``."""
    raw = override or os.environ.get("KILN_HOME") or Path.home() / ".kiln"
    home = Path(raw).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _given(value: PathLike | None) -> Path | None:
    return Path(value).expanduser().resolve() if value else None


@dataclass(frozen=True)
class RunPaths:
    """Every location kiln reads or writes, resolved once.

    Attributes:
        home: kiln's home directory.
        db: the SQLite file holding runs, the model registry and the job queue.
        artifacts: content-addressed copies of registered checkpoints.
        runs: Ray Train's ``storage_path``: one folder per run. On a cluster this must
            be storage every node sees (a shared mount); for an object store pass a URI
            as ``Trainer(storage_path=...)`` / ``kiln train --storage``, and ``runs``
            then holds the driver's copies of the checkpoints it reads.
        datasets: local datasets (MNIST's IDX files go in ``datasets/mnist``).
        bundles: export bundles made for ``kiln serve NAME@TAG``.
        tune: Ray Tune experiment folders.
        logs: logs of queued jobs.
    """

    home: Path
    db: Path
    artifacts: Path
    runs: Path
    datasets: Path
    bundles: Path
    tune: Path
    logs: Path

    @classmethod
    def resolve(
        cls,
        home: PathLike | None = None,
        *,
        db: PathLike | None = None,
        artifacts: PathLike | None = None,
        runs: PathLike | None = None,
        datasets: PathLike | None = None,
        bundles: PathLike | None = None,
        tune: PathLike | None = None,
    ) -> RunPaths:
        """Resolve every location; explicit arguments win over the defaults.

        Reads ``$KILN_HOME`` only when ``home`` is None. Creates the home directory
        only (others are created by whoever writes into them).
        """
        root = kiln_home(home)
        db_path = _given(db) or root / "kiln.db"
        return cls(
            home=root,
            db=db_path,
            artifacts=_given(artifacts) or db_path.parent / "artifacts",
            runs=_given(runs) or root / "runs",
            datasets=_given(datasets) or root / "datasets",
            bundles=_given(bundles) or root / "bundles",
            tune=_given(tune) or root / "tune",
            logs=root / "logs",
        )

    def with_overrides(self, **given: PathLike | None) -> RunPaths:
        """A copy with the given (non-None) locations replaced.

        Replacing ``db`` moves ``artifacts`` along with it unless ``artifacts`` is given too.
        """
        changes = {k: Path(v).expanduser().resolve() for k, v in given.items() if v}
        if "db" in changes and "artifacts" not in changes:
            changes["artifacts"] = changes["db"].parent / "artifacts"
        return replace(self, **changes) if changes else self
