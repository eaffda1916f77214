"""`kiln eval` / `kiln predict` argument parsing, without running a model."""

from __future__ import annotations

import pytest

from kiln.cli import build_parser
from kiln.cli import eval as eval_cli
from kiln.predict import evaluation as evaluate_module


def test_eval_choices_are_the_library_ones():
    assert eval_cli.SPLITS == evaluate_module.SPLITS
    assert eval_cli.DEFAULT_BATCH_SIZE == evaluate_module.DEFAULT_BATCH_SIZE


def test_eval_and_predict_parse():
    parser = build_parser()
    args = parser.parse_args(
        ["eval", "digits@prod", "digits", "--split", "test", "--plot", "c.png"]
    )
    assert (args.model, args.data, args.split, args.plot, args.workers) == (
        "digits@prod", "digits", "test", "c.png", 0
    )  # fmt: skip
    args = parser.parse_args(
        ["predict", "b/", "in.csv", "-o", "out/", "--keep", "id,name", "--concurrency", "4"]
    )
    assert (args.keep, args.concurrency, args.batch_size, args.output) == (
        "id,name",
        4,
        1024,
        "out/",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "m", "d", "--split", "holdout"])
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "m", "in.csv"])  # -o is required
