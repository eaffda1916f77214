"""Nothing ``kiln serve`` starts outlives it: the server runs in a session of its own.

``kiln serve`` runs as two processes::

    supervisor   the command the user started; stays in the user's terminal session
      server     setsid(): a new session, whose id is the server's pid
        Ray      gcs_server, raylet, agents, workers (each worker in a process group
                 of its own, all in the server's session; checked on Ray 2.60)
          HAProxy  started by Serve's HAProxyManager actor, also in the session

The session id names everything the server started, whatever process groups Ray
makes, so ending the server means ending its session (``end_session``: SIGTERM to
every member, SIGKILL to what is left after a grace period). No list of pids is kept.

- Ctrl-C, SIGTERM or SIGHUP to the supervisor: forwarded to the server as SIGTERM;
  the server shuts Serve and Ray down; the supervisor then ends what is left of the
  session. A second Ctrl-C, or ``STOP_TIMEOUT_S`` without an exit, ends it at once.
- SIGKILL of the supervisor: the server's lifeline (a pipe whose write end only the
  supervisor holds) reads EOF; the server stops as on SIGTERM and ends its session.
- The server dies (SIGKILL, OOM kill, crash, or Ray's own exit of a driver whose
  raylet died): the supervisor ends the session; so does the server's reaper (a
  small process in the session, reading a pipe from the server until EOF), which
  covers a server that dies after its supervisor.
- ``ray stop`` kills Ray under the server: the server sees its GCS or raylet die
  (``ray_lost``), exits, and the supervisor ends the session (HAProxy included).

Sessions are read from ``/proc`` (Linux). Elsewhere the server's process group is
ended instead, which misses Ray's workers and their HAProxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "LIFELINE_ENV",
    "STOP_TIMEOUT_S",
    "end_session",
    "ray_lost",
    "session_members",
    "start_reaper",
    "supervise",
    "watch_lifeline",
]

LIFELINE_ENV = "KILN_SERVE_LIFELINE_FD"
# serve.shutdown() plus ray.shutdown() took 5-15 s on 2 busy cores; beyond this the
# server is presumed stuck and its session is killed.
STOP_TIMEOUT_S = 60.0
_GRACE_S = 5.0
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HELD_BY_THIS_PROCESS: list[int] = []


def session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes in session ``sid``; [] without /proc."""
    members: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return members
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def end_session(sid: int, grace_s: float = _GRACE_S, spare: Sequence[int] = ()) -> list[int]:
    """SIGTERM every process of session ``sid``, then SIGKILL those left after ``grace_s``.

    Args:
        spare: Pids left alone (the caller, when it is a member).

    Returns:
        The pids that were signalled.
    """
    if not Path("/proc").is_dir():  # no sessions to read: the leader's process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, signal.SIGKILL)
        return []

    def members() -> list[int]:
        return [p for p in session_members(sid) if p not in spare]

    seen = members()
    _signal_all(seen, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := members()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(50):  # a member may fork while we kill; repeat until none is left
        if not left:
            break
        seen += [p for p in left if p not in seen]
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.1)
        left = members()
    return seen


def supervise(
    cmd: Sequence[str], env: dict[str, str] | None = None, grace_s: float = _GRACE_S
) -> int:
    """Run ``cmd`` as a server in a new session; end that session however it ends.

    The server gets the read end of a pipe in ``$KILN_SERVE_LIFELINE_FD`` (see
    ``watch_lifeline``). Members still there ``grace_s`` after SIGTERM are killed.
    Returns the server's exit status (128 + N for signal N).
    """
    read_fd, write_fd = os.pipe()
    child_env = dict(os.environ if env is None else env)
    child_env[LIFELINE_ENV] = str(read_fd)
    server = subprocess.Popen(
        list(cmd),
        env=child_env,
        pass_fds=(read_fd,),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    os.close(read_fd)
    stops: list[float] = []

    def forward(signum: int, frame: object) -> None:
        stops.append(time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            server.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        while True:
            try:
                rc = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if len(stops) > 1 or (stops and time.monotonic() - stops[0] > STOP_TIMEOUT_S):
                    print("kiln serve: stopping now", file=sys.stderr, flush=True)
                    end_session(server.pid, grace_s=0)
        end_session(server.pid, grace_s=grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)
    return rc if rc >= 0 else 128 - rc


def watch_lifeline(fd: int) -> threading.Thread:
    """In the server: stop as on SIGTERM when the supervisor dies (``fd`` reads EOF).

    If the server is still alive ``STOP_TIMEOUT_S`` later, its session (itself last)
    is killed.
    """

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_TIMEOUT_S)
        me = os.getpid()
        end_session(os.getsid(0), grace_s=0, spare=(me,))
        os._exit(1)

    thread = threading.Thread(target=watch, name="kiln-serve-lifeline", daemon=True)
    thread.start()
    return thread


def start_reaper() -> subprocess.Popen:
    """Start a process that ends this session once this process dies, however it dies.

    It reads its stdin (a pipe whose write end only this process holds) until EOF, so
    it needs no polling and no pid. It runs this file as a script: nothing but the
    standard library is imported.
    """
    read_fd, write_fd = os.pipe()
    reaper = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--reap"],
        stdin=read_fd,
        stdout=subprocess.DEVNULL,
    )
    os.close(read_fd)
    _HELD_BY_THIS_PROCESS.append(write_fd)  # closed by the kernel when this process dies
    return reaper


def _reap() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 1024):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    end_session(os.getsid(0), spare=(os.getpid(),))


def ray_lost() -> str | None:
    """The Ray process that died under this driver (gcs_server or raylet), if any.

    Only a Ray this process started has processes to watch; a joined cluster never
    counts as lost here.
    """
    try:
        from ray._private import worker
    except ImportError:
        return None
    node = getattr(worker, "_global_node", None)
    if node is None:
        return None
    try:
        dead = node.dead_processes()
    except Exception:  # the private API moved: do not stop a healthy server over it
        return None
    for process_type, _ in dead:
        if process_type in ("gcs_server", "raylet"):
            return process_type
    return None


if __name__ == "__main__" and sys.argv[1:] == ["--reap"]:
    _reap()
