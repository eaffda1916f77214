"""Model registry throughput: registrations/s and tag look-ups/s, 1 and 4 processes.

    python benchmarks/bench_registry.py [--registrations 400] [--lookups 20000] [--size-kib 64]

Each registration copies a distinct checkpoint file (``--size-kib``) into the
content-addressed artifact store (hash, copy, fsync, rename) and inserts the row in a
``BEGIN IMMEDIATE`` transaction; each look-up resolves ``name@production`` to a full
entry (two queries). With 4 processes the same total work is split between spawned
processes writing one kiln.db (WAL); the rate is total work / wall time between a
shared barrier and the last process finishing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path


def _register(
    index: int, count: int, db: str, artifacts: str, src: str, size: int, barrier
) -> float:
    from kiln.tracking import ModelRegistry

    reg = ModelRegistry(db, artifacts)
    files = []
    for i in range(count):  # written before the clock starts
        path = Path(src) / f"p{index}-{i}.pt"
        path.write_bytes(os.urandom(size))
        files.append(path)
    barrier.wait()
    for i, path in enumerate(files):
        reg.register_model(f"bench-{index}", path, metrics={"val_loss": 1.0 / (i + 1)})
    return time.perf_counter()


def _lookup(index: int, count: int, db: str, artifacts: str, barrier) -> float:
    from kiln.tracking import ModelRegistry

    reg = ModelRegistry(db, artifacts)
    names = reg.names()
    barrier.wait()
    for i in range(count):
        entry = reg.resolve(f"{names[(index + i) % len(names)]}@production")
        assert "production" in entry.tags
    return time.perf_counter()


def _timed(ctx, procs: int, fn, per_proc_args: list[tuple]) -> float:
    """Seconds from all processes passing the barrier to the last one finishing."""
    with ctx.Manager() as manager, ctx.Pool(procs) as pool:
        barrier = manager.Barrier(procs + 1)
        pending = pool.starmap_async(fn, [(*a, barrier) for a in per_proc_args])
        barrier.wait()
        start = time.perf_counter()
        ends = pending.get()
    return max(ends) - start  # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux


def run(registrations: int, lookups: int, size_kib: int) -> list[dict]:
    from kiln.tracking import ModelRegistry

    ctx = mp.get_context("spawn")
    rows = []
    for procs in (1, 4):
        with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
            db, artifacts, src = f"{tmp}/kiln.db", f"{tmp}/artifacts", f"{tmp}/src"
            os.makedirs(src)
            ModelRegistry(db, artifacts).close()  # schema in place before the clock
            per = registrations // procs
            reg_s = _timed(
                ctx, procs, _register,
                [(i, per, db, artifacts, src, size_kib * 1024) for i in range(procs)],
            )  # fmt: skip
            reg = ModelRegistry(db, artifacts)
            for name in reg.names():
                reg.promote_model(reg.get_model(name=name).model_id, "production")
            look_per = lookups // procs
            look_s = _timed(
                ctx, procs, _lookup, [(i, look_per, db, artifacts) for i in range(procs)]
            )
            rows.append(
                {
                    "processes": procs,
                    "registrations": per * procs,
                    "registrations_per_s": per * procs / reg_s,
                    "lookups": look_per * procs,
                    "lookups_per_s": look_per * procs / look_s,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registrations", type=int, default=400)
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--size-kib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="report the median of N runs")
    args = parser.parse_args()

    import statistics

    import apsw

    trials = [run(args.registrations, args.lookups, args.size_kib) for _ in range(args.repeats)]
    rows = [
        {k: statistics.median(t[i][k] for t in trials) for k in trials[0][i]}
        for i in range(len(trials[0]))
    ]
    print(
        f"Model registry throughput ({args.size_kib} KiB checkpoints; SQLite "
        f"{apsw.sqlite_lib_version()} via apsw, WAL; {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}; median of {args.repeats} runs)\n"
    )
    print("| processes | registrations | registrations/s | tag look-ups | tag look-ups/s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['processes']:.0f} | {r['registrations']:.0f} | {r['registrations_per_s']:.0f} "
            f"| {r['lookups']:.0f} | {r['lookups_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
