"""The README's quickstart command itself, and the Ray job entry point on the same config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/digits_mlp.yaml"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["KILN_HOME"] = str(home)
    return env


def _kiln() -> list[str]:
    """The ``kiln`` console script next to this interpreter, as the README runs it."""
    script = Path(sys.executable).parent / "kiln"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kiln.cli"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_readme_quickstart_reaches_97_percent(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.run(
        [*_kiln(), "train", CONFIG],
        cwd=REPO,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=380,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    epochs = re.findall(r"^epoch\s+(\d+)/30\b", out, flags=re.M)
    assert [int(e) for e in epochs] == list(range(1, 31)), out[-2000:]
    match = re.search(r"test accuracy: (\d+\.\d+)% on (\d+) held-out rows", out)
    assert match, out[-2000:]
    assert float(match.group(1)) >= 97.0 and int(match.group(2)) == 180  # digits' test_split
    checkpoint = re.search(r"^best checkpoint: (.+)$", out, flags=re.M)
    assert checkpoint, out[-2000:]
    path = Path(checkpoint.group(1).strip())
    assert path.is_dir()
    assert home.resolve() in path.resolve().parents  # written under KILN_HOME
    assert (home / "kiln.db").exists()  # the run was recorded


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ray_job_entry_point(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", CONFIG, "--set", "epochs=2", "--quiet"],
        cwd=REPO,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    assert "test accuracy:" in proc.stdout
    assert re.search(r"final \(epoch 2\)", proc.stdout)
    assert list((home / "runs").glob("digits-mlp-*/checkpoints/epoch_0002"))
