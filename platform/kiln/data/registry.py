"""Dataset ids from configs and the CLI, looked up in one plain dict.

``get_dataset("iris")`` loads a built-in; ``get_dataset("data/train.parquet")`` reads
a local file; ``register_dataset`` adds your own loader. Nothing registers itself
on import: the built-ins are listed in ``_BUILTINS`` below.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.data import builtin
from kiln.data.base import DatasetInfo, KilnDataset
from kiln.data.files import FILE_FORMATS, FileDataset
from kiln.data.idx import MNIST_INFO, load_mnist
from kiln.errors import DatasetError, DatasetNotFoundError

__all__ = ["get_dataset", "list_datasets", "register_dataset", "dataset_ids"]


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., KilnDataset]
    description: str = ""
    info: DatasetInfo | None = None
    takes_data_dir: bool = False


def _mnist(data_dir: str | Path | None = None, split: str = "train") -> KilnDataset:
    return load_mnist(data_dir, split=split)


_BUILTINS: dict[str, _Entry] = {
    "iris": _Entry(lambda: builtin.load_bundled("iris"), info=builtin.BUNDLED_INFO["iris"]),
    "digits": _Entry(lambda: builtin.load_bundled("digits"), info=builtin.BUNDLED_INFO["digits"]),
    "mnist": _Entry(_mnist, info=MNIST_INFO, takes_data_dir=True),
    # Synthetic sets are cheap: list_datasets builds them with default arguments.
    "synthetic_classification": _Entry(builtin.synthetic_classification),
    "synthetic_regression": _Entry(builtin.synthetic_regression),
    "tiny_tokens": _Entry(builtin.tiny_tokens),
}
_REGISTRY: dict[str, _Entry] = dict(_BUILTINS)


def register_dataset(
    id: str,
    loader: Callable[..., KilnDataset],
    *,
    description: str = "",
    info: DatasetInfo | None = None,
    overwrite: bool = False,
) -> None:
    """Make ``get_dataset(id, **kwargs)`` call ``loader(**kwargs)``.

    Args:
        id: The dataset id used in configs and on the command line.
        loader: Returns a ``KilnDataset``; receives get_dataset's keyword arguments.
        description: One line for ``list_datasets``.
        info: Static description for ``list_datasets``; without it, listing calls
            ``loader()`` once.
        overwrite: Replace an existing id instead of raising.
    """
    if not isinstance(id, str) or not id:
        raise DatasetError(f"dataset id={id!r}; expected a non-empty string")
    if not callable(loader):
        raise DatasetError(
            f"loader for {id!r} is {loader!r}; expected a callable returning a KilnDataset"
        )
    if id in _REGISTRY and not overwrite:
        raise DatasetError(
            f"dataset id {id!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[id] = _Entry(loader, description, info)


def unregister_dataset(id: str) -> None:
    """Remove a registered id (built-ins come back as they were)."""
    _REGISTRY.pop(id, None)
    if id in _BUILTINS:
        _REGISTRY[id] = _BUILTINS[id]


def dataset_ids() -> list[str]:
    """Every registered id, sorted."""
    return sorted(_REGISTRY)


def list_datasets() -> list[DatasetInfo]:
    """A ``DatasetInfo`` per registered id (synthetic ones with default arguments)."""
    out = []
    for id_, entry in sorted(_REGISTRY.items()):
        info = entry.info or entry.loader().info
        if entry.description:
            info = info.replace(description=entry.description)
        out.append(info.replace(id=id_))
    return out


def get_dataset(
    id_or_path: str | Path, *, data_dir: str | Path | None = None, **kwargs: Any
) -> KilnDataset:
    """Load a registered dataset by id, or a local parquet/csv/jsonl file or folder.

    Args:
        id_or_path: A registered id (see ``dataset_ids()``) or a path.
        data_dir: Folder with the dataset's files, for ids that read local files
            (``mnist``: the IDX files). The CLI passes ``$KILN_HOME/datasets/<id>``.
        **kwargs: Passed to the loader (e.g. ``n_samples=`` for synthetic sets) or,
            for paths, to ``FileDataset`` (``features=``, ``label=``, ``task_type=``).

    Raises:
        DatasetNotFoundError: Neither a registered id nor an existing path.
    """
    key = str(id_or_path)
    entry = _REGISTRY.get(key)
    if entry is not None:
        if entry.takes_data_dir:  # ids backed by generated/bundled data ignore data_dir
            kwargs["data_dir"] = data_dir
        try:
            return entry.loader(**kwargs)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
            raise DatasetError(f"dataset {key!r} does not accept {sorted(kwargs)}: {exc}") from None
    path = Path(key).expanduser()
    if path.exists():
        return FileDataset(path, **kwargs)
    if path.suffix.lower() in FILE_FORMATS or "/" in key or "\\" in key:
        raise DatasetNotFoundError(f"file not found: {key}")
    close = difflib.get_close_matches(key, dataset_ids(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DatasetNotFoundError(
        f"unknown dataset {key!r}; {hint}known ids: {', '.join(dataset_ids())}; "
        f"a path to a local {'/'.join(s.lstrip('.') for s in FILE_FORMATS)} file or folder also works"
    )
