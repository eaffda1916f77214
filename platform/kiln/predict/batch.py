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

__all__ = [
    "BundleScorer",
    "PredictionSummary",
    "ScorerSpec",
    "actor_cpus",
    "feature_columns",
    "predict",
]

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


# ---------------------------------------------------------------------- the actor
@dataclass(frozen=True)
class ScorerSpec:
    """What an actor needs from a verified bundle, read in the driver.

    The actors import only onnxruntime and numpy (not torch, which importing
    ``kiln.export`` would pull in: seconds per actor start on a small machine).
    """

    onnx_path: str
    onnx_sha256: str
    input_name: str
    output_name: str
    row_shape: tuple[int, ...]
    dtype: str
    task_type: str
    class_names: list[str] | None
    num_outputs: int
    mean: np.ndarray | None
    inv_std: np.ndarray | None
    allow_non_finite: bool

    @classmethod
    def of(cls, bundle: Any) -> ScorerSpec:
        from kiln.export.preprocess import stats_array

        manifest = bundle.manifest
        pre = manifest.get("preprocessing") or {}
        row_shape = tuple(int(d) for d in bundle.input_shape)
        norm = pre.get("normalize")
        return cls(
            onnx_path=str(bundle.artifact_path("onnx")),
            onnx_sha256=bundle.artifact_sha256["onnx"],
            input_name=manifest["inputs"][0]["name"],
            output_name=manifest["outputs"][0]["name"],
            row_shape=row_shape,
            dtype=bundle.input_dtype,
            task_type=bundle.task_type,
            class_names=pre.get("class_names"),
            num_outputs=int(np.prod(manifest["outputs"][0]["shape"][1:] or [1])),
            mean=stats_array(norm["mean"], row_shape) if norm else None,
            inv_std=1.0 / stats_array(norm["std"], row_shape) if norm else None,
            allow_non_finite=bool(pre.get("allow_non_finite", False)),
        )


