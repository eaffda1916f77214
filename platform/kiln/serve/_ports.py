"""The ports ``kiln serve`` listens on: free ones picked, taken ones named with their holder.

A port held by a leftover HAProxy (a server killed on an older kiln, or another
user's server) used to surface as HAProxy's own stack trace from deep inside Serve.
``check_free`` tries the bind first and says in one line which pid holds the port.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from pathlib import Path

from kiln.errors import PortInUseError

__all__ = ["check_free", "free_port", "listening_inodes", "port_holder"]


def _family(host: str) -> socket.AddressFamily:
    try:
        return (
            socket.AF_INET6
            if ipaddress.ip_address(host.strip("[]")).version == 6
            else socket.AF_INET
        )
    except ValueError:
        return socket.AF_INET


# Ray's worker processes take ports in 10002-19999 (``ray start --min/max-worker-port``
# defaults); the kernel hands out ephemeral ports (every outgoing connection, every
# bind to port 0) from ``ip_local_port_range``, 32768-60999 by default.
_PICK_FROM = 20000  # above Ray's worker ports
# Ports this process picked: none is picked twice, so the ports of one server (HTTP,
# stats, metrics), picked before any is bound, always differ.
_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now, for a server that binds it later.

    Between the pick and the server's bind the port can be taken. A port the OS picks
    (bind to port 0) comes from its ephemeral range, which every outgoing connection on
    the machine also draws from (Ray opens hundreds), and a second process asking the
    OS gets the same few ports back. So the pick is random among the ports below the
    ephemeral range and above Ray's worker ports; the OS picks only when that range is
    empty (a machine configured with a wide ephemeral range).
    """
    ephemeral = _ephemeral_ports()
    candidates = range(_PICK_FROM, ephemeral.start)
    if len(candidates) >= 1000:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.choice(candidates)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    return str(ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))))


def listening_inodes() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket (Linux /proc)."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                addr, port = fields[1].split(":")
                found[int(fields[9])] = (_hex_address(addr), int(port, 16))
    return found


def port_holder(port: int) -> tuple[int, str] | None:
    """``(pid, command line)`` of a process listening on ``port``, if one is visible."""
    inodes = {i for i, (_, p) in listening_inodes().items() if p == port}
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # another user's process
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    argv = []
                cmd = " ".join(a.decode(errors="replace") for a in argv if a)
                return int(entry.name), " ".join(cmd.split())[:160]
    return None


def check_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise ``PortInUseError`` naming the holder when ``host:port`` cannot be bound.

    Args:
        what: What the port is for ("HTTP", "HAProxy stats").
        flag: The option that picks another port, for the message.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            s.bind((host.strip("[]"), port))
            return
        except OSError as exc:
            reason = exc.strerror or str(exc)
    holder = port_holder(port)
    if holder is None:
        who = "a process this user cannot see (another user's, or outside this namespace)"
    else:
        who = f"pid {holder[0]} ({holder[1]})"
    raise PortInUseError(
        f"port {port} ({what}) on {host} is not free ({reason}): held by {who}; "
        f"stop that process or pick another port with {flag}"
    )
