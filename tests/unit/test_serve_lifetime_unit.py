"""The session that `kiln serve` runs in, with plain processes standing in for Ray.

The stand-in server mimics what matters about Ray: a child in a process group of
its own (as the raylet puts each worker) that ignores SIGTERM (as a stuck agent
would), so only ending the whole session removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kiln.serve._lifetime import end_session, session_members

pytestmark = [
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="sessions are read from /proc"),
    pytest.mark.timeout(120),
]

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

# A server: writes its grandchild's pid, stops on SIGTERM by ending its session.
SERVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from kiln.serve._lifetime import LIFELINE_ENV, end_session, start_reaper, watch_lifeline

    ready = sys.argv[1] + ".child"
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); open(sys.argv[1], 'w').close(); time.sleep(600)", ready],
        process_group=0,
    )
    while not os.path.exists(ready):
        time.sleep(0.01)

    def stop(signum, frame):
        end_session(os.getsid(0), grace_s=0.5, spare=(os.getpid(),))
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    if LIFELINE_ENV in os.environ:
        watch_lifeline(int(os.environ[LIFELINE_ENV]))
        start_reaper()
    open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def _wait(cond, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _start(tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    """A supervisor running SERVER; returns it, the server's pid and the grandchild's."""
    script, pids = tmp_path / "server.py", tmp_path / "pids"
    script.write_text(SERVER)
    env = {**os.environ, "PYTHONPATH": PLATFORM}
    code = (
        "import sys; from kiln.serve._lifetime import supervise; "
        f"sys.exit(supervise([sys.executable, {str(script)!r}, {str(pids)!r}], grace_s=1))"
    )
    sup = subprocess.Popen([sys.executable, "-c", code], env=env)
    assert _wait(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    server, child = map(int, pids.read_text().split())
    return sup, server, child


def test_end_session_kills_every_member_even_other_groups_and_sigterm_ignorers():
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; sleep 60 & (trap '' TERM; exec sleep 61) & wait"],
        start_new_session=True,
    )
    assert _wait(lambda: len(session_members(proc.pid)) == 3)
    members = set(session_members(proc.pid))
    signalled = set(end_session(proc.pid, grace_s=0.5))
    assert members <= signalled
    proc.wait(timeout=10)
    assert _wait(lambda: not session_members(proc.pid))


def test_end_session_spares_the_caller():
    assert os.getpid() in session_members(os.getsid(0))
    assert end_session(os.getsid(0) + 10**7, grace_s=0) == []  # no such session


@pytest.mark.parametrize(
    "how", ["sigterm", "sigint", "sigkill-supervisor", "sigkill-server", "sigkill-both"]
)
def test_nothing_outlives_the_supervised_server(tmp_path, how):
    sup, server, child = _start(tmp_path)
    try:
        assert os.getsid(server) == server and os.getpgid(child) == child
        if how == "sigkill-server":
            os.kill(server, signal.SIGKILL)
            assert sup.wait(timeout=30) == 128 + signal.SIGKILL
        elif how == "sigkill-supervisor":
            sup.kill()
            sup.wait(timeout=30)
        elif how == "sigkill-both":  # as Ray's driver exit after the supervisor's death
            sup.kill()
            os.kill(server, signal.SIGKILL)
            sup.wait(timeout=30)
        else:
            sup.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            assert sup.wait(timeout=30) == 0
        assert _wait(lambda: not _alive(server) and not _alive(child))
        assert _wait(lambda: session_members(server) == [], timeout=10)  # the reaper too
    finally:
        for pid in (child, server):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if sup.poll() is None:
            sup.kill()
