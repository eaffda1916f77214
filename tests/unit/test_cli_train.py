"""``kiln train`` bad-input paths (exit 2, one paragraph, no traceback) and ``kiln datasets``.

The issue's four cases (missing file, bad YAML, invalid field, bad --set) and ``kiln
datasets`` run as real subprocesses (``python -m kiln.cli``), started together once per
module so the interpreter start-ups overlap; the other bad-input cases call
``kiln.cli.main`` in-process. Nothing here starts Ray or trains.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.cli.train import load_run_file
from kiln.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_mlp.yaml"

GOOD = "dataset: iris\nepochs: 1\ntask:\n  task_type: classification\n"

FILES = {
    "good.yaml": GOOD,
    "bad.yaml": "dataset: iris\nepochs: [1, 2\n",
    "invalid.yaml": "dataset: iris\nepochs: 0\nlearning_rat: 0.1\noptimizer: lamb\n",
    "list.yaml": "- epochs\n- 3\n",
    "badtask.yaml": "dataset: iris\ntask:\n  task_type: ranking\n",
}

# case -> (argv after `kiln`, substrings stderr must contain)
SUBPROCESS_CASES = {
    "missing_file": (["train", "{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
    "bad_yaml": (["train", "{tmp}/bad.yaml"], ["bad.yaml", "not valid yaml", "line 3"]),
    "invalid_fields": (
        ["train", "{tmp}/invalid.yaml"],
        ["epochs=0 must be >= 1", "'learning_rat'", "Did you mean 'learning_rate'", "'lamb'"],
    ),
    "set_without_equals": (
        ["train", "{tmp}/good.yaml", "--set", "epochs"],
        ["--set 'epochs' must look like key=value"],
    ),
}
IN_PROCESS_CASES = {
    "not_a_mapping": (["train", "{tmp}/list.yaml"], ["must hold a mapping"]),
    "bad_task": (["train", "{tmp}/badtask.yaml"], ["task.task_type='ranking'"]),
    "set_bad_value": (
        ["train", "{tmp}/good.yaml", "--set", "epochs=abc"],
        ["epochs='abc' must be an integer"],
    ),
    "set_unknown_field": (
        ["train", "{tmp}/good.yaml", "--set", "epoch=3"],
        ["'epoch' is not a TrainingConfig field", "Did you mean 'epochs'"],
    ),
    "set_into_scalar": (
        ["train", "{tmp}/good.yaml", "--set", "dataset.name=x"],
        ["'dataset' is 'iris', not a mapping"],
    ),
    "unknown_dataset": (
        ["train", "{tmp}/good.yaml", "--set", "dataset=no_such_data"],
        ["'no_such_data'", "iris", "digits"],
    ),
    "bad_layers": (
        [
            "train",
            "{tmp}/good.yaml",
            "--set",
            "model={layers: [{type: input, neurons: 7}, {type: output, neurons: 3}]}",
        ],
        ["iris", "7", "4"],
    ),
    "resume_missing": (
        ["train", "{tmp}/good.yaml", "--resume", "{tmp}/no_checkpoint"],
        ["no_checkpoint", "does not exist"],
    ),
}


def _files(tmp: Path) -> Path:
    for name, text in FILES.items():
        (tmp / name).write_text(text)
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return home


def _check_one_paragraph(code: int, out: str, err: str, needles: list[str]) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("error: "), err
    lines = [line.rstrip() for line in err.strip().splitlines()]
    assert "" not in lines, f"more than one paragraph:\n{err}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    home = _files(tmp)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["KILN_HOME"] = str(home)
    commands = {
        case: [sys.executable, "-m", "kiln.cli", *(a.replace("{tmp}", str(tmp)) for a in argv)]
        for case, (argv, _) in SUBPROCESS_CASES.items()
    }
    commands["datasets"] = [sys.executable, "-m", "kiln.cli", "datasets"]
    procs = {
        case: subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp
        )
        for case, cmd in commands.items()
    }
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_bad_input_exits_2_with_one_paragraph(cli_results, case):
    result = cli_results[case]
    _check_one_paragraph(result.returncode, result.stdout, result.stderr, SUBPROCESS_CASES[case][1])


@pytest.mark.parametrize("case", sorted(IN_PROCESS_CASES))
def test_more_bad_input_in_process(tmp_path, monkeypatch, capsys, case):
    home = _files(tmp_path)
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv, needles = IN_PROCESS_CASES[case]
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    _check_one_paragraph(code, captured.out, captured.err, needles)
    runs = home / "runs"
    assert not runs.exists() or not any(p for p in runs.iterdir() if (p / "checkpoints").exists())


def test_kiln_datasets_lists_bundled_ids(cli_results):
    result = cli_results["datasets"]
    assert result.returncode == 0, result.stderr
    ids = set(re.findall(r"^\S+\s+(\w+)\s+\S", result.stdout, flags=re.M))
    for dataset_id in ("iris", "digits", "synthetic_classification", "synthetic_regression"):
        assert dataset_id in ids, result.stdout


# ---------------------------------------------------------------------- load_run_file
def test_load_run_file_applies_overrides_task_and_workers(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(GOOD + "model:\n  name: mlp\n  hidden: [8]\n")
    config, task = load_run_file(
        str(path),
        ["epochs=4", "model.hidden=[16, 8]", "learning_rate=1e-2", "early_stopping_patience=null"],
        workers=2,
    )
    assert config.epochs == 4
    assert config.learning_rate == 0.01
    assert config.model == {"name": "mlp", "hidden": [16, 8]}
    assert config.num_workers == 2
    assert config.early_stopping_patience is None
    assert task is not None and task.task_type == "classification" and task.name == "iris"


def test_load_run_file_collects_config_and_task_errors(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: iris\nbatch_size: 0\ntask:\n  task_type: ranking\n")
    with pytest.raises(ConfigError) as info:
        load_run_file(str(path), [], None)
    errors = info.value.errors
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}: batch_size=0")
    assert "task.task_type='ranking'" in errors[1]


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.hiden=[64]", "mlp does not take 'hiden'; did you mean 'hidden'?"),
        ("dataset=missing/rows.parquet", "file not found: missing/rows.parquet"),
        ("dataset=digitz", "unknown dataset 'digitz'; did you mean 'digits'?"),
        ("epohcs=3", "--set: 'epohcs' is not a TrainingConfig field. Did you mean 'epochs'?"),
    ],
)
def test_errors_known_before_training_come_before_the_training_line(
    override, message, capsys, tmp_path, monkeypatch
):
    from kiln.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    code = main(["train", str(EXAMPLE), "--set", override])
    out, err = capsys.readouterr()
    assert code == 2
    assert message in err
    assert "kiln: training" not in out  # nothing started


def test_help_config_lists_every_field_by_group(capsys):
    import dataclasses

    from kiln.config import TrainingConfig

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainingConfig):
        assert f"  {f.name} (" in out, f.name
    assert out.index("training:") < out.index("optimizer:") < out.index("hardware:")
