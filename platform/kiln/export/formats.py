"""One small exporter per bundle format, each with its own parity check.

An exporter writes one file under ``artifacts/`` and can run that file again on
sample inputs, so ``create_export_bundle`` can compare every format with the
eager PyTorch model. The table ``EXPORTERS`` maps the format names a user
passes (``formats=["onnx", "pytorch"]``) to these objects.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kiln.errors import ExportError

__all__ = [
    "ExportError",
    "Exporter",
    "EXPORTERS",
    "DEFAULT_FORMATS",
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "get_exporter",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DEFAULT_OPSET = 17
DEFAULT_FORMATS = ("onnx", "pytorch")


@dataclass(frozen=True)
class ExportContext:
    """What an exporter needs besides the model: a traced sample and ONNX options."""

    sample: torch.Tensor
    opset: int = DEFAULT_OPSET
    onnx_dynamo: bool = False


class Exporter(Protocol):
    """Writes one artifact and runs it again for the parity check."""

    filename: str

    def export(self, model: torch.nn.Module, path: Path, ctx: ExportContext) -> None:
        """Write the artifact for ``model`` to ``path``."""

    def run(self, model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
        """Run the written artifact on ``x`` and return its output as numpy."""


def _eager(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).detach().cpu().numpy()


class OnnxExporter:
    """ONNX with a dynamic batch axis, checked on onnxruntime (what the server runs)."""

    filename = "model.onnx"

    def export(self, model: torch.nn.Module, path: Path, ctx: ExportContext) -> None:
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ctx.onnx_dynamo:
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(
                    model,
                    (ctx.sample,),
                    str(path),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},),
                    opset_version=ctx.opset,
                    external_data=False,
                )
            else:
                torch.onnx.export(
                    model,
                    (ctx.sample,),
                    str(path),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=axes,
                    opset_version=ctx.opset,
                )

    def run(self, model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


class TorchScriptExporter:
    """TorchScript by tracing (kept for seed users; PyTorch deprecates it for torch.export)."""

    filename = "model.torchscript.pt"

    def export(self, model: torch.nn.Module, path: Path, ctx: ExportContext) -> None:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (ctx.sample,), check_trace=False)
            traced.save(str(path))

    def run(self, model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
        # Loading TorchScript runs code; only ever the file this process just wrote.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu")
        return _eager(loaded, x)


class StateDictExporter:
    """A plain state dict (``torch.save``), loaded back with ``weights_only=True``."""

    filename = "model.pytorch.pt"

    def export(self, model: torch.nn.Module, path: Path, ctx: ExportContext) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, str(path))

    def run(self, model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
        return _eager(fresh.eval(), x)


class SafetensorsExporter:
    """The state dict as safetensors (no pickle at all)."""

    filename = "model.safetensors"

    def export(self, model: torch.nn.Module, path: Path, ctx: ExportContext) -> None:
        from safetensors.torch import save_model

        save_model(model, str(path))

    def run(self, model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
        from safetensors.torch import load_model

        fresh = copy.deepcopy(model)
        load_model(fresh, str(path))
        return _eager(fresh.eval(), x)


class TorchExportExporter:
    """``torch.export`` program (``.pt2``) with a dynamic batch dimension."""

    filename = "model.pt2"

    def export(self, model: torch.nn.Module, path: Path, ctx: ExportContext) -> None:
        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (ctx.sample,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))

    def run(self, model: torch.nn.Module, path: Path, x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
        return _eager(program.module(), x)


EXPORTERS: dict[str, Exporter] = {
    "onnx": OnnxExporter(),
    "torchscript": TorchScriptExporter(),
    "pytorch": StateDictExporter(),
    "safetensors": SafetensorsExporter(),
    "torch_export": TorchExportExporter(),
}


def get_exporter(name: str) -> Exporter:
    """Return the exporter for a format name; unknown names list the known ones."""
    try:
        return EXPORTERS[name]
    except KeyError:
        raise ExportError(
            f"formats: unknown export format {name!r}; allowed formats are {sorted(EXPORTERS)}"
        ) from None
