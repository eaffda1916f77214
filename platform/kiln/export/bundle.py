"""``create_export_bundle``: a trained model out of kiln as a self-contained folder.

Layout (seed 002, plus ``manifest.json``)::

    <output_dir>/<bundle_name>/
        artifacts/   model.onnx, model.torchscript.pt, model.pytorch.pt,
                     model.safetensors, model.pt2 (the formats asked for)
        configs/     task_spec.json, training_config.json, model_config.json,
                     serve_config.yaml
        inference.py README.md requirements.txt Dockerfile manifest.json

The bundle is built in a temporary folder beside its destination and renamed
into place only after every format has passed its parity check, so a reader
never sees half a bundle.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kiln
from kiln._fs import TMP_MARK, publish_dir, write_json_synced, write_text_synced
from kiln.export import _templates
from kiln.export.formats import (
    DEFAULT_FORMATS,
    DEFAULT_OPSET,
    EXPORTERS,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportContext,
    ExportError,
    get_exporter,
)
from kiln.export.manifest import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, sha256_file
from kiln.export.preprocess import normalisation_from, stats_array

__all__ = ["create_export_bundle", "PARITY_BATCH_SIZES", "FP32_TOLERANCE"]

PARITY_BATCH_SIZES = (1, 3, 8)
FP32_TOLERANCE = 1e-4


def create_export_bundle(
    model: torch.nn.Module,
    config: Any = None,
    task_spec: Any = None,
    training_config: Any = None,
    output_dir: str | os.PathLike[str] = "./exports",
    formats: str | Iterable[str] = DEFAULT_FORMATS,
    sample_input: torch.Tensor | np.ndarray | None = None,
    *,
    opset: int | None = None,
    class_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    bundle_name: str | None = None,
    tolerance: float | None = None,
    onnx_dynamo: bool = False,
    overwrite: bool = False,
    registered: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` in each format, check parity with PyTorch, write the bundle.

    Args:
        model: A ``torch.nn.Module`` taking ``[batch, *input_shape]`` and returning
            ``[batch, num_outputs]`` (logits for classification). It is copied, not changed.
        config: The model's architecture dict (or anything with ``to_dict()``).
        task_spec: A ``TaskSpec``, a dict or None (task type, class names, input shape,
            ``preprocessing_config`` with normalisation ``mean``/``std``).
        training_config: A ``TrainingConfig``, a dict or None; stored for provenance.
        output_dir: Parent folder; the bundle is ``output_dir/bundle_name``.
        formats: Any of ``onnx``, ``torchscript``, ``pytorch``, ``safetensors``,
            ``torch_export`` (a list, or a comma-separated string).
        sample_input: A batch to trace with; generated from the input shape when None.
        opset: ONNX opset (default 17).
        class_names: Overrides ``task_spec.class_names``.
        input_shape: Per-row shape when neither ``sample_input`` nor the task spec gives it.
        bundle_name: Folder name; default ``model_<UTC timestamp>``.
        tolerance: Max abs difference allowed per format (default 1e-4 for fp32).
        onnx_dynamo: Use the ``torch.export``-based ONNX exporter (needs onnxscript).
        overwrite: Replace an existing bundle of the same name.
        registered: The registry identity of the model (name, version, model_id), kept
            in the manifest as ``model`` so a server can say what it serves.

    Returns:
        The bundle directory.

    Raises:
        ExportError: unknown format, missing input shape, bad class names or
            normalisation stats, an exporter failure, or a parity difference above
            ``tolerance``.
    """
    fmt_list = _check_formats(formats)
    task = _as_dict(task_spec, "task_spec")
    model_cfg = _as_dict(config, "config")
    train_cfg = _as_dict(training_config, "training_config")

    work = copy.deepcopy(model).cpu().eval()
    sample = _sample_batch(sample_input, input_shape, task, model_cfg)
    with torch.inference_mode():
        reference = work(sample)
    if not isinstance(reference, torch.Tensor):
        raise ExportError(
            f"model: forward returned {type(reference).__name__}; export needs a single tensor"
        )
    if tolerance is None:
        tolerance = FP32_TOLERANCE if _is_fp32(work) else 1e-2
    final = _bundle_path(output_dir, bundle_name, overwrite)
    tmp = final.parent / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "artifacts").mkdir(parents=True)
        (tmp / "configs").mkdir()
        ctx = ExportContext(sample=sample, opset=opset or DEFAULT_OPSET, onnx_dynamo=onnx_dynamo)
        artifacts, parity = _export_formats(work, fmt_list, ctx, tmp, tolerance)
        manifest = _manifest(final.name, fmt_list, ctx, task, class_names, sample, reference)
        manifest.update(artifacts=artifacts, parity=parity)
        if registered is not None:
            manifest["model"] = dict(registered)
        _write_side_files(tmp, final, manifest, task, model_cfg, train_cfg)
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.parent.name != "artifacts"
        }
        write_text_synced(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        try:
            publish_dir(tmp, final, replace=overwrite)
        except FileExistsError:
            raise ExportError(
                f"output_dir: bundle {str(final)!r} appeared while exporting"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _bundle_path(output_dir: Any, bundle_name: str | None, overwrite: bool) -> Path:
    """``output_dir/bundle_name`` (default name: a UTC timestamp); refuses an existing one."""
    out_root = Path(output_dir).expanduser().resolve()
    name = bundle_name or f"model_{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S-%f}"
    final = out_root / name
    if final.exists() and not overwrite:
        raise ExportError(
            f"output_dir: bundle {str(final)!r} already exists; pass overwrite=True "
            "or another bundle_name"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    return final


def _manifest(
    name: str,
    fmt_list: list[str],
    ctx: ExportContext,
    task: dict[str, Any],
    class_names: Sequence[str] | None,
    sample: torch.Tensor,
    reference: torch.Tensor,
) -> dict[str, Any]:
    """The manifest's description of the model: formats, tensors, pre/post-processing."""
    row_shape = list(sample.shape[1:])
    kind = _task_kind(task)
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "kiln_version": kiln.__version__,
        "torch_version": torch.__version__,
        "onnx_opset": ctx.opset if "onnx" in fmt_list else None,
        "task_type": kind,
        "formats": fmt_list,
        "inputs": [
            {"name": INPUT_NAME, "dtype": _dtype_name(sample), "shape": ["batch", *row_shape]}
        ],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": _dtype_name(reference),
                "shape": ["batch", *reference.shape[1:]],
            }
        ],
        "preprocessing": _preprocessing(task, class_names, row_shape, reference, kind),
    }


