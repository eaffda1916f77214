"""Run every benchmark and write benchmarks/RESULTS.md (and the README's table).

    python benchmarks/run.py [--reps 5] [--only engine,tracking,registry,serve,tune,llm]

Each benchmark script prints a markdown table whose rows compare kiln with a
baseline measured in the same run. This runner gathers them, stamps the machine,
and replaces the block between the RESULTS markers in README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = {
    "engine": ("Training engine (issue 2)", "bench_engine.py"),
    "tracking": ("Tracking cost (issue 3)", "bench_tracking.py"),
    "registry": ("Registry throughput (issue 3)", "bench_registry.py"),
    "serve": ("Serving (issue 4)", "bench_serve.py"),
    "tune": ("Tune (issue 5)", "bench_tune.py"),
    "queue": ("Job queue (issue 10)", "bench_queue.py"),
    "predict": ("Batch prediction (issue 14)", "bench_predict.py"),
    "fsdp": ("Bigger models: FSDP vs DDP (issue 14)", "bench_fsdp.py"),
    "llm": ("LLM fine-tuning (issue 11)", "bench_llm.py"),
    "progress": ("Progress display (issue 13)", "bench_progress.py"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCRIPTS))
    args = parser.parse_args()
    sections = []
    for key in args.only.split(","):
        title, script = SCRIPTS[key]
        path = HERE / script
        if not path.exists():
            continue
        cmd = [sys.executable, str(path)]
        if key in ("engine", "tracking"):
            cmd += ["--reps", str(args.reps)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        elapsed = time.perf_counter() - start
        table = _tables(proc.stdout)
        if proc.returncode != 0:
            table += f"\n\n(failed with exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]})"
        sections.append(
            f"### {title}\n\n`python benchmarks/{script}` ({elapsed:.0f} s)\n\n{table}\n"
        )
        print(sections[-1], flush=True)
    header = (
        "# Benchmark results\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Rerun: `python benchmarks/run.py`.\n"
        "Ratios are kiln / baseline; both sides run in the same invocation, interleaved.\n\n"
    )
    sections = _merge_with_previous(sections)
    text = header + "\n".join(sections)
    (HERE / "RESULTS.md").write_text(text)
    readme = ROOT / "README.md"
    body = "\n".join(sections).replace("### ", "#### ")
    readme.write_text(
        re.sub(
            r"<!-- RESULTS:BEGIN -->.*<!-- RESULTS:END -->",
            lambda _: f"<!-- RESULTS:BEGIN -->\n{body}\n<!-- RESULTS:END -->",
            readme.read_text(),
            flags=re.S,
        )
    )


def _tables(stdout: str) -> str:
    """The markdown tables a benchmark printed, separated by blank lines."""
    blocks: list[list[str]] = [[]]
    for line in stdout.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return "\n\n".join("\n".join(b) for b in blocks if b)


def _merge_with_previous(fresh: list[str]) -> list[str]:
    """Keep sections of RESULTS.md that this run did not measure (``--only``)."""
    path = HERE / "RESULTS.md"
    if not path.exists():
        return fresh
    old = ["### " + part for part in path.read_text().split("\n### ")[1:]]
    titles = {s.splitlines()[0] for s in fresh}
    merged, used = [], set()
    for section in old:
        title = section.splitlines()[0]
        match = next((s for s in fresh if s.splitlines()[0] == title), None)
        merged.append(match or section.rstrip("\n") + "\n")
        used.add(title)
    merged.extend(s for s in fresh if s.splitlines()[0] not in used and s.splitlines()[0] in titles)
    return merged


if __name__ == "__main__":
    main()
