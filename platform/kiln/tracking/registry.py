"""ModelRegistry: versions, tags and lineage of trained models, in kiln's SQLite file.

Registering a model copies its checkpoint (a file or a directory) into the artifact
store, named by its sha256, so deleting a run's folder never breaks the registry;
the hash is checked again by :meth:`ModelRegistry.load_checkpoint_path`.

- Versions are ``MAJOR.MINOR.PATCH`` strings, unique per name. When none is given,
  the next *minor* version of that name is used (``1.0.0``, ``1.1.0``, ``1.2.0``...):
  a retrained model is a new compatible release; bump major/patch by passing one.
- A tag (``production``, ``staging``...) points at one version of a name at a time.
  Promoting another version moves it; every move is kept in ``tag_history`` with its
  time, and :meth:`ModelRegistry.rollback` moves a tag back to its previous holder.
- :meth:`ModelRegistry.delete_model` retires a model: it keeps its row and artifact,
  loses its tags, and can hold no tag again.
- References as strings: ``"name"`` (newest active version), ``"name:1.2.0"``,
  ``"name@production"`` (see :meth:`ModelRegistry.resolve`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from kiln._store import Migration, Store
from kiln.errors import ModelNotFoundError, RegistryError
from kiln.tracking._artifacts import ArtifactPathError, ArtifactStore

__all__ = [
    "MIGRATIONS",
    "ArtifactPathError",
    "ModelRegistry",
    "ModelRegistryEntry",
    "ModelStatus",
    "RegistryError",
    "config_hash",
]

COMPONENT = "registry"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "models and tags",
        """
        CREATE TABLE models (
            model_id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            checkpoint_path TEXT NOT NULL,
            task_type TEXT,
            config_hash TEXT,
            training_run_id INTEGER,
            parent_model_id INTEGER REFERENCES models(model_id),
            created_at TEXT NOT NULL,
            metrics TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL DEFAULT 'active',
            UNIQUE (name, version)
        );
        CREATE TABLE model_tags (
            name TEXT NOT NULL,
            tag TEXT NOT NULL,
            model_id INTEGER NOT NULL REFERENCES models(model_id),
            updated_at TEXT NOT NULL,
            PRIMARY KEY (name, tag)
        );
        """,
    ),
    Migration(
        2,
        "content hashes, descriptions, sizes and the tag history",
        """
        ALTER TABLE models ADD COLUMN sha256 TEXT;
        ALTER TABLE models ADD COLUMN description TEXT NOT NULL DEFAULT '';
        ALTER TABLE models ADD COLUMN config TEXT;
        ALTER TABLE models ADD COLUMN export_formats TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE models ADD COLUMN model_size_mb REAL;
        ALTER TABLE models ADD COLUMN memory_req_gb REAL;
        CREATE INDEX model_tags_by_model ON model_tags(model_id);
        CREATE TABLE tag_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            tag TEXT NOT NULL,
            action TEXT NOT NULL,
            model_id INTEGER,
            previous_model_id INTEGER,
            at TEXT NOT NULL
        );
        CREATE INDEX tag_history_by_name ON tag_history(name, tag, id);
        """,
    ),
    Migration(
        3,
        "evaluations of a model version on a labelled set (kiln eval)",
        """
        CREATE TABLE model_evaluations (
            evaluation_id INTEGER PRIMARY KEY AUTOINCREMENT,
            model_id INTEGER NOT NULL REFERENCES models(model_id),
            dataset TEXT NOT NULL,
            split TEXT NOT NULL,
            metrics TEXT NOT NULL,
            details TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        );
        CREATE INDEX model_evaluations_by_model ON model_evaluations(model_id, evaluation_id);
        """,
    ),
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_COLUMNS = (
    "model_id, name, version, checkpoint_path, task_type, config_hash, training_run_id, "
    "parent_model_id, created_at, metrics, export_formats, model_size_mb, memory_req_gb, "
    "status, sha256, description, config"
)
_FORMAT_SUFFIXES = {".onnx": "onnx", ".pt": "pytorch", ".pth": "pytorch", ".safetensors": "pytorch"}


class ModelStatus(str, enum.Enum):
    """``active`` and ``experimental`` models can hold tags; ``retired`` ones cannot."""

    ACTIVE = "active"
    EXPERIMENTAL = "experimental"
    RETIRED = "retired"


@dataclass(frozen=True)
class ModelRegistryEntry:
    """One registered model version (seed 002's fields, then kiln's additions).

    ``checkpoint_path`` is the copy inside the artifact store; ``memory_req_gb`` is a
    rough training estimate: 4 x the checkpoint (weights, gradients, two Adam moments).
    """

    model_id: int
    name: str
    version: str
    checkpoint_path: str
    task_type: str | None
    config_hash: str | None
    training_run_id: int | None
    parent_model_id: int | None
    created_at: str
    metrics: dict[str, float]
    export_formats: list[str]
    model_size_mb: float | None
    memory_req_gb: float | None
    status: str
    tags: list[str]
    sha256: str | None = None
    description: str = ""
    config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ref(self) -> str:
        """``name:version``, the string :meth:`ModelRegistry.resolve` accepts."""
        return f"{self.name}:{self.version}"


def config_hash(config: Mapping[str, Any] | None) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no spaces)."""
    text = json.dumps(dict(config or {}), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _semver(version: str) -> tuple[int, int, int]:
    match = _VERSION_RE.match(str(version))
    if not match:
        raise RegistryError(
            f"version={version!r} is not a semantic version; use MAJOR.MINOR.PATCH like '1.2.0'"
        )
    return int(match[1]), int(match[2]), int(match[3])


def _check(pattern: re.Pattern[str], what: str, value: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise RegistryError(
            f"{what}={value!r} is not allowed; use letters, digits and '_.-'"
            + (" or '/'" if what == "name" else "")
            + ", starting with a letter or digit"
        )
    return value


def _export_formats(path: Path) -> list[str]:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    found = set()
    for f in files:
        if "torchscript" in f.name:
            found.add("torchscript")
        elif f.suffix in _FORMAT_SUFFIXES:
            found.add(_FORMAT_SUFFIXES[f.suffix])
    return sorted(found)


class ModelRegistry:
    """Registered models with versions, tags and lineage.

    Args:
        db_path: The SQLite file (usually ``kiln_home()/kiln.db``).
        artifacts_dir: The content-addressed store (usually ``kiln_home()/artifacts``);
            defaults to ``artifacts/`` beside ``db_path``.
    """

    def __init__(
        self, db_path: str | os.PathLike[str], artifacts_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.store = Store(db_path)
        self.store.migrate(COMPONENT, MIGRATIONS)
        root = artifacts_dir if artifacts_dir is not None else Path(db_path).parent / "artifacts"
        self.artifacts = ArtifactStore(root)

    def close(self) -> None:
        self.store.close()

    # -- writing ----------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        checkpoint_path: str | os.PathLike[str],
        version: str | None = None,
        config: Mapping[str, Any] | None = None,
        config_hash: str | None = None,
        metrics: Mapping[str, float] | None = None,
        task_type: str | None = None,
        training_run_id: int | None = None,
        parent_model_id: int | None = None,
        tags: Iterable[str] | None = None,
        description: str = "",
        export_formats: Iterable[str] | None = None,
        status: str = "active",
    ) -> int:
        """Copy the checkpoint into the artifact store and record a new version.

        Returns the new ``model_id``. ``version`` defaults to the next minor version of
        ``name``; ``config_hash`` to the sha256 of ``config``'s canonical JSON; ``tags``
        are promoted to the new version at once.
        """
        _check(_NAME_RE, "name", name)
        if version is not None:
            _semver(version)
        state = ModelStatus(status) if status in ModelStatus._value2member_map_ else None
        if state is None or state is ModelStatus.RETIRED:
            raise RegistryError(f"status={status!r} is not allowed; use 'active' or 'experimental'")
        tag_list = [_check(_TAG_RE, "tag", t) for t in (tags or [])]
        sha, stored, size = self.artifacts.put(checkpoint_path)
        chash = config_hash if config_hash is not None else _config_hash(config)
        formats = list(export_formats) if export_formats is not None else _export_formats(stored)
        size_mb = size / 2**20
        with self.store.transaction() as cur:
            if parent_model_id is not None:
                self._row(cur, int(parent_model_id))  # raises if unknown
            taken = [
                r[0] for r in cur.execute("SELECT version FROM models WHERE name = ?", (name,))
            ]
            if version is None:
                major, minor, _ = max((_semver(v) for v in taken), default=(1, -1, 0))
                version = f"{major}.{minor + 1}.0"
            elif version in taken:
                raise RegistryError(
                    f"{name}:{version} is already registered; registered versions of {name!r}: "
                    f"{', '.join(sorted(taken, key=_semver))}"
                )
            cur.execute(
                "INSERT INTO models(name, version, checkpoint_path, task_type, config_hash, "
                "training_run_id, parent_model_id, created_at, metrics, status, sha256, "
                "description, config, export_formats, model_size_mb, memory_req_gb) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    str(stored),
                    task_type,
                    chash,
                    training_run_id,
                    parent_model_id,
                    _now(),
                    json.dumps({k: float(v) for k, v in (metrics or {}).items()}),
                    state.value,
                    sha,
                    description,
                    None if config is None else json.dumps(dict(config), default=str),
                    json.dumps(formats),
                    size_mb,
                    4 * size_mb / 1024,
                ),
            )
            model_id = int(self.store.connection().last_insert_rowid())
            for tag in tag_list:
                self._move_tag(cur, name, tag, model_id, "promote")
        return model_id

    def promote_model(self, model_id: int, tag: str) -> None:
        """Point ``tag`` of this model's name at this model (moving it from another)."""
        _check(_TAG_RE, "tag", tag)
        with self.store.transaction() as cur:
            row = self._row(cur, int(model_id))
            if row["status"] == ModelStatus.RETIRED.value:
                raise RegistryError(
                    f"model {model_id} ({row['name']}:{row['version']}) is retired and cannot "
                    f"hold tag {tag!r}; promote an active version instead"
                )
            self._move_tag(cur, row["name"], tag, int(model_id), "promote")

    def delete_model(self, model_id: int) -> None:
        """Retire a model: it keeps its record and artifact but loses (and cannot hold) tags."""
        with self.store.transaction() as cur:
            row = self._row(cur, int(model_id))
            held = [
                r[0]
                for r in cur.execute("SELECT tag FROM model_tags WHERE model_id = ?", (model_id,))
            ]
            now = _now()
            for tag in held:
                cur.execute(
                    "INSERT INTO tag_history(name, tag, action, model_id, previous_model_id, at) "
                    "VALUES (?, ?, 'retire', NULL, ?, ?)",
                    (row["name"], tag, int(model_id), now),
                )
            cur.execute("DELETE FROM model_tags WHERE model_id = ?", (int(model_id),))
            cur.execute("UPDATE models SET status = 'retired' WHERE model_id = ?", (int(model_id),))

    retire_model = delete_model

    def rollback(self, name: str, tag: str) -> ModelRegistryEntry:
        """Move ``tag`` of ``name`` back to its previous (still active) holder; return it."""
        with self.store.transaction() as cur:
            stack = self._holder_stack(cur, name, tag)
            if len(stack) < 2:
                current = f"model {stack[-1]}" if stack else "nobody"
                raise ModelNotFoundError(
                    f"tag {tag!r} of {name!r} has no previous holder to roll back to "
                    f"(it is held by {current}); see `kiln models history {name}`"
                )
            self._move_tag(cur, name, tag, stack[-2], "rollback")
            target = stack[-2]
        return self.get_model(model_id=target)

    def _move_tag(self, cur: Any, name: str, tag: str, model_id: int, action: str) -> None:
        held = list(
            cur.execute("SELECT model_id FROM model_tags WHERE name = ? AND tag = ?", (name, tag))
        )
        previous = held[0][0] if held else None
        if previous == model_id:
            return
        now = _now()
        cur.execute(
            "INSERT INTO model_tags(name, tag, model_id, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name, tag) DO UPDATE SET model_id = excluded.model_id, "
            "updated_at = excluded.updated_at",
            (name, tag, model_id, now),
        )
        cur.execute(
            "INSERT INTO tag_history(name, tag, action, model_id, previous_model_id, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, tag, action, model_id, previous, now),
        )

    def _holder_stack(self, cur: Any, name: str, tag: str) -> list[int]:
        """Replay a tag's history: promotes push, rollbacks pop, retirements remove."""
        stack: list[int] = []
        rows = cur.execute(
            "SELECT action, model_id, previous_model_id FROM tag_history "
            "WHERE name = ? AND tag = ? ORDER BY id",
            (name, tag),
        )
        for action, model_id, previous in list(rows):
            if action == "promote":
                if not stack and previous is not None:  # moved from a pre-history holder
                    stack.append(previous)
                stack.append(model_id)
            elif action == "rollback" and stack:
                stack.pop()
                if not stack or stack[-1] != model_id:
                    stack.append(model_id)
            elif action == "retire":
                stack = [m for m in stack if m != previous]
        held = list(
            cur.execute("SELECT model_id FROM model_tags WHERE name = ? AND tag = ?", (name, tag))
        )
        if held and (not stack or stack[-1] != held[0][0]):
            stack.append(held[0][0])
        retired = {
            r[0] for r in cur.execute("SELECT model_id FROM models WHERE status = 'retired'")
        }
        deduped: list[int] = []
        for m in (m for m in stack if m not in retired):
            if not deduped or deduped[-1] != m:
                deduped.append(m)
        return deduped

    def record_evaluation(
        self,
        model_id: int,
        dataset: str,
        split: str,
        metrics: Mapping[str, float],
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Record an evaluation of ``model_id`` (``kiln eval``); return its id."""
        with self.store.transaction() as cur:
            self._row(cur, int(model_id))  # raises if unknown
            cur.execute(
                "INSERT INTO model_evaluations(model_id, dataset, split, metrics, details, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    int(model_id),
                    str(dataset),
                    str(split),
                    json.dumps({k: float(v) for k, v in metrics.items()}),
                    json.dumps(dict(details or {}), default=str),
                    _now(),
                ),
            )
            return int(self.store.connection().last_insert_rowid())

    def evaluations(self, model_id: int) -> pd.DataFrame:
        """Evaluations of ``model_id``, newest first: evaluation_id, created_at, dataset,
        split, then one column per metric (details such as the confusion matrix in
        ``details``, a dict)."""
        rows = self.store.query(
            "SELECT evaluation_id, created_at, dataset, split, metrics, details "
            "FROM model_evaluations WHERE model_id = ? ORDER BY evaluation_id DESC",
            (int(model_id),),
        )
        base = ["evaluation_id", "created_at", "dataset", "split"]
        out = []
        for eid, at, dataset, split, metrics, details in rows:
            row = dict(zip(base, (eid, at, dataset, split), strict=True))
            row.update(json.loads(metrics))
            row["details"] = json.loads(details)
            out.append(row)
        return pd.DataFrame(out, columns=None if out else [*base, "details"])

    def find_by_sha256(self, sha256: str) -> list[ModelRegistryEntry]:
        """Registered versions whose stored checkpoint has this content hash, oldest first."""
        rows = self.store.query(
            "SELECT model_id FROM models WHERE sha256 = ? ORDER BY model_id", (sha256,)
        )
        return [self.get_model(model_id=r[0]) for r in rows]

    # -- reading ----------------------------------------------------------------------

    def get_model(
        self,
        model_id: int | None = None,
        version: str | None = None,
        tag: str | None = None,
        name: str | None = None,
    ) -> ModelRegistryEntry:
        """One model, by id; by name and version or tag; by name (newest active version);
        or by tag alone (the most recently moved holder of that tag)."""
        if model_id is not None:
            return self._entry(self._row(None, int(model_id)))
        if name is None and version is None and tag is None:
            raise RegistryError("get_model() needs model_id, name, version or tag")
        if tag is not None:
            sql = "SELECT model_id FROM model_tags WHERE tag = ?"
            args: list[Any] = [tag]
            if name is not None:
                sql += " AND name = ?"
                args.append(name)
            rows = self.store.query(sql + " ORDER BY updated_at DESC LIMIT 1", args)
            if not rows:
                raise self._tag_not_found(tag, name)
            entry = self._entry(self._row(None, rows[0][0]))
            if version is not None and entry.version != version:
                raise ModelNotFoundError(
                    f"tag {tag!r} points at {entry.ref}, not at version {version!r}"
                )
            return entry
        if name is None:
            rows = self.store.query(
                "SELECT model_id, name FROM models WHERE version = ?", (version,)
            )
            if len(rows) != 1:
                if not rows:
                    raise ModelNotFoundError(f"no model has version {version!r}; pass name= too")
                names = ", ".join(sorted(r[1] for r in rows))
                raise RegistryError(
                    f"version {version!r} exists for several names ({names}); pass name="
                )
            return self._entry(self._row(None, rows[0][0]))
        rows = self.store.query(
            "SELECT model_id, version, status FROM models WHERE name = ?", (name,)
        )
        if not rows:
            raise self._name_not_found(name)
        if version is not None:
            match = [r for r in rows if r[1] == version]
            if not match:
                known = ", ".join(sorted((r[1] for r in rows), key=_semver))
                raise ModelNotFoundError(
                    f"model {name!r} has no version {version!r}; registered versions: {known}"
                )
            return self._entry(self._row(None, match[0][0]))
        active = [r for r in rows if r[2] != ModelStatus.RETIRED.value]
        if not active:
            raise ModelNotFoundError(f"every version of {name!r} is retired; ask for a version")
        return self._entry(self._row(None, max(active, key=lambda r: _semver(r[1]))[0]))

    def resolve(self, ref: str) -> ModelRegistryEntry:
        """An entry from ``"name"``, ``"name:1.2.0"`` or ``"name@production"``."""
        if "@" in ref:
            name, tag = ref.rsplit("@", 1)
            return self.get_model(name=name, tag=tag)
        if ":" in ref:
            name, version = ref.rsplit(":", 1)
            return self.get_model(name=name, version=version)
        return self.get_model(name=ref)

    def load_checkpoint_path(self, entry: ModelRegistryEntry | int | str) -> Path:
        """The stored checkpoint of ``entry`` (entry, id or reference), hash-verified.

        Raises:
            IntegrityError: the stored bytes no longer match the recorded sha256.
            ArtifactPathError: the recorded path lies outside the artifact store.
        """
        if isinstance(entry, int):
            entry = self.get_model(model_id=entry)
        elif isinstance(entry, str):
            entry = self.resolve(entry)
        if entry.sha256 is None:
            raise RegistryError(
                f"{entry.ref} was registered by an older kiln without a content hash; "
                f"register its checkpoint again to store a verified copy"
            )
        return self.artifacts.verify(entry.checkpoint_path, entry.sha256)

    def lineage(self, model_id: int) -> list[ModelRegistryEntry]:
        """The model, its parent, the parent's parent... (oldest last)."""
        chain = [self.get_model(model_id=model_id)]
        while chain[-1].parent_model_id is not None and len(chain) < 1000:
            chain.append(self.get_model(model_id=chain[-1].parent_model_id))
        return chain

    def list_models(
        self, limit: int | None = None, name: str | None = None, include_retired: bool = True
    ) -> pd.DataFrame:
        """Models, newest first, with their tags and metrics (one column per metric)."""
        sql = f"SELECT {_COLUMNS} FROM models"
        where: list[str] = []
        args: list[Any] = []
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if not include_retired:
            where.append("status != 'retired'")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY model_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        entries = [self._entry(r) for r in self.store.query_dicts(sql, args)]
        return self._frame(entries)

    def compare_models(self, model_ids: Iterable[int]) -> pd.DataFrame:
        """The given models, in that order, side by side with one column per metric."""
        return self._frame([self.get_model(model_id=int(i)) for i in model_ids])

    def tag_history(self, name: str, tag: str | None = None) -> pd.DataFrame:
        """Every tag move of ``name``: at, tag, action, model_id, version, previous_model_id,
        previous_version, metrics, previous_metrics."""
        if not self.store.query("SELECT 1 FROM models WHERE name = ? LIMIT 1", (name,)):
            raise self._name_not_found(name)
        sql = (
            "SELECT h.at, h.tag, h.action, h.model_id, m.version, m.metrics, "
            "h.previous_model_id, p.version, p.metrics FROM tag_history h "
            "LEFT JOIN models m ON m.model_id = h.model_id "
            "LEFT JOIN models p ON p.model_id = h.previous_model_id WHERE h.name = ?"
        )
        args: list[Any] = [name]
        if tag is not None:
            sql += " AND h.tag = ?"
            args.append(tag)
        rows = [
            (at, tg, action, mid, ver, pid, pver, json.loads(m or "{}"), json.loads(pm or "{}"))
            for at, tg, action, mid, ver, m, pid, pver, pm in self.store.query(
                sql + " ORDER BY h.id", args
            )
        ]
        columns = ["at", "tag", "action", "model_id", "version", "previous_model_id",
                   "previous_version", "metrics", "previous_metrics"]  # fmt: skip
        df = pd.DataFrame(rows, columns=columns)
        for col in ("model_id", "previous_model_id"):
            df[col] = df[col].astype("Int64")
        return df

    def names(self) -> list[str]:
        """Every registered model name."""
        return [r[0] for r in self.store.query("SELECT DISTINCT name FROM models ORDER BY name")]

    # -- helpers ----------------------------------------------------------------------

    def _row(self, cur: Any, model_id: int) -> dict[str, Any]:
        sql = f"SELECT {_COLUMNS} FROM models WHERE model_id = ?"
        if cur is None:
            rows = self.store.query_dicts(sql, (model_id,))
        else:
            raw = list(cur.execute(sql, (model_id,)))
            names = [c.strip() for c in _COLUMNS.split(",")]
            rows = [dict(zip(names, r, strict=True)) for r in raw]
        if not rows:
            newest = self.store.query(
                "SELECT model_id, name, version FROM models ORDER BY model_id DESC LIMIT 10"
            )
            known = ", ".join(f"{i} ({n}:{v})" for i, n, v in newest) or "(registry is empty)"
            raise ModelNotFoundError(f"no model with id {model_id!r}; newest models: {known}")
        return rows[0]

    def _entry(self, row: dict[str, Any]) -> ModelRegistryEntry:
        tags = [
            r[0]
            for r in self.store.query(
                "SELECT tag FROM model_tags WHERE model_id = ? ORDER BY tag", (row["model_id"],)
            )
        ]
        return ModelRegistryEntry(
            model_id=row["model_id"],
            name=row["name"],
            version=row["version"],
            checkpoint_path=row["checkpoint_path"],
            task_type=row["task_type"],
            config_hash=row["config_hash"],
            training_run_id=row["training_run_id"],
            parent_model_id=row["parent_model_id"],
            created_at=row["created_at"],
            metrics=json.loads(row["metrics"] or "{}"),
            export_formats=json.loads(row["export_formats"] or "[]"),
            model_size_mb=row["model_size_mb"],
            memory_req_gb=row["memory_req_gb"],
            status=row["status"],
            tags=tags,
            sha256=row["sha256"],
            description=row["description"] or "",
            config=json.loads(row["config"]) if row["config"] else None,
        )

    @staticmethod
    def _frame(entries: list[ModelRegistryEntry]) -> pd.DataFrame:
        base = ["model_id", "name", "version", "status", "tags", "task_type", "created_at",
                "model_size_mb", "training_run_id", "parent_model_id", "config_hash", "sha256"]  # fmt: skip
        rows = []
        for e in entries:
            row = {k: getattr(e, k) for k in base}
            row["tags"] = ",".join(e.tags)
            row.update(e.metrics)
            rows.append(row)
        return pd.DataFrame(rows, columns=None if rows else base)

    def _name_not_found(self, name: str) -> ModelNotFoundError:
        known = ", ".join(self.names()) or "(registry is empty)"
        return ModelNotFoundError(f"no model named {name!r}; registered names: {known}")

    def _tag_not_found(self, tag: str, name: str | None) -> ModelNotFoundError:
        if name is not None and not self.store.query(
            "SELECT 1 FROM models WHERE name = ? LIMIT 1", (name,)
        ):
            return self._name_not_found(name)
        sql = "SELECT DISTINCT tag FROM model_tags" + (" WHERE name = ?" if name else "")
        tags = sorted(r[0] for r in self.store.query(sql, (name,) if name else ()))
        where = f" of {name!r}" if name else ""
        return ModelNotFoundError(
            f"no model{where} holds tag {tag!r}; tags in use{where}: {', '.join(tags) or '(none)'}"
        )


_config_hash = config_hash
