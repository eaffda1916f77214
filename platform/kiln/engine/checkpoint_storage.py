"""Checkpoints on storage every node sees: a local path, a shared mount, or a URI.

A run's checkpoints live in one *checkpoints location* (``<storage>/<run>/checkpoints``
by default), laid out as :mod:`kiln.engine.checkpoint` lays out a local directory:
``epoch_0003/`` folders and ``manifest.json``. The location is a plain path (local
disk, or an NFS/EFS mount on a cluster) or any URI pyarrow's file systems understand
(``s3://bucket/runs/x/checkpoints``, ``gs://...``, ``file:///mnt/...``).

How a checkpoint gets there from Ray Train worker actors (see ``kiln.engine.worker``):

1. each rank writes its files into a node-local *staging* directory (rank 0 runs the
   usual crash-ordered :class:`~kiln.engine.checkpoint.CheckpointManager` there, so
   retention is decided exactly as on one machine);
2. every rank reports its staged folder with ``ray.train.report(..., checkpoint=...,
   checkpoint_dir_name="checkpoints/epoch_0003")``: Ray Train uploads each rank's files
   into that one storage folder (the folders of all ranks merge);
3. after a barrier (every rank's upload is done) rank 0 *commits*: it writes the
   staging ``manifest.json`` to storage (temporary name, then a move: a rename on a
   file system; on an object store each object appears whole), and only then deletes
   the folders that retention dropped.

A restarted rank 0 (Ray Train restarts the workers after a failure) first deletes
what was uploaded but never committed, then copies the committed checkpoints into a
fresh staging folder and resumes from the latest of them.

A folder that is in storage but not in the manifest is an upload that did not
finish: readers here follow the manifest only, and the local reader
(:func:`kiln.engine.checkpoint_reader._read_index`) adopts such a folder only when
every file its metadata lists is there at its full size. The driver reads storage
only through :class:`CheckpointStore`: for a URI it downloads the checkpoints it
needs; a plain path it reads in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln._fs import TMP_MARK
from kiln.engine.checkpoint_reader import MANIFEST_FILE, METADATA_FILE
from kiln.errors import CheckpointError

__all__ = ["CheckpointStore", "StagedCheckpoints", "is_uri", "local_copy", "split_location"]


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (s3, gs, file, ...); False for a plain path."""
    return "://" in os.fspath(location)


def split_location(location: str) -> tuple[str, str, str]:
    """``(storage_path, run_name, prefix)`` with ``location == storage_path/run_name/prefix``.

    Ray Train uploads a reported checkpoint to ``<storage_path>/<name>/<checkpoint_dir_name>``;
    kiln's checkpoints location is split so that ``checkpoint_dir_name`` is
    ``<prefix>/epoch_0003``. Raises CheckpointError for a location less than two levels
    below its root.
    """
    scheme, sep, rest = location.rstrip("/").partition("://")
    parent, _, prefix = (rest if sep else scheme).rpartition("/")
    storage, _, run = parent.rpartition("/")
    if not prefix or not run:
        raise CheckpointError(
            f"checkpoint location {location!r} must name <storage>/<run>/<checkpoints>, "
            "e.g. '/data/runs/my-run/checkpoints' or 's3://bucket/runs/my-run/checkpoints'"
        )
    return (f"{scheme}://{storage}" if sep else storage or "/"), run, prefix


