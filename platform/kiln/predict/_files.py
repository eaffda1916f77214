"""Files in and out of batch prediction: formats, pyarrow filesystems, atomic publish.

Locations are local paths or any URI pyarrow understands (``s3://``, ``gs://``,
``file://``...). Ray Data reads and writes them itself; this module only decides
formats, lists part files, and publishes the result:

- a local OUTPUT is written into ``OUTPUT.tmp-<id>/`` and renamed into place at the
  end, so a failed job leaves no half-written output;
- an OUTPUT ending in ``.parquet``/``.csv``/``.jsonl`` is one file: Ray's part files
  are merged into it in order (streaming, one part at a time);
- on object stores (no rename) the parts are written to OUTPUT directly.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, DatasetError

__all__ = ["FORMATS", "Location", "input_format", "read_dataset", "publish"]

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
_SUFFIX = {"parquet": ".parquet", "csv": ".csv", "json": ".jsonl"}


@dataclass(frozen=True)
class Location:
    """A path or URI with its pyarrow filesystem."""

    uri: str
    fs: Any
    path: str

    @classmethod
    def of(cls, where: str | os.PathLike[str]) -> Location:
        from pyarrow import fs as pafs

        text = os.fspath(where)
        if "://" not in text:
            text = str(Path(text).expanduser().resolve())
            return cls(text, pafs.LocalFileSystem(), text)
        filesystem, path = pafs.FileSystem.from_uri(text)
        return cls(text, filesystem, path)

    @property
    def is_local(self) -> bool:
        from pyarrow import fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> Location:
        return Location(
            f"{self.uri.rstrip('/')}/{name}", self.fs, f"{self.path.rstrip('/')}/{name}"
        )

    def sibling(self, suffix: str) -> Location:
        return Location(self.uri.rstrip("/") + suffix, self.fs, self.path.rstrip("/") + suffix)

    def info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def files(self) -> list[str]:
        """Paths of the files under this folder (recursively), sorted; hidden ones left out."""
        from pyarrow import fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted(
            f.path
            for f in found
            if f.type == pafs.FileType.File and not Path(f.path).name.startswith((".", "_"))
        )


def input_format(where: Location, given: str | None = None) -> str:
    """``parquet``, ``csv`` or ``json`` for a file or a folder of files of one type."""
    from pyarrow import fs as pafs

    if given is not None:
        return _check_format(given)
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"input {where.uri!r} does not exist")
    names = [where.path] if info.type == pafs.FileType.File else where.files()
    kinds = {FORMATS[s] for n in names if (s := Path(n).suffix.lower()) in FORMATS}
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) or "none"
        raise DatasetError(
            f"input {where.uri!r}: expected parquet, csv or jsonl files of one type; found "
            f"{found}; pass input_format= (--input-format) to say which"
        )
    return kinds.pop()


def output_format(where: Location, given: str | None, default: str) -> tuple[str, bool]:
    """``(format, single_file)`` of OUTPUT: a known suffix means one file of that type."""
    fmt = FORMATS.get(Path(where.path).suffix.lower())
    if given is not None:
        given = _check_format(given)
        if fmt is not None and fmt != given:
            raise ConfigError(
                f"output {where.uri!r} ends in {Path(where.path).suffix!r} but "
                f"output_format={given!r}; make them agree"
            )
        return given, fmt is not None
    return (fmt, True) if fmt is not None else (default, False)


def _check_format(fmt: str) -> str:
    value = {"jsonl": "json"}.get(fmt, fmt)
    if value not in ("parquet", "csv", "json"):
        raise ConfigError(f"format={fmt!r} is not allowed; use parquet, csv or jsonl")
    return value


def read_dataset(where: Location, fmt: str) -> Any:
    """``ray.data.read_*`` of a file or folder."""
    import ray.data

    if fmt == "parquet":
        return ray.data.read_parquet(where.uri)
    if fmt == "csv":
        return ray.data.read_csv(where.uri, file_extensions=["csv"])
    return ray.data.read_json(where.uri, lines=True, file_extensions=["jsonl", "json"])


def write_dataset(ds: Any, where: Location, fmt: str) -> None:
    if fmt == "parquet":
        ds.write_parquet(where.uri)
    elif fmt == "csv":
        ds.write_csv(where.uri)
    else:
        ds.write_json(where.uri)


def staging(output: Location, overwrite: bool) -> Location:
    """Where Ray writes: a hidden sibling of a local OUTPUT, else OUTPUT itself."""
    from pyarrow import fs as pafs

    kind = output.info().type
    if kind != pafs.FileType.NotFound and not overwrite:
        raise ConfigError(
            f"output {output.uri!r} already exists; pass overwrite=True (--overwrite)"
        )
    if not output.is_local:  # no rename on object stores: clear it, then write in place
        if kind == pafs.FileType.Directory:
            output.fs.delete_dir_contents(output.path)
        elif kind == pafs.FileType.File:
            output.fs.delete_file(output.path)
        return output
    parent = Path(output.path).parent
    parent.mkdir(parents=True, exist_ok=True)
    return Location.of(parent / f".{Path(output.path).name}.tmp-{uuid.uuid4().hex[:8]}")


def publish(staged: Location, output: Location, fmt: str, single_file: bool) -> int:
    """Move the written parts to OUTPUT (one merged file, or the folder); return rows."""
    parts = [
        p
        for p in staged.files()
        if Path(p).suffix.lower() in (".parquet", ".csv", ".json", ".jsonl")
    ]
    if single_file:
        tmp = output.sibling(f".tmp-{uuid.uuid4().hex[:8]}")
        rows = _merge(staged.fs, parts, tmp, fmt)
        _replace(tmp, output)
        _remove(staged)
        return rows
    rows = sum(_count(staged.fs, p, fmt) for p in parts)
    if staged.path != output.path:
        _replace(staged, output)
    return rows


def _replace(src: Location, dst: Location) -> None:
    import shutil

    if dst.is_local and Path(dst.path).is_dir():
        aside = Path(dst.path).with_name(f".{Path(dst.path).name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst.path, aside)
        os.replace(src.path, dst.path)
        shutil.rmtree(aside, ignore_errors=True)
    elif dst.is_local:
        os.replace(src.path, dst.path)
    else:
        dst.fs.move(src.path, dst.path)


def _remove(where: Location) -> None:
    from pyarrow import fs as pafs

    if where.info().type == pafs.FileType.Directory:
        where.fs.delete_dir(where.path)


def _merge(fs: Any, parts: list[str], target: Location, fmt: str) -> int:
    """Concatenate part files into one, part by part (bounded memory); return rows."""
    rows = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = None
        try:
            for part in parts:
                with fs.open_input_file(part) as fh:
                    reader = pq.ParquetFile(fh)
                    for batch in reader.iter_batches():
                        if writer is None:
                            sink = target.fs.open_output_stream(target.path)
                            writer = pq.ParquetWriter(sink, batch.schema)
                        writer.write_batch(batch)
                        rows += batch.num_rows
            if writer is None:  # nothing scored: an empty file, no columns
                import pyarrow as pa

                sink = target.fs.open_output_stream(target.path)
                writer = pq.ParquetWriter(sink, pa.schema([]))
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        return rows
    with target.fs.open_output_stream(target.path) as out:
        for i, part in enumerate(parts):
            with fs.open_input_stream(part) as fh:
                data = fh.read()
            lines = data.splitlines(keepends=True)
            if fmt == "csv" and lines:
                header, lines = lines[0], lines[1:]
                if i == 0:
                    out.write(header)
            if lines and not lines[-1].endswith(b"\n"):
                lines[-1] += b"\n"
            out.write(b"".join(lines))
            rows += sum(1 for line in lines if line.strip())
    return rows


def _count(fs: Any, part: str, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(part) as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    with fs.open_input_stream(part) as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    return max(0, len(lines) - (1 if fmt == "csv" else 0))
