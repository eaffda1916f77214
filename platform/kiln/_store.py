"""The one module that owns SQLite connections for kiln's stores.

Every store (runs, model registry, job queue) opens its file through :class:`Store`,
which gives it the same guarantees:

- the ``apsw`` binding (it bundles its own SQLite; the standard library's ``sqlite3``
  links the system SQLite, which may sit in the WAL-reset bug range 3.7.0-3.51.2);
  :func:`check_sqlite_version` refuses anything older than 3.51.3;
- WAL journal mode, ``synchronous=NORMAL``, foreign keys on, and a busy timeout, so
  several processes can read and write the same file without "database is locked";
- ``BEGIN IMMEDIATE`` for every transaction that writes (reads that decide a write run
  inside it, so no two writers act on the same stale read);
- a ``schema_version`` table with one row per component and ordered migrations, so
  a file written by an older kiln opens and is upgraded in place.

A connection belongs to one process: after ``fork`` the child opens its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from kiln.errors import StoreError

__all__ = [
    "MIN_SQLITE_VERSION",
    "Migration",
    "Store",
    "StoreError",
    "check_sqlite_version",
    "sqlite_version",
]

#: First SQLite release outside the WAL-reset bug (3.7.0 - 3.51.2).
MIN_SQLITE_VERSION = (3, 51, 3)
DEFAULT_BUSY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Migration:
    """One step of a component's schema: applied once, in ``version`` order.

    Args:
        version: 1 for the first schema, then 2, 3, ... without gaps.
        description: One line saying what the step changes.
        sql: SQL statements (several allowed, separated by ``;``).
    """

    version: int
    description: str
    sql: str


def sqlite_version() -> tuple[int, int, int]:
    """The version of the SQLite library that ``apsw`` is linked against."""
    major, minor, patch = ([*apsw.sqlite_lib_version().split("."), "0", "0"])[:3]
    return int(major), int(minor), int(patch)


def check_sqlite_version(version: tuple[int, int, int] | None = None) -> None:
    """Raise :class:`StoreError` if SQLite is older than :data:`MIN_SQLITE_VERSION`."""
    found = sqlite_version() if version is None else version
    if tuple(found) < MIN_SQLITE_VERSION:
        have = ".".join(map(str, found))
        need = ".".join(map(str, MIN_SQLITE_VERSION))
        raise StoreError(
            f"SQLite {have!r} is in the WAL-reset bug range (3.7.0 - 3.51.2) and can corrupt "
            f"a database shared by several processes; kiln needs SQLite >= {need}. "
            f"Fix: `pip install -U 'apsw>=3.51.3'` (apsw bundles its own SQLite)."
        )


def _validate_migrations(component: str, migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(
            f"migrations of {component!r} must be numbered 1..N in order; got {versions!r}"
        )


class Store:
    """A SQLite file opened the kiln way (see the module docstring).

    Args:
        path: The database file (created if missing), or ``":memory:"``.
        busy_timeout_s: How long a writer waits for another one before failing.
    """

    def __init__(
        self, path: str | os.PathLike[str], busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> None:
        check_sqlite_version()
        self.path = str(path) if str(path) == ":memory:" else str(Path(path).expanduser())
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._conn: apsw.Connection | None = None
        self._pid: int | None = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.connection()  # fail early on a bad path

    # -- connection -------------------------------------------------------------------

    def connection(self) -> apsw.Connection:
        """This process's connection, opened on first use (and again after a fork)."""
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = apsw.Connection(self.path)
            except apsw.Error as exc:
                raise StoreError(f"cannot open SQLite file {self.path!r}: {exc}") from exc
            conn.setbusytimeout(int(self.busy_timeout_s * 1000))
            cur = conn.cursor()
            if self.path != ":memory:":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        """Close this process's connection (a later call reopens it)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __getstate__(self) -> dict[str, Any]:  # pickles as its path, never a connection
        return {"path": self.path, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["busy_timeout_s"])  # type: ignore[misc]

    # -- statements -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[apsw.Cursor]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error); yields a cursor.

        Take every read that decides a write inside this block.
        """
        with self._lock:
            cur = self.connection().cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple]:
        """Run one read statement outside a write transaction; return all rows."""
        with self._lock:
            return list(self.connection().cursor().execute(sql, params))

    def query_dicts(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict]:
        """Like :meth:`query`, each row as a dict keyed by column name."""
        with self._lock:
            cur = self.connection().cursor().execute(sql, params)
            try:
                names = [d[0] for d in cur.getdescription()]
            except apsw.ExecutionCompleteError:  # no rows
                return []
            return [dict(zip(names, row, strict=True)) for row in cur]

    # -- schema -----------------------------------------------------------------------

    def schema_version(self, component: str) -> int:
        """The applied schema version of ``component`` (0 when none)."""
        self._ensure_version_table()
        rows = self.query("SELECT version FROM schema_version WHERE component = ?", (component,))
        return int(rows[0][0]) if rows else 0

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply the migrations of ``component`` that this file lacks; return its version.

        Runs in one ``BEGIN IMMEDIATE`` transaction, so processes opening a new file at
        the same time apply each step exactly once.
        """
        _validate_migrations(component, migrations)
        self._ensure_version_table()
        latest = len(migrations)
        with self.transaction() as cur:
            rows = list(
                cur.execute("SELECT version FROM schema_version WHERE component = ?", (component,))
            )
            current = int(rows[0][0]) if rows else 0
            if current > latest:
                raise StoreError(
                    f"{self.path!r} holds schema version {current} of {component!r}, newer than "
                    f"this kiln knows ({latest}); upgrade kiln to open it."
                )
            for step in migrations[current:]:
                cur.execute(step.sql)
            if current < latest:
                cur.execute(
                    "INSERT INTO schema_version(component, version) VALUES (?, ?) "
                    "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                    (component, latest),
                )
        return latest

    def _ensure_version_table(self) -> None:
        with self._lock:
            self.connection().cursor().execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
