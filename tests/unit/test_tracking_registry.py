"""ModelRegistry: content-addressed copies, versions, tags, history, rollback, retire."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from kiln.errors import IntegrityError, ModelNotFoundError
from kiln.tracking import ArtifactPathError, ModelRegistry, RegistryError, config_hash


@pytest.fixture()
def reg(tmp_path):
    return ModelRegistry(tmp_path / "kiln.db", tmp_path / "artifacts")


@pytest.fixture()
def ckpt(tmp_path):
    def make(name="model.pt", data=b"weights-1"):
        path = tmp_path / "runs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return make


def test_register_copies_the_checkpoint_under_its_sha256(reg, ckpt, tmp_path):
    src = ckpt(data=b"abc")
    model_id = reg.register_model(
        "clf", src, metrics={"val_loss": 0.4}, task_type="classification",
        config={"lr": 0.1}, training_run_id=3, description="first",
    )  # fmt: skip
    entry = reg.get_model(model_id=model_id)
    sha = hashlib.sha256(b"abc").hexdigest()
    assert entry.sha256 == sha
    assert entry.checkpoint_path == str((tmp_path / "artifacts" / sha / "model.pt").resolve())
    assert entry.version == "1.0.0" and entry.status == "active"
    assert entry.metrics == {"val_loss": 0.4} and entry.training_run_id == 3
    assert entry.config_hash == config_hash({"lr": 0.1})
    assert entry.config_hash == hashlib.sha256(b'{"lr":0.1}').hexdigest()
    assert entry.export_formats == ["pytorch"] and entry.model_size_mb > 0
    src.unlink()  # deleting the run's folder does not break the registry
    assert reg.load_checkpoint_path(entry).read_bytes() == b"abc"
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.version = "9.9.9"  # type: ignore[misc]


def test_every_seed_field_is_on_the_entry(reg, ckpt):
    entry = reg.get_model(model_id=reg.register_model("clf", ckpt()))
    seed_fields = {
        "model_id", "name", "version", "checkpoint_path", "task_type", "config_hash",
        "training_run_id", "parent_model_id", "created_at", "metrics", "export_formats",
        "model_size_mb", "memory_req_gb", "status", "tags",
    }  # fmt: skip
    assert seed_fields <= {f.name for f in dataclasses.fields(entry)}


def test_same_content_is_stored_once(reg, ckpt, tmp_path):
    a = reg.register_model("clf", ckpt("a.pt", b"same"))
    b = reg.register_model("other", ckpt("b.pt", b"same"))
    ea, eb = reg.get_model(model_id=a), reg.get_model(model_id=b)
    assert ea.sha256 == eb.sha256 and ea.checkpoint_path == eb.checkpoint_path
    stored = [p for p in (tmp_path / "artifacts").iterdir()]
    assert len(stored) == 1


def test_directory_checkpoints_hash_by_content(reg, tmp_path):
    for name in ("d1", "d2"):
        d = tmp_path / name
        (d / "sub").mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"w")
        (d / "sub" / "meta.json").write_text("{}")
    e1 = reg.get_model(model_id=reg.register_model("dir", tmp_path / "d1"))
    e2 = reg.get_model(model_id=reg.register_model("dir", tmp_path / "d2"))
    assert e1.sha256 == e2.sha256
    (tmp_path / "d2" / "sub" / "meta.json").write_text('{"x": 1}')
    e3 = reg.get_model(model_id=reg.register_model("dir", tmp_path / "d2"))
    assert e3.sha256 != e1.sha256
    assert (reg.load_checkpoint_path(e3) / "sub" / "meta.json").read_text() == '{"x": 1}'


def test_hash_mismatch_is_detected_on_load(reg, ckpt):
    entry = reg.get_model(model_id=reg.register_model("clf", ckpt()))
    with open(entry.checkpoint_path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(IntegrityError, match=entry.sha256):
        reg.load_checkpoint_path(entry)


def test_paths_outside_the_artifact_store_are_rejected(reg, ckpt, tmp_path):
    entry = reg.get_model(model_id=reg.register_model("clf", ckpt()))
    forged = dataclasses.replace(entry, checkpoint_path=str(tmp_path / "runs" / "model.pt"))
    with pytest.raises(ArtifactPathError, match="outside the artifact store"):
        reg.load_checkpoint_path(forged)
    escape = str(tmp_path / "artifacts" / ".." / "runs" / "model.pt")
    with pytest.raises(ArtifactPathError):
        reg.load_checkpoint_path(dataclasses.replace(entry, checkpoint_path=escape))


def test_a_checkpoint_already_in_the_store_is_not_copied_again(reg, ckpt):
    entry = reg.get_model(model_id=reg.register_model("clf", ckpt()))
    again = reg.get_model(model_id=reg.register_model("clf", entry.checkpoint_path))
    assert again.checkpoint_path == entry.checkpoint_path


def test_versions_auto_increment_minor_per_name_and_must_be_semver(reg, ckpt):
    ids = [reg.register_model("a", ckpt()) for _ in range(3)]
    assert [reg.get_model(model_id=i).version for i in ids] == ["1.0.0", "1.1.0", "1.2.0"]
    reg.register_model("a", ckpt(), version="2.0.3")
    assert reg.get_model(model_id=reg.register_model("a", ckpt())).version == "2.1.0"
    assert reg.get_model(model_id=reg.register_model("b", ckpt())).version == "1.0.0"
    with pytest.raises(RegistryError, match="already registered"):
        reg.register_model("a", ckpt(), version="1.0.0")
    with pytest.raises(RegistryError, match="MAJOR.MINOR.PATCH"):
        reg.register_model("a", ckpt(), version="v1")
    with pytest.raises(RegistryError, match="name="):
        reg.register_model("bad name", ckpt())
    assert reg.get_model(name="a").version == "2.1.0"  # newest active


def test_tag_points_at_one_version_and_moves_are_recorded(reg, ckpt):
    v1 = reg.register_model("clf", ckpt(), metrics={"acc": 0.8})
    v2 = reg.register_model("clf", ckpt(), metrics={"acc": 0.9})
    other = reg.register_model("other", ckpt())
    reg.promote_model(v1, "production")
    reg.promote_model(other, "production")  # a tag is per name
    reg.promote_model(v2, "production")
    assert reg.get_model(name="clf", tag="production").model_id == v2
    assert reg.get_model(model_id=v1).tags == []
    assert reg.get_model(model_id=v2).tags == ["production"]
    assert reg.resolve("clf@production").model_id == v2
    assert reg.resolve("other@production").model_id == other
    assert reg.resolve("clf:1.0.0").model_id == v1
    assert reg.get_model(tag="production").model_id == v2  # most recently moved

    hist = reg.tag_history("clf")
    assert list(hist["action"]) == ["promote", "promote"]
    assert list(hist["model_id"]) == [v1, v2]
    assert hist["previous_model_id"].isna().tolist() == [True, False]
    last = hist.iloc[-1]
    assert last["previous_version"] == "1.0.0" and last["version"] == "1.1.0"
    assert last["metrics"] == {"acc": 0.9} and last["previous_metrics"] == {"acc": 0.8}
    assert last["at"] >= hist.iloc[0]["at"]


def test_rollback_walks_back_through_previous_holders(reg, ckpt):
    a, b, c = (reg.register_model("clf", ckpt()) for _ in range(3))
    for m in (a, b, c):
        reg.promote_model(m, "prod")
    assert reg.rollback("clf", "prod").model_id == b
    assert reg.rollback("clf", "prod").model_id == a
    with pytest.raises(ModelNotFoundError, match="no previous holder"):
        reg.rollback("clf", "prod")
    assert list(reg.tag_history("clf", tag="prod")["action"]) == ["promote"] * 3 + ["rollback"] * 2


def test_rollback_skips_retired_versions(reg, ckpt):
    a, b, c = (reg.register_model("clf", ckpt()) for _ in range(3))
    for m in (a, b, c):
        reg.promote_model(m, "prod")
    reg.delete_model(b)
    assert reg.rollback("clf", "prod").model_id == a


def test_retire_removes_tags_and_forbids_new_ones(reg, ckpt):
    a = reg.register_model("clf", ckpt(), tags=["prod", "staging"])
    b = reg.register_model("clf", ckpt())
    assert reg.get_model(model_id=a).tags == ["prod", "staging"]
    reg.delete_model(a)
    entry = reg.get_model(model_id=a)
    assert entry.status == "retired" and entry.tags == []
    with pytest.raises(RegistryError, match="retired"):
        reg.promote_model(a, "prod")
    with pytest.raises(ModelNotFoundError, match="tags in use"):
        reg.get_model(name="clf", tag="prod")
    assert reg.get_model(name="clf").model_id == b  # newest active
    assert "retire" in set(reg.tag_history("clf")["action"])
    assert len(reg.list_models(include_retired=False)) == 1


def test_unknown_lookups_name_what_was_asked_and_what_exists(reg, ckpt):
    reg.register_model("clf", ckpt(), tags=["prod"])
    cases = [
        (lambda: reg.get_model(model_id=42), "42", "clf:1.0.0"),
        (lambda: reg.get_model(name="nope"), "'nope'", "clf"),
        (lambda: reg.resolve("clf:3.0.0"), "'3.0.0'", "1.0.0"),
        (lambda: reg.resolve("clf@staging"), "'staging'", "prod"),
        (lambda: reg.tag_history("nope"), "'nope'", "clf"),
        (lambda: reg.promote_model(42, "prod"), "42", "clf"),
    ]
    for call, asked, exists in cases:
        with pytest.raises(KeyError) as info:
            call()
        assert isinstance(info.value, ModelNotFoundError)
        assert asked in str(info.value) and exists in str(info.value)


def test_lineage_list_and_compare(reg, ckpt):
    base = reg.register_model("base", ckpt(), metrics={"val_loss": 0.5})
    tuned = reg.register_model("tuned", ckpt(), parent_model_id=base, metrics={"val_loss": 0.3})
    assert [e.model_id for e in reg.lineage(tuned)] == [tuned, base]
    with pytest.raises(ModelNotFoundError):
        reg.register_model("x", ckpt(), parent_model_id=999)
    df = reg.compare_models([base, tuned])
    assert list(df["model_id"]) == [base, tuned]
    assert list(df["val_loss"]) == [0.5, 0.3]
    assert {"version", "created_at", "tags", "status"} <= set(df.columns)
    listed = reg.list_models(limit=1)
    assert list(listed["model_id"]) == [tuned]
    json.dumps(listed.to_dict(orient="records"), default=str)
