"""Datasets for kiln: a registry of ids, in-memory arrays, local files, collators.

Every dataset is a ``KilnDataset``: ``info`` (a ``DatasetInfo``), ``len``,
``split(validation_split, seed)`` and ``to_ray()``, which yields a
``ray.data.Dataset`` with columns ``"x"`` (float32 features of shape
``info.input_shape``; int64 token ids for language modeling and sequence to
sequence) and ``"y"`` (int64 class ids; float32 regression targets; token ids again
for language modeling; target token ids for sequence to sequence; a class per pixel
``[H, W]`` for segmentation, -100 where the loss skips).

    >>> from kiln.data import get_dataset
    >>> train, val = get_dataset("iris").split(0.2, seed=0)
"""

from kiln.data.arrays import ArrayDataset, from_arrays
from kiln.data.base import DatasetInfo, KilnDataset
from kiln.data.builtin import synthetic_classification, synthetic_regression, tiny_tokens
from kiln.data.collate import CollatorRegistry, DataLoaderConfig, DataLoaderFactory
from kiln.data.files import FileDataset
from kiln.data.idx import load_mnist, read_idx, write_idx
from kiln.data.module import UniversalDataModule
from kiln.data.registry import (
    dataset_ids,
    get_dataset,
    list_datasets,
    register_dataset,
    unregister_dataset,
)

__all__ = [
    "ArrayDataset",
    "CollatorRegistry",
    "DataLoaderConfig",
    "DataLoaderFactory",
    "DatasetInfo",
    "FileDataset",
    "KilnDataset",
    "dataset_ids",
    "from_arrays",
    "get_dataset",
    "list_datasets",
    "load_mnist",
    "read_idx",
    "register_dataset",
    "synthetic_classification",
    "synthetic_regression",
    "tiny_tokens",
    "UniversalDataModule",
    "unregister_dataset",
    "write_idx",
]
