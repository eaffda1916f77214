"""The confusion matrix of an evaluation as a PNG (``kiln eval --plot``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_confusion_matrix"]


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    *,
    title: str = "confusion matrix",
) -> Path:
    """Draw counts (rows: true class, columns: predicted) with row-normalised colours.

    The PNG is written to a temporary name beside ``path`` and renamed into place.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    n = counts.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    try:
        fig.savefig(tmp, dpi=100)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return target