class CheckpointStore:
    """One checkpoints location (a path or a URI) read and written through pyarrow.

    Picklable (it holds the location string only); the file system is opened on first
    use in each process.

    Args:
        location: ``/shared/runs/my-run/checkpoints`` or ``s3://bucket/runs/my-run/checkpoints``.
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = os.fspath(location)
        self.location = text.rstrip("/") if is_uri(text) else str(Path(text).expanduser())
        self._fs: Any = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"CheckpointStore({self.location!r})"

    @property
    def is_uri(self) -> bool:
        return is_uri(self.location)

    def _open(self) -> tuple[Any, str]:
        if self._fs is None:
            import pyarrow.fs

            if self.is_uri:
                self._fs, self._root = pyarrow.fs.FileSystem.from_uri(self.location)
            else:
                self._fs, self._root = pyarrow.fs.LocalFileSystem(), self.location
        return self._fs, self._root

    def ref(self, name: str) -> str:
        """Where checkpoint ``name`` lives: a path or a URI string, as ``location`` is."""
        return f"{self.location}/{name}"

    def _path(self, name: str) -> str:
        return f"{self._open()[1]}/{name}"

    # -- reading -------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or None when nothing was committed here yet."""
        import pyarrow

        fs, _ = self._open()
        try:
            with fs.open_input_stream(self._path(MANIFEST_FILE)) as f:
                return json.loads(f.read().decode("utf-8"))
        except (FileNotFoundError, pyarrow.ArrowInvalid, OSError):
            return None

    def committed(self) -> list[str]:
        """Names of the committed checkpoints, oldest first (the last is the latest)."""
        manifest = self.read_manifest() or {}
        return [e["name"] for e in manifest.get("checkpoints", []) if e.get("name")]

    def latest_ref(self) -> str | None:
        """The latest committed checkpoint (a path or URI), or None."""
        if not self.is_uri:  # a plain path: the local reader also recovers a crash mid-commit
            from kiln.engine.checkpoint_reader import resolve_checkpoint

            try:
                return str(resolve_checkpoint("latest", self.location))
            except CheckpointError:
                return None
        names = self.committed()
        return self.ref(names[-1]) if names else None

    def resolve(self, keyword: str) -> str:
        """``"latest"`` or ``"best"`` among the committed checkpoints (CheckpointError if none)."""
        if not self.is_uri:
            from kiln.engine.checkpoint_reader import resolve_checkpoint

            return str(resolve_checkpoint(keyword, self.location))
        from kiln.engine.checkpoint_reader import _rank

        manifest = self.read_manifest() or {}
        entries = [e for e in manifest.get("checkpoints", []) if e.get("name")]
        if keyword == "best":
            monitor, mode = manifest.get("monitor") or "val_loss", manifest.get("mode") or "min"
            entries = list(reversed(_rank(entries, monitor, mode)))
        if not entries:
            raise CheckpointError(
                f"no committed checkpoint in {self.location!r} to resolve {keyword!r}"
            )
        return self.ref(entries[-1]["name"])

    def modified(self) -> float:
        """When the manifest last changed (seconds since the epoch), 0.0 if there is none."""
        import pyarrow.fs

        fs, _ = self._open()
        info = fs.get_file_info(self._path(MANIFEST_FILE))
        if info.type == pyarrow.fs.FileType.NotFound or info.mtime is None:
            return 0.0
        return info.mtime.timestamp()

    def download(self, local_dir: str | os.PathLike[str], names: list[str] | None = None) -> Path:
        """Copy the manifest and the committed checkpoints (or ``names``) into ``local_dir``."""
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        manifest = self.read_manifest()
        if manifest is None:
            return local
        for name in self.committed() if names is None else names:
            self._copy_in(name, local / name)
        tmp = local / f"{MANIFEST_FILE}{TMP_MARK}{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, local / MANIFEST_FILE)
        return local

    def _copy_in(self, name: str, target: Path) -> None:
        """Download one checkpoint folder, publishing it only once it is whole."""
        import pyarrow.fs

        if (target / METADATA_FILE).is_file():
            return
        tmp = target.with_name(f"{target.name}{TMP_MARK}{uuid.uuid4().hex}")
        fs, _ = self._open()
        try:
            tmp.mkdir(parents=True)
            pyarrow.fs.copy_files(
                self._path(name), str(tmp), source_filesystem=fs,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )  # fmt: skip
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- writing (rank 0 of a run, or the driver in-process) ------------------------------

    def upload(self, local_checkpoint: str | os.PathLike[str], name: str) -> None:
        """Copy one local checkpoint folder to ``name`` here (what Ray Train does for actors)."""
        import pyarrow.fs

        fs, _ = self._open()
        fs.create_dir(self._path(name), recursive=True)
        pyarrow.fs.copy_files(
            os.fspath(local_checkpoint), self._path(name),
            source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs,
        )  # fmt: skip

    def commit(self, manifest: dict[str, Any], previous: list[str]) -> list[str]:
        """Publish ``manifest``; then delete ``previous`` folders it no longer lists.

        Call it only when every file of the newest checkpoint is in storage. Returns the
        committed names (pass them as ``previous`` next time).
        """
        fs, _ = self._open()
        fs.create_dir(self._open()[1], recursive=True)
        tmp = self._path(f"{MANIFEST_FILE}{TMP_MARK}{uuid.uuid4().hex}")
        with fs.open_output_stream(tmp) as f:
            f.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        fs.move(tmp, self._path(MANIFEST_FILE))  # a rename on a file system
        names = [e["name"] for e in manifest.get("checkpoints", [])]
        for old in previous:
            if old not in names:
                self.delete(old)
        return names

    def remove_uncommitted(self) -> list[str]:
        """Delete checkpoint folders the manifest does not list (uploads never committed).

        Only the run's rank 0 calls it, at start-up, when no upload is in flight.
        """
        import pyarrow.fs

        fs, root = self._open()
        selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
        keep = set(self.committed())
        removed = []
        for info in fs.get_file_info(selector):
            name = info.base_name
            if (name.startswith("epoch_") and name not in keep) or TMP_MARK in name:
                if info.type == pyarrow.fs.FileType.Directory:
                    fs.delete_dir(info.path)
                else:
                    fs.delete_file(info.path)
                removed.append(name)
        return removed

    def delete(self, name: str) -> None:
        """Remove checkpoint folder ``name`` (missing: nothing to do)."""
        import pyarrow.fs

        fs, _ = self._open()
        if fs.get_file_info(self._path(name)).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(self._path(name))