class BundleScorer:
    """A Ray Data actor: one onnxruntime session over a bundle's ONNX file, loaded once.

    ``__call__`` takes a numpy batch (dict of columns) and returns the kept columns,
    ``prediction`` and, for classifiers, ``prob_<class>`` columns, for the rows that
    could be scored; the others go to a rejects part file under ``rejects``.
    """

    def __init__(
        self, spec: ScorerSpec, features: list[str] | str, keep: list[str], rejects: str
    ) -> None:
        import hashlib

        import onnxruntime as ort

        with open(spec.onnx_path, "rb") as fh:  # the driver verified it; check it still is
            if hashlib.sha256(fh.read()).hexdigest() != spec.onnx_sha256:
                raise ConfigError(
                    f"{spec.onnx_path!r} no longer matches the sha256 in its bundle's manifest"
                )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # one actor per CPU; more threads only contend
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            spec.onnx_path, opts, providers=["CPUExecutionProvider"]
        )
        self.spec, self.features, self.keep = spec, features, keep
        self.width = int(np.prod(spec.row_shape))
        self.rejects = Location.of(rejects)
        self.tag = uuid.uuid4().hex[:12]
        self.parts = 0
        self.prob_columns = (
            [f"prob_{n}" for n in (spec.class_names or range(spec.num_outputs))]
            if spec.task_type == "classification"
            else []
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()))) if batch else 0
        x, reasons = self._rows(batch, n)
        out = {c: np.asarray(batch[c]) for c in self.keep}
        if reasons:  # the common case, no rejects, copies nothing here
            ok = np.ones(n, dtype=bool)
            ok[list(reasons)] = False
            self._reject(batch, reasons)
            out = {c: v[ok] for c, v in out.items()}
            x = x[ok]
        x = x.reshape((-1, *self.spec.row_shape)).astype(self.spec.dtype, copy=False)
        if self.spec.mean is not None:
            x = ((x - self.spec.mean) * self.spec.inv_std).astype(self.spec.dtype)
        raw = (
            self.session.run([self.spec.output_name], {self.spec.input_name: x})[0]
            if len(x)
            else None
        )
        out.update(self._format(raw, len(x)))
        return out

    # -- rows -----------------------------------------------------------------------
    def _rows(self, batch: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, dict[int, str]]:
        """Features as float32 ``[n, width]`` and ``{row: reason}`` of the rows to reject."""
        reasons: dict[int, str] = {}
        strict = not self.spec.allow_non_finite
        if isinstance(self.features, str):
            x = self._list_column(np.asarray(batch[self.features]), n, reasons)
            if strict:
                for i in np.flatnonzero(~np.isfinite(x).all(axis=1)):
                    reasons.setdefault(int(i), f"{self.features!r} holds NaN or infinite values")
        else:
            x = np.zeros((n, len(self.features)), dtype=np.float32)
            for j, name in enumerate(self.features):
                x[:, j] = _numeric(np.asarray(batch[name]), name, reasons, strict)
        if reasons:
            x = x if x.flags.writeable else x.copy()  # Ray's zero-copy batches are read-only
            x[list(reasons)] = 0.0
        return x, reasons

    def _list_column(self, col: np.ndarray, n: int, reasons: dict[int, str]) -> np.ndarray:
        name = self.features
        if col.dtype != object and col.ndim >= 2:  # a regular tensor column: one check
            flat = col.reshape(n, -1)
            if flat.shape[1] == self.width and flat.dtype.kind in "fiub":
                return flat.astype(np.float32, copy=False)
            col = np.array(list(flat) + [None], dtype=object)[:-1]
        x = np.zeros((n, self.width), dtype=np.float32)
        for i, value in enumerate(col):
            try:
                row = np.asarray(value, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                reasons[i] = f"{name!r} holds values that are not numbers: {_short(value)}"
                continue
            if row.size != self.width:
                reasons[i] = f"{name!r} has {row.size} values; the model takes {self.width}"
                continue
            x[i] = row
        return x

    # -- outputs --------------------------------------------------------------------
    def _format(self, raw: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
        if self.spec.task_type == "regression":
            width = 1 if raw is None else raw.reshape(n, -1).shape[1]
            values = np.zeros((0, 1), np.float32) if raw is None else raw.reshape(n, -1)
            if width == 1:
                return {"prediction": values[:, 0].astype(np.float32)}
            return {f"prediction_{k}": values[:, k] for k in range(width)}
        k = len(self.prob_columns)
        probs = np.zeros((0, k), np.float32) if raw is None else _softmax(raw)
        idx = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        names = self.spec.class_names
        out = {"prediction": np.asarray(names, dtype=object)[idx] if names else idx}
        out.update({c: probs[:, j] for j, c in enumerate(self.prob_columns)})
        return out

    def _reject(self, batch: dict[str, np.ndarray], reasons: dict[int, str]) -> None:
        lines = []
        for i, reason in sorted(reasons.items()):
            record: dict[str, Any] = {"reason": reason}
            record.update({c: _plain(batch[c][i]) for c in self.keep})
            record["row"] = {c: _plain(v[i]) for c, v in batch.items()}
            lines.append(json.dumps(record, default=str))
        self.parts += 1
        name = f"part-{self.tag}-{self.parts:06d}.jsonl"
        final = self.rejects.child(name)
        data = ("\n".join(lines) + "\n").encode()
        if self.rejects.is_local:  # temp name, fsync, rename: never half a part
            tmp = Path(self.rejects.path) / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final.path)
        else:  # object stores publish a whole object on close
            with self.rejects.fs.open_output_stream(final.path) as out:
                out.write(data)


def _numeric(col: np.ndarray, name: str, reasons: dict[int, str], strict: bool) -> np.ndarray:
    """One scalar feature column as float32; rows that cannot be scored get a reason.

    Numeric columns take one vectorised check; only other columns (strings, objects)
    are parsed value by value. An empty cell reads as NaN in a numeric column.
    """
    if col.dtype.kind in "iub":
        return col.astype(np.float32)
    if col.dtype.kind == "f":
        values = col.astype(np.float32, copy=False)
        if strict:
            for i in np.flatnonzero(~np.isfinite(values)):
                what = "infinite" if np.isinf(values[i]) else "empty or NaN"
                reasons.setdefault(int(i), f"column {name!r} is {what}")
        return values
    import pandas as pd

    series = pd.Series(col, dtype=object)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    missing = series.isna().to_numpy()
    for i in np.flatnonzero(np.isnan(values) | (strict & np.isinf(values))):
        if missing[i]:
            reason = f"column {name!r} is empty"
        elif np.isnan(values[i]):
            reason = f"column {name!r} is not a number: {_short(col[i])}"
        else:
            reason = f"column {name!r} is infinite"
        reasons.setdefault(int(i), reason)
    return values.astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    # kiln.export.preprocess.softmax, restated: importing kiln.export imports torch.
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
