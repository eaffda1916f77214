"""The README's commands, run in order as written, in a fresh KILN_HOME and folder.

Every line of every ```bash block is a command. Most run as they are and must exit 0.
A few cannot run inside a test as they stand, and each has a rule below that says
what is done instead and why (servers run in the background until the block's other
commands have used them; the test suite is not run from inside itself; the Ray-cluster
recipe is run by its own test). A README command that no rule knows runs as written,
so a new one is checked the day it is added.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Commands replaced by a test of their own (the reason is printed when skipped).
SKIP = {
    "scripts/test": "the suite itself",
    "scripts/check": "CI runs it before the suite",
    "pytest ": "the suite itself",
    "export RAY_AUTH_MODE": "the token recipe: tests/integration/test_serve_token_auth.py",
    "ray get-auth-token": "the token recipe: tests/integration/test_serve_token_auth.py",
    "RAY_TRAIN_ENABLE_STATE_TRACKING=1 ray start": "the token recipe: test_serve_token_auth.py",
    "ray start --head": "a long-lived cluster: tests/integration/test_queue_ray_job.py",
    "ray job submit": "Ray jobs: tests/integration/test_queue_ray_job.py",
    "kiln worker --address": "Ray-job workers: tests/integration/test_queue_ray_job.py",
    "tensorboard": "an optional package kiln does not install",
    # The Qwen example needs a model folder the user downloads; the offline tiny-model
    # walk-through right after it runs the same kiln llm commands on a model it makes.
    "kiln llm train qwen_chat.yaml": "needs a local Qwen folder (the tiny-model lines run)",
    "kiln llm status outputs/qwen-support": "needs a local Qwen folder",
    "kiln llm generate outputs/qwen-support": "needs a local Qwen folder",
    "kiln llm merge outputs/qwen-support": "needs a local Qwen folder",
    "kiln llm serve outputs/qwen-support": "needs a local Qwen folder",
}
# Servers: started in the background, ready when this URL answers; stopped when the
# commands of their block are done (an idle `kiln serve` costs ~13% of a core).
SERVERS = {"kiln serve": "http://127.0.0.1:{port}/healthz", "serve run": None}
# Long-running loops (exactly these commands): run a few seconds, then Ctrl-C (they hand
# work back and exit).
INTERRUPT_AFTER_S = {"kiln worker --with-scheduler": 4.0}
COMMAND_TIMEOUT_S = 420


def readme_commands(text: str) -> list[str]:
    """Every command of every bash block, in order (heredocs kept with their command)."""
    return [command for block in readme_blocks(text) for command in block]


def readme_blocks(text: str) -> list[list[str]]:
    """The commands of each bash block, block by block."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands: list[str] = []
        blocks.append(commands)
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                end = lines.index(heredoc.group(1), i + 1)
                commands.append("\n".join(lines[i : end + 1]))
                i = end + 1
                continue
            stripped = _strip_comment(line).strip()
            while stripped.endswith("\\") and i + 1 < len(lines):  # a continued line
                i += 1
                stripped = stripped[:-1] + " " + _strip_comment(lines[i]).strip()
            if stripped:
                commands.append(stripped)
            i += 1
    return blocks


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def _without_install(command: str) -> str:
    """A quickstart line without its venv/pip steps (the suite runs in an installed env)."""
    steps = [s.strip() for s in command.split("&&")]
    keep = [s for s in steps if not s.startswith(("python3 -m venv", ". .venv", "pip install"))]
    return " && ".join(keep)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["KILN_HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["COLUMNS"] = "120"
    return env


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> int | None:
    """Ctrl-C, as a terminal sends it: SIGINT to the server's whole process group; its
    exit status, or None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return None


def _check_output(command: str, out: str, workdir: Path) -> None:
    """What the README says each kind of command produces."""
    if command.startswith("kiln train examples/digits_mlp.yaml") and "--workers" not in command:
        assert "test accuracy:" in out, out[-2000:]
    if command.startswith("curl") and "/predict" in command:
        body = json.loads(out)
        assert len(body["predictions"]) == 3, body
    if command.startswith("python bundles/digits/inference.py"):
        assert json.loads(out)["predictions"], out
    if command.startswith("kiln models drift"):
        assert "status:" in out, out
    if " -o run1.png" in command:
        assert (workdir / "run1.png").stat().st_size > 0
    if "kiln runs export 1 --to mlflow" in command:
        assert "exported run 1 to MLflow run" in out and (workdir / "mlruns").is_dir(), out


def _check_console(command: str, stdout: str, stderr: str) -> None:
    """Issue 13's quiet console, piped: plain epoch lines from the driver, none of Ray's
    per-report dumps or placement-group-cleaner warnings, no colour codes."""
    if not command.startswith("kiln train"):
        return
    both = stdout + stderr
    for noise in ("\x1b[", "TrainingReport(", "PlacementGroupCleaner", "Reported metrics"):
        assert noise not in both, f"{command!r} printed {noise!r}:\n{both[-3000:]}"
    if "--workers" in command:
        assert re.search(r"^epoch\s+1/\d+  train_loss", stdout, flags=re.M), stdout[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_commands_run_as_written(tmp_path):
    blocks = readme_blocks(README.read_text())
    assert sum(map(len, blocks)) > 20, blocks
    workdir, home = tmp_path / "work", tmp_path / "kiln_home"
    workdir.mkdir()
    for name in ("examples", "jobs", "serving", "constraints.txt"):
        (workdir / name).symlink_to(ROOT / name)
    env = _env(home)
    servers: list[subprocess.Popen] = []
    ran, skipped = [], []
    try:
        for block in blocks:
            for raw in block:
                command = _without_install(raw) if "pip install" in raw else raw
                reason = next(
                    (why for prefix, why in SKIP.items() if command.startswith(prefix)), None
                )
                if reason or not command:
                    skipped.append((raw, reason or "install only"))
                    continue
                server = next((u for p, u in SERVERS.items() if command.startswith(p)), "")
                if server != "":
                    # no shell in between (dash dies of the Ctrl-C it would pass on), in
                    # a process group of its own, as a terminal's foreground command
                    proc = subprocess.Popen(
                        shlex.split(command), cwd=workdir, env=env, start_new_session=True
                    )
                    servers.append(proc)
                    port = re.search(r"--port (\d+)", command)
                    url = (server or "http://127.0.0.1:8000/healthz").format(
                        port=port.group(1) if port else 8000
                    )
                    _wait_for(url, proc)
                    ran.append(command)
                    continue
                limit = INTERRUPT_AFTER_S.get(command)
                if limit is not None:
                    # no shell in between, so Ctrl-C reaches the command and its exit code is its own
                    proc = subprocess.Popen(shlex.split(command), cwd=workdir, env=env)
                    time.sleep(limit)
                    proc.send_signal(signal.SIGINT)
                    code = proc.wait(timeout=120)
                    assert code in (0, 130), f"{command!r} exited {code} after Ctrl-C"
                    ran.append(command)
                    continue
                done = subprocess.run(
                    ["bash", "-c", command],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT_S,
                    check=False,
                )
                out = done.stdout + done.stderr
                assert done.returncode == 0, f"README command failed: {command!r}\n{out[-4000:]}"
                _check_output(command, done.stdout, workdir)
                _check_console(command, done.stdout, done.stderr)
                ran.append(command)
            for proc in servers:  # a server serves its own block's commands
                code = _stop(proc)
                assert code == 0, f"a README server exited {code} on Ctrl-C: {proc.args!r}"
    finally:
        for proc in servers:
            _stop(proc)
    print(f"ran {len(ran)} README commands; skipped {len(skipped)}:")
    for raw, why in skipped:
        print(f"  {raw!r}: {why}")
    assert len(ran) >= 25
