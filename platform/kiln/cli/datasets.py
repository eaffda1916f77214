"""``kiln datasets``: the datasets kiln loads by id, and rows of them written to a file.

    kiln datasets                                            # list the ids
    kiln datasets export digits --split val --limit 2 --no-labels -o rows.json
    kiln datasets export digits --split val -o new_batch.parquet   # .json, .parquet or .csv

``--split train|val|test|all`` splits the way a training run with the same
``--validation-split`` and ``--seed`` does (the defaults are TrainingConfig's;
``--config RUN_FILE`` takes the splits and the seed from a ``kiln train`` file), so
``val`` and ``test`` rows are rows that run never trained on. A ``.json`` file holds
``{"inputs": [[...], ...]}`` (plus ``"labels"`` unless ``--no-labels``), the body
``/predict`` and a bundle's ``inference.py --input`` read. Parquet and CSV files
have one column per feature, named as the dataset names them, plus ``label``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

__all__ = ["register"]

_FORMATS = (".json", ".parquet", ".csv")


def register(subparsers: argparse._SubParsersAction) -> None:
    from kiln.config import TrainingConfig

    defaults = TrainingConfig()
    p = subparsers.add_parser(
        "datasets",
        help="list dataset ids, or export rows of one to a file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_list)
    sub = p.add_subparsers(dest="datasets_command", metavar="SUBCOMMAND")
    sub.add_parser("list", help="list the dataset ids (the default)").set_defaults(func=cmd_list)
    e = sub.add_parser(
        "export",
        help="write rows of a dataset to .json, .parquet or .csv",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("dataset", help="dataset id (see `kiln datasets`) or a local data file")
    e.add_argument("-o", "--output", required=True, help="file to write: .json, .parquet or .csv")
    e.add_argument(
        "--split", choices=("train", "val", "test", "all"), default="all", help="which rows"
    )
    e.add_argument("--limit", type=int, default=None, help="at most this many rows (first ones)")
    e.add_argument("--no-labels", action="store_true", help="leave the labels out")
    e.add_argument(
        "--validation-split",
        type=float,
        default=defaults.validation_split,
        help="the held-out fraction, as the training run sets it",
    )
    e.add_argument(
        "--seed", type=int, default=defaults.random_seed, help="the training run's random_seed"
    )
    e.add_argument(
        "--config",
        metavar="RUN_FILE",
        help="take the splits (validation_split, test_split) and the seed from this run file",
    )
    e.set_defaults(func=cmd_export)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kiln.data import list_datasets

    table = Table(title="datasets (any local .parquet/.csv/.jsonl path works too)")
    for col in ("id", "task", "input shape", "classes", "rows", "source", "description"):
        table.add_column(col)
    for info in list_datasets():
        table.add_row(
            info.id,
            info.task_type,
            str(tuple(info.input_shape)) if info.input_shape else "-",
            str(info.num_classes or "-"),
            str(info.num_rows or "-"),
            info.source,
            info.description,
        )
    Console(width=140).print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kiln.cli.runs import run_paths
    from kiln.data import get_dataset

    out = Path(args.output)
    if out.suffix not in _FORMATS:
        raise ConfigError(f"-o {args.output!r}: the file must end in one of {', '.join(_FORMATS)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit!r} must be >= 1")
    from kiln.config import TrainingConfig, read_mapping
    from kiln.engine.data_plan import split_for_run

    run = read_mapping(args.config) if args.config else {}
    config = TrainingConfig(
        validation_split=run.get("validation_split", args.validation_split),
        test_split=run.get("test_split"),
        random_seed=run.get("random_seed", args.seed),
    ).validate()
    datasets_dir = run_paths(args).datasets / args.dataset
    dataset = get_dataset(args.dataset, data_dir=datasets_dir if datasets_dir.is_dir() else None)
    if args.split != "all":
        train, val, test = split_for_run(dataset, config)
        dataset = {"train": train, "val": val, "test": test}[args.split]
        if dataset is None:
            raise ConfigError(
                f"--split {args.split}: this dataset and config hold out no such rows"
            )
    x, y = _arrays(dataset)
    if args.limit is not None:
        x, y = x[: args.limit], y[: args.limit]
    names = dataset.info.feature_names
    _write(out, x, None if args.no_labels else y, names)
    print(f"wrote {len(x)} rows of {args.dataset} ({args.split}) to {out}")
    return 0


def _arrays(dataset: Any) -> tuple[Any, Any]:
    from kiln.data import ArrayDataset

    if isinstance(dataset, ArrayDataset):
        return dataset.x, dataset.y
    return dataset.local_arrays()


def _write(out: Path, x: Any, y: Any, names: Any) -> None:
    import numpy as np

    from kiln._fs import write_atomic

    rows = np.asarray(x)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        body: dict[str, Any] = {"inputs": rows.tolist()}
        if y is not None:
            body["labels"] = np.asarray(y).tolist()
        text = json.dumps(body)
        write_atomic(out, lambda f: f.write(text.encode("utf-8")))
        return
    import pandas as pd

    flat = rows.reshape(len(rows), -1)
    columns = list(names) if names and len(names) == flat.shape[1] else None
    frame = pd.DataFrame(flat, columns=columns or [f"x{i}" for i in range(flat.shape[1])])
    if y is not None:
        frame["label"] = np.asarray(y)
    if out.suffix == ".parquet":
        write_atomic(out, lambda f: frame.to_parquet(f, index=False))
    else:
        text = frame.to_csv(index=False)
        write_atomic(out, lambda f: f.write(text.encode("utf-8")))
