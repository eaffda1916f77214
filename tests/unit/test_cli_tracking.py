"""`kiln runs` and `kiln models` through their own argparse (the lead's main adds --db)."""

from __future__ import annotations

import argparse
import struct

import pytest

from kiln.cli import models as models_cli
from kiln.cli import runs as runs_cli
from kiln.tracking import ExperimentDB, ModelRegistry


def _cli(db_path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kiln")
    parser.add_argument("--db")
    sub = parser.add_subparsers(dest="command", required=True)
    runs_cli.register(sub)
    models_cli.register(sub)
    args = parser.parse_args(["--db", str(db_path), *argv])
    return args.func(args)


@pytest.fixture()
def db_path(tmp_path):
    path = tmp_path / "kiln.db"
    db = ExperimentDB(path)
    for name, losses in (("alpha", [1.0, 0.7, 0.5]), ("beta", [0.9, 0.6, 0.4])):
        run_id = db.log_run(name, {"learning_rate": 0.01, "epochs": 3}, notes="cli test")
        db.log_params(run_id, {"random_seed": 42})
        for epoch, loss in enumerate(losses):
            db.log_metrics(run_id, {"train_loss": loss + 0.1, "val_loss": loss,
                                    "val_accuracy": 1 - loss / 2, "learning_rate": 0.01},
                           epoch=epoch)  # fmt: skip
        db.log_artifact(run_id, "checkpoint", f"/runs/{name}/epoch_2")
        db.finish_run(run_id, "completed")
    return path


@pytest.fixture()
def registry(db_path, tmp_path):
    reg = ModelRegistry(db_path, tmp_path / "artifacts")
    for i, loss in enumerate((0.5, 0.4, 0.3)):
        ckpt = tmp_path / f"ckpt{i}.pt"
        ckpt.write_bytes(f"weights {i}".encode())
        reg.register_model("digits", ckpt, metrics={"val_loss": loss}, task_type="classification")
    return reg


def test_runs_list_show_compare(db_path, capsys):
    assert _cli(db_path, "runs", "list") == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "beta" in out and "completed" in out

    assert _cli(db_path, "runs", "show", "alpha") == 0
    out = capsys.readouterr().out
    assert "learning_rate" in out and "random_seed" in out
    assert "/runs/alpha/epoch_2" in out and "val_loss" in out

    assert _cli(db_path, "runs", "compare", "1", "beta", "--metric", "val_loss") == 0
    out = capsys.readouterr().out
    assert "0.5" in out and "0.4" in out


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_runs_plot_writes_a_real_png(db_path, tmp_path, capsys):
    out = tmp_path / "plots" / "alpha.png"
    assert _cli(db_path, "runs", "plot", "alpha", "-o", str(out)) == 0
    assert out.stat().st_size > 1000
    width, height = _png_size(out)
    assert width >= 600 and height >= 300  # two panels: loss and accuracy

    single = tmp_path / "lr.png"
    assert _cli(db_path, "runs", "plot", "2", "--metric", "learning_rate", "-o", str(single)) == 0
    assert _png_size(single)[0] < width  # one panel


def test_runs_errors_exit_2_with_a_message(db_path, capsys):
    assert _cli(db_path, "runs", "show", "nope") == 2
    err = capsys.readouterr().err
    assert "nope" in err and "alpha" in err and "Traceback" not in err
    assert _cli(db_path, "runs", "plot", "alpha", "--metric", "missing") == 2
    assert "missing" in capsys.readouterr().err


def test_models_list_show_promote_history_rollback_retire(db_path, registry, capsys):
    assert _cli(db_path, "models", "list") == 0
    assert "digits" in capsys.readouterr().out

    assert _cli(db_path, "models", "promote", "digits:1.0.0", "production") == 0
    assert _cli(db_path, "models", "promote", "digits:1.2.0", "production") == 0
    capsys.readouterr()
    assert _cli(db_path, "models", "show", "digits@production") == 0
    out = capsys.readouterr().out
    assert "1.2.0" in out and "production" in out and "sha256" in out

    assert _cli(db_path, "models", "history", "digits") == 0
    out = capsys.readouterr().out
    assert "promote" in out and "1.0.0" in out and "0.3" in out and "0.5" in out

    assert _cli(db_path, "models", "rollback", "digits", "production") == 0
    assert "1.0.0" in capsys.readouterr().out
    assert registry.resolve("digits@production").version == "1.0.0"

    assert _cli(db_path, "models", "retire", "digits:1.0.0") == 0
    assert registry.resolve("digits:1.0.0").status == "retired"
    assert _cli(db_path, "models", "promote", "digits:1.0.0", "production") == 2
    assert "retired" in capsys.readouterr().err


def test_models_errors_exit_2_naming_what_exists(db_path, registry, capsys):
    assert _cli(db_path, "models", "show", "digits:9.9.9") == 2
    err = capsys.readouterr().err
    assert "9.9.9" in err and "1.0.0" in err and "Traceback" not in err
    assert _cli(db_path, "models", "show", "nope@production") == 2
    assert "digits" in capsys.readouterr().err
    assert _cli(db_path, "models", "promote", "digits", "production") == 2
    assert "NAME:VERSION" in capsys.readouterr().err
    assert _cli(db_path, "models", "rollback", "digits", "production") == 2


def test_default_db_is_under_kiln_home(kiln_home, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    runs_cli.register(sub)
    args = parser.parse_args(["runs", "list"])  # no --db attribute at all
    assert args.func(args) == 0
    assert (kiln_home / "kiln.db").exists()
    assert "no runs" in capsys.readouterr().out
