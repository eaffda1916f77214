"""Batch prediction on Ray Data: a bundle's ONNX model over files of any size.

    kiln predict digits@production rows.parquet -o scored.parquet --keep id
    summary = kiln.predict.predict("exports/digits", "s3://bucket/rows/", "s3://bucket/out/")

The pipeline is Ray Data's, streamed block by block (memory stays bounded whatever
the input size; Ray Data shows its progress)::

    ray.data.read_{parquet,csv,json}(INPUT)
      -> map_batches(BundleScorer, concurrency=N)   N actors, one onnxruntime session
                                                    each, loaded once
      -> write_{parquet,csv,json}(OUTPUT)

``BundleScorer`` turns each batch into feature rows, scores the rows that can be
scored and returns them with the kept columns, ``prediction`` and (classifiers) one
``prob_<class>`` column per class. Rows that cannot be scored (wrong width, a value
that is not a number, NaN) are written by the actor to a rejects part file with the
reason; the job goes on. At the end the parts become one ``*.rejects.jsonl`` beside
OUTPUT. On a cluster the actors spread over the nodes (OUTPUT must then be storage
every node sees: a shared mount or a URI).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ConfigError
from kiln.paths import RunPaths
from kiln.predict import _files
from kiln.predict._files import Location
from kiln.predict.scorer import BundleScorer, ScorerSpec

__all__ = ["PredictionSummary", "actor_cpus", "feature_columns", "predict"]

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "y", "target")
REJECTS_PARTS = "_rejects"


@dataclass
class PredictionSummary:
    """What a :func:`predict` run did."""

    bundle: str
    input: str
    output: str
    rows_scored: int
    rows_rejected: int
    rejects: str | None
    seconds: float
    features: list[str]

    @property
    def rows_per_second(self) -> float:
        return (self.rows_scored + self.rows_rejected) / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": self.rows_per_second}


def predict(
    model: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 1024,
    concurrency: int = 2,
    num_cpus: float | None = None,
    keep: list[str] | tuple[str, ...] = (),
    features: list[str] | None = None,
    input_format: str | None = None,
    output_format: str | None = None,
    rejects: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    paths: RunPaths | None = None,
) -> PredictionSummary:
    """Score every row of INPUT with a bundle's ONNX model and write OUTPUT.

    Args:
        model: an export bundle folder, or ``NAME@TAG`` / ``NAME:VERSION`` (exported
            once into ``paths.bundles``).
        input: a parquet/csv/jsonl file or folder, local or a URI pyarrow understands.
        output: a folder of part files, or one file when it ends in .parquet/.csv/.jsonl.
        batch_size: rows per ``map_batches`` call.
        concurrency: onnxruntime actors (each holds one session).
        num_cpus: CPUs reserved per actor; default 1, or less where the cluster would
            otherwise have no CPU left for Ray Data's read and write tasks (see
            :func:`actor_cpus`).
        keep: input columns copied beside the predictions (an id column, say).
        features: the feature columns, in the model's order; default: the task's input
            column (``x``, one list per row) when present, else every column that is not
            kept and not a label (``label``, ``y``, ``target``).
        input_format / output_format: ``parquet``, ``csv`` or ``jsonl`` where the
            suffixes do not say.
        rejects: where the rejected rows go (JSONL); default ``<output>.rejects.jsonl``.
        overwrite: replace an existing OUTPUT.
        progress: show Ray Data's progress bars.
        paths: kiln's locations (registry, bundle cache).

    Returns:
        A :class:`PredictionSummary` (rows scored and rejected, where they went).
    """
    _check_options(batch_size, concurrency, num_cpus)
    from kiln._ray import ensure_ray
    from kiln.export import load_bundle

    paths = paths or RunPaths.resolve()
    bundle = load_bundle(_bundle_dir(model, paths), verify=True)
    if bundle.task_type not in ("classification", "regression") or "onnx" not in bundle.formats:
        raise ConfigError(
            f"bundle {str(bundle.path)!r} ({bundle.task_type}, formats {bundle.formats}) cannot "
            "be used by kiln predict: it needs an ONNX classifier or regressor"
        )
    source, target = Location.of(input), Location.of(output)
    ensure_ray()
    import ray.data

    fmt_in = _files.input_format(source, input_format)
    fmt_out, single_file = _files.output_format(target, output_format, fmt_in)
    job = _Job(
        bundle=bundle,
        source=source,
        target=target,
        fmt_in=fmt_in,
        fmt_out=fmt_out,
        single_file=single_file,
        rejects=Location.of(rejects) if rejects else _rejects_beside(target),
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=actor_cpus(concurrency, num_cpus),
        keep=list(keep),
        features=list(features) if features is not None else None,
        overwrite=overwrite,
    )
    context = ray.data.DataContext.get_current()
    shown, context.enable_progress_bars = context.enable_progress_bars, progress
    try:
        return job.run()
    finally:
        context.enable_progress_bars = shown


@dataclass(frozen=True)
class _Job:
    """One prediction run, its inputs resolved and checked."""

    bundle: Any
    source: Location
    target: Location
    fmt_in: str
    fmt_out: str
    single_file: bool
    rejects: Location
    batch_size: int
    concurrency: int
    num_cpus: float
    keep: list[str]
    features: list[str] | None
    overwrite: bool

    def run(self) -> PredictionSummary:
        """Read, score on the actor pool, write, publish (see the module docstring)."""
        import ray.data

        started = time.perf_counter()
        ds = _files.read_dataset(self.source, self.fmt_in)
        layout = feature_columns(list(ds.schema().names), self.bundle, self.keep, self.features)
        staged = _files.staging(self.target, self.overwrite)
        parts = staged.child(REJECTS_PARTS)
        parts.fs.create_dir(parts.path, recursive=True)
        scored = ds.map_batches(
            BundleScorer,
            fn_constructor_kwargs={
                "spec": ScorerSpec.of(self.bundle),
                "features": layout,
                "keep": self.keep,
                "rejects": parts.uri,
            },
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.concurrency),
            num_cpus=self.num_cpus,
        )
        try:
            _files.write_dataset(scored, staged, self.fmt_out)
            rejected = _merge_rejects(parts, self.rejects)
            rows = _files.publish(staged, self.target, self.fmt_out, self.single_file)
        except BaseException:
            if staged.path != self.target.path:
                _files._remove(staged)
            raise
        return PredictionSummary(
            bundle=str(self.bundle.path),
            input=self.source.uri,
            output=self.target.uri,
            rows_scored=rows,
            rows_rejected=rejected,
            rejects=self.rejects.uri if rejected else None,
            seconds=time.perf_counter() - started,
            features=[layout] if isinstance(layout, str) else layout,
        )


def _check_options(batch_size: Any, concurrency: Any, num_cpus: Any) -> None:
    problems = []
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r} must be an int >= 1")
    if not isinstance(concurrency, int) or concurrency < 1:
        problems.append(f"concurrency={concurrency!r} must be an int >= 1 (actors)")
    if num_cpus is not None and (not isinstance(num_cpus, (int, float)) or num_cpus <= 0):
        problems.append(f"num_cpus={num_cpus!r} must be a number > 0 (CPUs per actor)")
    if problems:
        raise ConfigError(problems)


def actor_cpus(concurrency: int, num_cpus: float | None, total: float | None = None) -> float:
    """CPUs per actor: ``num_cpus``, or by default 1 where that leaves a CPU free.

    The actors hold their CPUs for the whole job; if they took every CPU of the
    cluster, Ray Data could schedule no read or write task and the job would wait
    forever (seen on 2 CPUs with 2 actors of 1 CPU). The default shrinks the actors'
    share to leave one CPU (at least 1/4 CPU each); an explicit ``num_cpus`` that
    leaves less than one CPU is an error.
    """
    if total is None:
        import ray

        total = float(ray.cluster_resources().get("CPU", 0))
    free = total - 1
    if num_cpus is None:
        return max(0.25, min(1.0, free / concurrency))
    if concurrency * num_cpus > free:
        raise ConfigError(
            f"concurrency={concurrency} actors x num_cpus={num_cpus:g} leave "
            f"{total - concurrency * num_cpus:g} of the cluster's {total:g} CPUs for Ray "
            "Data's read and write tasks, which need 1; lower concurrency or num_cpus, or "
            "leave num_cpus unset"
        )
    return float(num_cpus)


def _bundle_dir(model: str | os.PathLike[str], paths: RunPaths) -> Path:
    from kiln.export import export_registered, is_model_ref

    text = os.fspath(model)
    if is_model_ref(text):
        bundle, _ = export_registered(text, paths.db, paths.artifacts, paths.bundles, "onnx")
        return bundle
    if not (Path(text) / "manifest.json").is_file():
        raise ConfigError(
            f"model={text!r} is neither an export bundle (no manifest.json) nor NAME@TAG / "
            "NAME:VERSION; export a checkpoint first with `kiln export CHECKPOINT -o DIR`"
        )
    return Path(text)


def _rejects_beside(target: Location) -> Location:
    stem = target.uri.rstrip("/")
    suffix = Path(target.path).suffix
    if suffix.lower() in _files.FORMATS:
        stem = stem[: -len(suffix)]
    return Location.of(stem + ".rejects.jsonl")


def feature_columns(
    columns: list[str], bundle: Any, keep: Any, features: list[str] | None
) -> list[str] | str:
    """The feature columns (a list), or the name of one list column holding each row.

    Raises ConfigError (every problem at once) when a kept or named column is missing,
    or when the number of scalar feature columns differs from the model's input width.
    """
    width = int(np.prod(bundle.input_shape))
    task = json.loads((bundle.path / "configs" / "task_spec.json").read_text() or "{}")
    list_column = task.get("input_column") or "x"
    problems = [
        f"{what}: column {c!r} is not in the input; its columns are {columns}"
        for what, names in (("keep", keep), ("features", features or []))
        for c in names
        if c not in columns
    ]
    if features is None and list_column in columns:
        chosen: list[str] = [list_column]
    elif features is None:
        chosen = [c for c in columns if c not in keep and c not in LABEL_COLUMNS]
    else:
        chosen = list(features)
    if len(chosen) == 1 and width > 1:  # one column holding a list of values per row
        if not problems:
            return chosen[0]
    elif len(chosen) != width:
        shown = f"{chosen[:8]}{'...' if len(chosen) > 8 else ''}"
        problems.append(
            f"the model takes {width} features per row but {len(chosen)} feature columns "
            f"were found: {shown}; name them with features= (--features)"
        )
    if problems:
        raise ConfigError(problems)
    return chosen


def _merge_rejects(parts: Location, target: Location) -> int:
    """Concatenate the actors' reject parts into one JSONL file; return the row count."""
    files = parts.files()
    rows = 0
    if files:
        tmp = target.sibling(f".tmp-{uuid.uuid4().hex[:8]}")
        with tmp.fs.open_output_stream(tmp.path) as out:
            for f in files:
                with parts.fs.open_input_stream(f) as fh:
                    data = fh.read()
                rows += data.count(b"\n")
                out.write(data)
        _files._replace(tmp, target)
    parts.fs.delete_dir(parts.path)
    return rows
