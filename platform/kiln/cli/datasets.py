"""``kiln datasets``: list the datasets kiln can load by id."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("datasets", help="list dataset ids")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
