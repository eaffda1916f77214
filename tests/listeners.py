"""Who listens where, read from /proc (``/proc/net/tcp*`` and each process's fds).

``serve_listeners(port)``: the sockets of the HAProxy processes serving ``port`` (HTTP
frontend, stats, metrics) and of the replica ports its config forwards to;
``assert_loopback_only`` checks they are all on loopback. Used by the serve tests.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from kiln.serve._ports import listening_inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _haproxy_serving(port: int) -> tuple[set[int], Path]:
    """Pids of the HAProxy processes that share the config of the one on ``port``."""
    listening = listening_inodes()
    argvs = {
        int(p.name): _cmdline(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()
    }
    procs = {pid: a for pid, a in argvs.items() if a and Path(a[0]).name == "haproxy" and "-f" in a}
    config = None
    for pid, argv in procs.items():
        if any(listening.get(i, ("", 0))[1] == port for i in _socket_inodes(pid)):
            config = argv[argv.index("-f") + 1]
    assert config is not None, f"no HAProxy listens on port {port}"
    pids = {pid for pid, argv in procs.items() if config in argv}
    return pids, Path(config)


def serve_listeners(port: int) -> dict[str, list[tuple[str, int]]]:
    """Listeners of our HAProxy processes, and of the replica ports they forward to."""
    pids, config = _haproxy_serving(port)
    listening = listening_inodes()
    haproxy = sorted({listening[i] for pid in pids for i in _socket_inodes(pid) if i in listening})
    replica_ports = {
        int(line.split()[2].rsplit(":", 1)[1])
        for line in config.read_text().splitlines()
        if line.strip().startswith("server ")
    }
    replicas = sorted(a for a in listening.values() if a[1] in replica_ports)
    return {"haproxy": haproxy, "replicas": replicas}


def assert_loopback_only(listeners: dict[str, list[tuple[str, int]]], ports: set[int]) -> None:
    assert listeners["replicas"], f"no replica HTTP listener found: {listeners}"
    every = listeners["haproxy"] + listeners["replicas"]
    exposed = [a for a in every if not ipaddress.ip_address(a[0]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed} (all: {listeners})"
    missing = ports - {p for _, p in listeners["haproxy"]}
    assert not missing, f"HAProxy is not listening on {missing}: {listeners}"
