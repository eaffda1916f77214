"""Evaluations recorded against registered model versions (the registry's side of kiln eval)."""

from __future__ import annotations

import pytest

from kiln.errors import ModelNotFoundError
from kiln.tracking import ModelRegistry
from kiln.tracking._artifacts import sha256_of


def _checkpoint(root, name: str, content: bytes):
    folder = root / name
    folder.mkdir()
    (folder / "model.pt").write_bytes(content)
    (folder / "metadata.json").write_text("{}")
    return folder


def test_evaluations_are_listed_newest_first_and_found_by_weights(tmp_path):
    reg = ModelRegistry(tmp_path / "kiln.db", tmp_path / "artifacts")
    first = _checkpoint(tmp_path, "a", b"weights-a")
    a = reg.register_model("clf", first)
    b = reg.register_model("clf", _checkpoint(tmp_path, "b", b"weights-b"))
    twin = reg.register_model("clf-copy", _checkpoint(tmp_path, "c", b"weights-a"))

    assert [e.model_id for e in reg.find_by_sha256(sha256_of(first))] == [a, twin]
    assert reg.find_by_sha256("0" * 64) == []

    e1 = reg.record_evaluation(a, "digits", "val", {"accuracy": 0.9}, {"confusion_matrix": [[1]]})
    e2 = reg.record_evaluation(a, "digits", "test", {"accuracy": 0.8, "loss": 0.5})
    table = reg.evaluations(a)
    assert table["evaluation_id"].tolist() == [e2, e1]
    assert table["split"].tolist() == ["test", "val"]
    assert table["accuracy"].tolist() == [0.8, 0.9]
    assert table["details"].tolist() == [{}, {"confusion_matrix": [[1]]}]
    assert reg.evaluations(b).empty and list(reg.evaluations(b).columns)[:4] == [
        "evaluation_id", "created_at", "dataset", "split"
    ]  # fmt: skip
    with pytest.raises(ModelNotFoundError, match="no model with id 999"):
        reg.record_evaluation(999, "digits", "val", {})