def _check_formats(formats: str | Iterable[str]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [str(f).strip() for f in items if str(f).strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown or not names:
        raise ExportError(
            f"formats: {list(items)!r} contains unknown or no formats {unknown!r}; "
            f"allowed formats are {sorted(EXPORTERS)}"
        )
    return list(dict.fromkeys(names))


def _as_dict(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "to_dict"):
        return dict(value.to_dict())
    raise ExportError(
        f"{field}: expected a dict, an object with to_dict() or None, got {type(value).__name__}"
    )


def _sample_batch(
    sample_input: Any,
    input_shape: Sequence[int] | None,
    task: dict[str, Any],
    model_cfg: dict[str, Any],
) -> torch.Tensor:
    if sample_input is not None:
        sample = torch.as_tensor(
            np.asarray(sample_input) if not torch.is_tensor(sample_input) else sample_input
        )
        if sample.ndim < 2 or sample.shape[0] < 1:
            raise ExportError(
                f"sample_input: expected a batch [batch>=1, *input_shape], got shape {list(sample.shape)}"
            )
        sample = sample.detach().cpu()
        return sample.float() if sample.dtype == torch.float64 else sample
    shape = input_shape or task.get("input_shape") or model_cfg.get("input_shape")
    if not shape:
        raise ExportError(
            "input_shape: unknown; pass sample_input, input_shape=..., or a task_spec with input_shape"
        )
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *[int(d) for d in shape], generator=gen)


def _parity_inputs(sample: torch.Tensor) -> list[np.ndarray]:
    """The sample itself plus batches of several sizes (proves the dynamic batch axis)."""
    rng = np.random.default_rng(0)
    base = sample.numpy()
    batches = [base]
    for size in PARITY_BATCH_SIZES:
        if base.dtype.kind == "f":
            batches.append(rng.standard_normal((size, *base.shape[1:])).astype(base.dtype))
        else:  # integer inputs (token ids): resample rows of the given sample
            batches.append(base[rng.integers(0, base.shape[0], size=size)])
    return batches


def _export_formats(
    model: torch.nn.Module,
    fmt_list: list[str],
    ctx: ExportContext,
    root: Path,
    tolerance: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    artifacts: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    batches = _parity_inputs(ctx.sample)
    with torch.inference_mode():
        expected = [model(torch.from_numpy(b)).numpy() for b in batches]
    for fmt in fmt_list:
        exporter = get_exporter(fmt)
        path = root / "artifacts" / exporter.filename
        try:
            exporter.export(model, path, ctx)
            outputs = [exporter.run(model, path, b) for b in batches]
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"formats: exporting {fmt!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        worst = 0.0
        for b, want, got in zip(batches, expected, outputs, strict=True):
            if got.shape != want.shape:
                raise ExportError(
                    f"parity: {fmt!r} returned shape {list(got.shape)} for a batch of "
                    f"{b.shape[0]}, PyTorch returned {list(want.shape)}"
                )
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
        if not worst <= tolerance:
            raise ExportError(
                f"parity: {fmt!r} differs from PyTorch by max abs {worst:.3g} > tolerance "
                f"{tolerance:g}; the export is not faithful"
            )
        artifacts[fmt] = {
            "path": f"artifacts/{exporter.filename}",
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }
        parity[fmt] = {
            "max_abs_diff": worst,
            "tolerance": tolerance,
            "batch_sizes": [int(b.shape[0]) for b in batches],
        }
    return artifacts, parity


def _task_kind(task: dict[str, Any]) -> str:
    task_type = task.get("task_type") or "classification"
    if task_type == "regression":
        return "regression"
    if task_type == "language_modeling":
        return "language_modeling"
    return "classification"


def _preprocessing(
    task: dict[str, Any],
    class_names: Sequence[str] | None,
    row_shape: list[int],
    reference: torch.Tensor,
    kind: str,
) -> dict[str, Any]:
    names = list(class_names) if class_names is not None else task.get("class_names")
    if names is not None:
        names = [str(n) for n in names]
        n_out = reference.shape[-1]
        if kind != "classification" or len(names) != n_out:
            raise ExportError(
                f"class_names: {names!r} has {len(names)} names; a classifier with "
                f"{n_out} outputs needs exactly {n_out} (task_type={kind!r})"
            )
    norm = normalisation_from(task.get("preprocessing_config"))
    if norm is not None:
        try:
            stats_array(norm["mean"], row_shape)
            std = stats_array(norm["std"], row_shape)
        except ValueError as exc:
            raise ExportError(f"task_spec.preprocessing_config: {exc}") from None
        if not np.all(np.isfinite(std)) or np.any(std == 0):
            raise ExportError(
                f"task_spec.preprocessing_config: std={norm['std']!r} must be finite and non-zero"
            )
    return {"normalize": norm, "class_names": names, "allow_non_finite": False}


def _is_fp32(model: torch.nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in model.parameters())


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _write_side_files(
    tmp: Path,
    final: Path,
    manifest: dict[str, Any],
    task: dict[str, Any],
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
) -> None:
    import numpy
    import onnxruntime

    configs = tmp / "configs"
    write_json_synced(configs / "task_spec.json", task, sort_keys=True)
    write_json_synced(configs / "training_config.json", train_cfg, sort_keys=True)
    write_json_synced(configs / "model_config.json", model_cfg, sort_keys=True)
    write_text_synced(
        configs / "serve_config.yaml", _templates.serve_config_yaml(final.name, str(final))
    )
    write_text_synced(tmp / "inference.py", _templates.INFERENCE_PY)
    write_text_synced(
        tmp / "requirements.txt",
        _templates.requirements_txt(
            _base_version(onnxruntime.__version__), _base_version(numpy.__version__)
        ),
    )
    write_text_synced(tmp / "Dockerfile", _templates.DOCKERFILE.format(name=final.name.lower()))
    write_text_synced(tmp / "README.md", _templates.readme_md(manifest))


def _base_version(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])
