"""Formats and the atomic publish of batch prediction's output, on local files (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.errors import ConfigError, DatasetError
from kiln.predict import _files
from kiln.predict._files import Location


def _staged(output, parts: dict[str, bytes], overwrite: bool = False) -> Location:
    """The staging folder for ``output``, holding part files as Ray would write them."""
    staged = _files.staging(Location.of(output), overwrite=overwrite)
    Path(staged.path).mkdir()
    for name, data in parts.items():
        (Path(staged.path) / name).write_bytes(data)
    return staged


def test_csv_parts_merge_into_one_file_with_one_header(tmp_path):
    out = tmp_path / "scored.csv"
    staged = _staged(out, {"b.csv": b"id,p\n3,x\n", "a.csv": b"id,p\n1,y\n2,z"})
    assert staged.path != str(out) and ".tmp-" in staged.path  # a hidden sibling
    rows = _files.publish(staged, Location.of(out), "csv", single_file=True)
    assert rows == 3
    assert out.read_text() == "id,p\n1,y\n2,z\n3,x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.csv"]  # staging removed


def test_jsonl_and_parquet_parts_merge(tmp_path):
    out = tmp_path / "s.jsonl"
    staged = _staged(out, {"a.json": b'{"id": 1}\n{"id": 2}', "b.json": b'{"id": 3}\n'})
    assert _files.publish(staged, Location.of(out), "json", single_file=True) == 3
    assert out.read_text().splitlines() == ['{"id": 1}', '{"id": 2}', '{"id": 3}']

    out = tmp_path / "s.parquet"
    staged = _staged(out, {})
    for k in range(2):
        pq.write_table(pa.table({"id": [k * 10, k * 10 + 1]}), f"{staged.path}/p{k}.parquet")
    assert _files.publish(staged, Location.of(out), "parquet", single_file=True) == 4
    assert pq.read_table(out)["id"].to_pylist() == [0, 1, 10, 11]


def test_a_folder_output_is_renamed_into_place_and_replaced_only_when_asked(tmp_path):
    out = tmp_path / "scored"
    staged = _staged(out, {"p0.csv": b"id\n1\n2\n"})
    assert _files.publish(staged, Location.of(out), "csv", single_file=False) == 2
    assert (out / "p0.csv").read_text() == "id\n1\n2\n"
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        _files.staging(Location.of(out), overwrite=False)
    again = _staged(out, {"p1.csv": b"id\n7\n"}, overwrite=True)
    assert _files.publish(again, Location.of(out), "csv", single_file=False) == 1
    assert [p.name for p in out.iterdir()] == ["p1.csv"]


def test_formats_are_told_or_found(tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("x\n1\n")
    (tmp_path / "mixed" / "b.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match="found csv, parquet"):
        _files.input_format(Location.of(tmp_path / "mixed"))
    assert _files.input_format(Location.of(tmp_path / "mixed"), "jsonl") == "json"
    assert _files.input_format(Location.of(f"file://{tmp_path / 'mixed' / 'a.csv'}")) == "csv"
    with pytest.raises(DatasetError, match="does not exist"):
        _files.input_format(Location.of(tmp_path / "nope"))
    assert _files.output_format(Location.of(tmp_path / "o.jsonl"), None, "csv") == ("json", True)
    assert _files.output_format(Location.of(tmp_path / "o"), None, "csv") == ("csv", False)
    with pytest.raises(ConfigError, match="ends in '.csv' but output_format='parquet'"):
        _files.output_format(Location.of(tmp_path / "o.csv"), "parquet", "csv")
