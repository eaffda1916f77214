"""Batch prediction benchmark (issue 14): `kiln predict` against two baselines, side by side.

    python benchmarks/bench_predict.py [--rows 1000000] [--reps 3] [--concurrency 2]
                                       [--batch-size 4096] [--object-store-mb 100]

Same bundle (an MLP 64-512-512-10 exported to ONNX), same parquet input (an id and 64
float32 feature columns, in 8 files), same output (parquet: id, prediction, 10
probabilities), one Ray started here with a small object store so that the input is
several times larger than it. Rows, interleaved ``--reps`` times (each pipeline goes
first in turn: the first job after start-up pays for Ray's worker processes), medians:

  kiln       kiln.predict.predict(...): Ray Data read -> map_batches(BundleScorer,
             ActorPoolStrategy(concurrency)) -> write_parquet, with row validation,
             rejects and the atomic publish
  hand       the same Ray Data pipeline written by hand: a callable class holding an
             onnxruntime session, np.stack of the columns, softmax; no validation
  script     the bundle's own single-process inference.py (its predict() with one
             session loaded once), fed by pyarrow batches, written with ParquetWriter

Also the peak resident memory of the driver process during `kiln` (sampled every 20 ms).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

FEATURES = 64
CLASSES = 10


def make_bundle(root: Path) -> Path:
    import torch
    from torch import nn

    from kiln.export import create_export_bundle

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES)
    )
    task = {"task_type": "classification", "num_classes": CLASSES, "input_shape": [FEATURES]}
    return create_export_bundle(model, None, task, None, root, "onnx", bundle_name="bench")


def make_input(root: Path, rows: int, files: int = 8) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "input"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, idx in enumerate(np.array_split(np.arange(rows), files)):
        x = rng.normal(size=(len(idx), FEATURES)).astype(np.float32)
        table = pa.table({"id": idx, **{f"f{i}": x[:, i] for i in range(FEATURES)}})
        pq.write_table(table, folder / f"part-{k:03d}.parquet", row_group_size=65536)
    return folder


class HandScorer:
    """The hand-written Ray Data baseline: one onnxruntime session per actor."""

    def __init__(self, onnx_path: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack([batch[f"f{i}"] for i in range(FEATURES)], axis=1).astype(np.float32)
        logits = self.session.run(["output"], {"input": x})[0]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        out = {"id": batch["id"], "prediction": probs.argmax(axis=1)}
        out.update({f"prob_{k}": probs[:, k] for k in range(CLASSES)})
        return out


def run_kiln(bundle: Path, source: Path, out: Path, args) -> float:
    from kiln.paths import RunPaths
    from kiln.predict import predict

    started = time.perf_counter()
    summary = predict(
        bundle, source, out, keep=["id"], batch_size=args.batch_size,
        concurrency=args.concurrency, progress=False, paths=RunPaths.resolve(out.parent / "home"),
    )  # fmt: skip
    assert summary.rows_scored == args.rows and summary.rows_rejected == 0, summary
    return time.perf_counter() - started


def run_hand(bundle: Path, source: Path, out: Path, args) -> float:
    import ray.data

    from kiln.predict.batch import actor_cpus

    started = time.perf_counter()
    ds = ray.data.read_parquet(str(source))
    ds.map_batches(
        HandScorer,
        fn_constructor_kwargs={"onnx_path": str(bundle / "artifacts" / "model.onnx")},
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=args.concurrency),
        num_cpus=actor_cpus(args.concurrency, None),  # the same actors as kiln's
    ).write_parquet(str(out))
    return time.perf_counter() - started


def run_script(bundle: Path, source: Path, out: Path, args) -> float:
    import onnxruntime as ort
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = importlib.util.spec_from_file_location("bundle_inference", bundle / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started = time.perf_counter()
    manifest = module.load_manifest()
    session = ort.InferenceSession(
        str(bundle / "artifacts" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    out.mkdir()
    writer = None
    for f in sorted(source.glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=args.batch_size):
            x = np.stack([batch.column(f"f{i}").to_numpy() for i in range(FEATURES)], axis=1)
            result = module.predict(x, manifest=manifest, session=session)
            probs = np.asarray(result["probabilities"], dtype=np.float32)
            table = pa.table(
                {
                    "id": batch.column("id"),
                    "prediction": np.asarray(result["predictions"]),
                    **{f"prob_{k}": probs[:, k] for k in range(CLASSES)},
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(out / "part-0.parquet", table.schema)
            writer.write_table(table)
    writer.close()
    return time.perf_counter() - started


class PeakRSS:
    """Samples this process's resident memory every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--object-store-mb", type=int, default=100)
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="kiln-bench-predict-"))
    try:
        bundle = make_bundle(root)
        source = make_input(root, args.rows)
        input_mb = sum(p.stat().st_size for p in source.iterdir()) / 2**20
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            object_store_memory=args.object_store_mb * 2**20,
            include_dashboard=False,
            logging_level="ERROR",
        )
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        runners = {"kiln": run_kiln, "hand": run_hand, "script": run_script}
        times: dict[str, list[float]] = {k: [] for k in runners}
        peaks = []
        names = list(runners)
        for rep in range(args.reps):
            for name in names[rep % 3 :] + names[: rep % 3]:  # each goes first in turn
                runner = runners[name]
                out = root / f"out-{name}-{rep}"
                if name == "kiln":
                    with PeakRSS() as rss:
                        before = rss.peak
                        times[name].append(runner(bundle, source, out, args))
                    peaks.append((before, rss.peak))
                else:
                    times[name].append(runner(bundle, source, out, args))
                shutil.rmtree(out, ignore_errors=True)
                print(f"rep {rep} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
        rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
        before, peak = max(peaks, key=lambda p: p[1])
        print("| pipeline | rows/s | kiln / this | note |")
        print("|---|---:|---:|---|")
        setup = (
            f"{args.rows:,} rows ({input_mb:.0f} MiB parquet; object store "
            f"{args.object_store_mb} MiB), {args.concurrency} actors, batch {args.batch_size}, "
            f"median of {args.reps}"
        )
        notes = {"kiln": setup, "hand": "the same pipeline by hand", "script": "one process"}
        for name in runners:
            ratio = rate["kiln"] / rate[name]
            print(f"| {name} | {rate[name]:,.0f} | {ratio:.3f} | {notes[name]} |")
        print("\n| driver memory during kiln predict | MiB |")
        print("|---|---:|")
        print(f"| peak resident | {peak / 2**20:.0f} |")
        print(f"| peak over the driver before the job | {(peak - before) / 2**20:+.0f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