@contextlib.contextmanager
def local_copy(ref: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder holding checkpoint ``ref``: itself for a path, a download for a URI."""
    text = os.fspath(ref)
    if not is_uri(text):
        yield Path(text)
        return
    parent, _, name = text.rstrip("/").rpartition("/")
    with tempfile.TemporaryDirectory(prefix="kiln-ckpt-") as tmp:
        store = CheckpointStore(parent)
        try:
            store._copy_in(name, Path(tmp) / name)
        except (FileNotFoundError, OSError) as exc:
            raise CheckpointError(f"cannot download checkpoint {text!r}: {exc}") from exc
        yield Path(tmp) / name


class StagedCheckpoints:
    """One rank's node-local staging folder for checkpoints bound for a :class:`CheckpointStore`.

    Rank 0's :class:`~kiln.engine.checkpoint.CheckpointManager` writes into :attr:`dir`
    (crash-ordered, with kiln's retention). Each saved folder then reaches storage,
    through Ray Train's upload (``via_ray``: worker actors) or :meth:`upload` (an
    in-process run), and :meth:`commit` publishes the manifest there.

    Args:
        store: where the run's checkpoints live.
        root: this rank's staging folder (created if missing).
        rank: the Ray Train world rank.
        via_ray: worker actors, whose reports Ray Train uploads; False in-process.
        keep: leave ``root`` in place on :meth:`close` (an in-process run's local copy).
    """

    def __init__(
        self, store: CheckpointStore, root: Path, rank: int, via_ray: bool, keep: bool = False
    ) -> None:
        self.store, self.root, self.rank, self.via_ray, self.keep = store, root, rank, via_ray, keep
        self.prefix = store.location.rstrip("/").rpartition("/")[2]
        self.dir = root / self.prefix if via_ray else root
        self.committed: list[str] = []

    @classmethod
    def open(
        cls, location: str, rank: int, via_ray: bool, local_dir: str | None = None
    ) -> StagedCheckpoints:
        """A staging folder for ``rank``; rank 0's holds the run's committed checkpoints.

        On a restart after a failure, storage is the truth: rank 0 copies the committed
        checkpoints (and manifest) into a fresh staging folder, so retention carries on
        and nothing that was written but never committed comes back.
        """
        store = CheckpointStore(location)
        if local_dir is not None:
            root, keep = Path(local_dir), True
            root.mkdir(parents=True, exist_ok=True)
        else:
            root, keep = Path(tempfile.mkdtemp(prefix=f"kiln-rank{rank}-", dir=_node_tmp())), False
        staged = cls(store, root, rank, via_ray, keep)
        if rank == 0:
            store.remove_uncommitted()  # a restart: what was uploaded but never committed
            staged.committed = store.committed()
            if staged.committed and not keep:
                store.download(staged.dir)
        return staged

    def dir_name(self, epoch: int, name: str | None = None) -> str:
        """The ``checkpoint_dir_name`` Ray Train uploads epoch ``epoch`` (or the
        checkpoint called ``name``, one taken inside an epoch) to."""
        return f"{self.prefix}/{name or f'epoch_{epoch:04d}'}"

    def upload(self, local_checkpoint: str | os.PathLike[str]) -> None:
        """In-process runs: copy one saved folder to storage (Ray Train does it for actors)."""
        self.store.upload(local_checkpoint, Path(local_checkpoint).name)

    def commit(self) -> None:
        """Rank 0, once every rank's files of the newest checkpoint are in storage."""
        manifest = json.loads((self.dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        self.committed = self.store.commit(manifest, self.committed)

    def close(self) -> None:
        """Remove the staging folder (not an in-process run's local copy)."""
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _node_tmp() -> str | None:
    """This node's Ray session folder for the run (its ``--temp-dir``), else the system's."""
    try:
        import ray.train

        path = Path(ray.train.get_context().get_storage().local_working_directory)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    except Exception:  # local mode has no storage context; any other failure: plain tmp
        return None
