"""`kiln predict`: score files of any size with a model on Ray Data.

    kiln predict digits@production rows.parquet -o scored.parquet --keep id
    kiln predict exports/digits s3://bucket/rows/ -o s3://bucket/scored/ --concurrency 8

MODEL is an export bundle folder or ``NAME@TAG`` / ``NAME:VERSION`` (exported once into
``$KILN_HOME/bundles``). INPUT and OUTPUT are parquet/csv/jsonl files or folders, local
or any URI pyarrow understands; an OUTPUT ending in .parquet/.csv/.jsonl is one file,
else a folder of part files. Rows that cannot be scored go to OUTPUT's
``*.rejects.jsonl`` with the reason. Starts (or joins, with RAY_ADDRESS) Ray.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def _columns(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def cmd_predict(args: argparse.Namespace) -> int:
    from kiln.cli.runs import run_paths
    from kiln.predict import predict

    summary = predict(
        args.model,
        args.input,
        args.output,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_cpus=args.num_cpus,
        keep=_columns(args.keep) or [],
        features=_columns(args.features),
        input_format=args.input_format,
        output_format=args.output_format,
        rejects=args.rejects,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        paths=run_paths(args),
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    print(
        f"scored {summary.rows_scored} rows in {summary.seconds:.1f} s "
        f"({summary.rows_per_second:,.0f} rows/s) -> {summary.output}"
    )
    if summary.rows_rejected:
        print(f"rejected {summary.rows_rejected} rows -> {summary.rejects}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="score parquet/csv/jsonl files with a model on Ray Data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="export bundle folder, NAME@TAG or NAME:VERSION")
    p.add_argument("input", metavar="INPUT", help="parquet/csv/jsonl file or folder (or URI)")
    p.add_argument("-o", "--output", required=True, help="file or folder to write (or URI)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default 1024)")
    p.add_argument("--concurrency", type=int, default=2, help="onnxruntime actors (default 2)")
    p.add_argument(
        "--num-cpus", type=float, help="CPUs per actor (default 1, less if that leaves none free)"
    )
    p.add_argument("--keep", help="comma-separated input columns written beside predictions")
    p.add_argument("--features", help="comma-separated feature columns, in the model's order")
    p.add_argument(
        "--input-format",
        choices=("parquet", "csv", "jsonl"),
        help="the input's format when its name does not say (default: from the suffix)",
    )
    p.add_argument(
        "--output-format",
        choices=("parquet", "csv", "jsonl"),
        help="the output's format (default: from OUTPUT's suffix, else parquet)",
    )
    p.add_argument("--rejects", help="JSONL file for rows that cannot be scored")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_predict)
