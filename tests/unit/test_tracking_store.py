"""The SQLite wrapper: version guard, WAL, transactions, and migrations of old files."""

from __future__ import annotations

import pickle

import pytest

from kiln._store import Migration, Store, StoreError, check_sqlite_version, sqlite_version
from kiln.tracking import ExperimentDB, ModelRegistry, experiments, registry


def test_linked_sqlite_is_outside_the_wal_reset_bug_range():
    assert sqlite_version() >= (3, 51, 3)
    check_sqlite_version()


@pytest.mark.parametrize("version", [(3, 40, 1), (3, 51, 2), (3, 7, 0)])
def test_old_sqlite_versions_are_refused_with_a_fix(version):
    with pytest.raises(StoreError, match=r"apsw>=3\.51\.3"):
        check_sqlite_version(version)


def test_store_uses_wal_busy_timeout_and_foreign_keys(tmp_path):
    store = Store(tmp_path / "k.db", busy_timeout_s=7)
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.query("PRAGMA foreign_keys")[0][0] == 1
    assert store.query("PRAGMA busy_timeout")[0][0] == 7000


def test_transaction_rolls_back_on_error(tmp_path):
    store = Store(tmp_path / "k.db")
    store.migrate("t", [Migration(1, "t", "CREATE TABLE t (x INTEGER)")])
    with pytest.raises(RuntimeError), store.transaction() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")
    assert store.query("SELECT COUNT(*) FROM t")[0][0] == 0


def test_store_pickles_as_its_path(tmp_path):
    store = Store(tmp_path / "k.db")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path
    assert clone.query("SELECT 1") == [(1,)]


def test_migrations_must_be_numbered_in_order(tmp_path):
    store = Store(tmp_path / "k.db")
    with pytest.raises(StoreError, match="1..N"):
        store.migrate("x", [Migration(2, "b", "SELECT 1")])


def test_a_newer_schema_than_this_kiln_knows_is_refused(tmp_path):
    path = tmp_path / "k.db"
    ExperimentDB(path)
    store = Store(path)
    with store.transaction() as cur:
        cur.execute("UPDATE schema_version SET version = 99 WHERE component = 'tracking'")
    with pytest.raises(StoreError, match="newer than this kiln knows"):
        ExperimentDB(path)


def _v1_file(path):
    """A kiln.db as the first schema wrote it, with one run, one model and a tag."""
    store = Store(path)
    store.migrate(experiments.COMPONENT, experiments.MIGRATIONS[:1])
    store.migrate(registry.COMPONENT, registry.MIGRATIONS[:1])
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO runs(run_name, config, notes, status, started_at, ended_at) "
            "VALUES ('old-run', '{\"lr\": 0.1}', 'v1', 'completed', "
            "'2024-01-01T00:00:00+00:00', '2024-01-01T00:01:00+00:00')"
        )
        cur.execute(
            "INSERT INTO metrics(run_id, name, value, epoch, timestamp) "
            "VALUES (1, 'val_loss', 0.5, 0, '2024-01-01T00:00:30+00:00')"
        )
        cur.execute("INSERT INTO params(run_id, key, value) VALUES (1, 'seed', '42')")
        cur.execute(
            "INSERT INTO models(name, version, checkpoint_path, task_type, config_hash, "
            "created_at, metrics, status) VALUES ('clf', '1.0.0', '/old/ckpt.pt', "
            "'classification', 'abc', '2024-01-01T00:02:00+00:00', '{\"val_loss\": 0.5}', 'active')"
        )
        cur.execute(
            "INSERT INTO model_tags(name, tag, model_id, updated_at) "
            "VALUES ('clf', 'production', 1, '2024-01-01T00:03:00+00:00')"
        )
    store.close()
    assert Store(path).schema_version("tracking") == 1


def test_a_v1_file_opens_with_data_kept_and_new_columns_present(tmp_path):
    path = tmp_path / "kiln.db"
    _v1_file(path)

    db = ExperimentDB(path)
    assert db.store.schema_version("tracking") == len(experiments.MIGRATIONS) == 3
    run = db.get_run("old-run")
    assert run["config"] == {"lr": 0.1}
    assert run["params"] == {"seed": 42}
    assert run["metrics"] == {"val_loss": 0.5}
    assert run["group"] is None and run["profile"] is None and run["artifacts"] == []
    new = db.log_run("new-run", {}, group="search-1")
    db.log_artifact(new, "checkpoint", "/x")
    assert list(db.list_runs(group="search-1")["run_id"]) == [new]

    reg = ModelRegistry(path, tmp_path / "artifacts")
    assert reg.store.schema_version("registry") == len(registry.MIGRATIONS) == 3
    old = reg.get_model(name="clf", tag="production")
    assert old.version == "1.0.0" and old.metrics == {"val_loss": 0.5}
    assert old.sha256 is None and old.description == ""
    ckpt = tmp_path / "new.pt"
    ckpt.write_bytes(b"weights")
    new_id = reg.register_model("clf", ckpt)
    assert reg.get_model(model_id=new_id).version == "1.1.0"
    reg.promote_model(new_id, "production")
    # the pre-migration holder is the previous one, though v1 kept no history
    assert reg.rollback("clf", "production").model_id == old.model_id
