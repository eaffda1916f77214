"""`kiln eval` / `kiln predict` options: argument parsing and the actors' CPU share, no model run."""

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


def test_actors_leave_a_cpu_for_reads_and_writes():
    from kiln.errors import ConfigError
    from kiln.predict.batch import actor_cpus

    assert actor_cpus(2, None, total=2) == 0.5  # 2 actors of 1 CPU on 2 CPUs would hang
    assert actor_cpus(2, None, total=16) == 1.0
    assert actor_cpus(8, None, total=2) == 0.25
    assert actor_cpus(1, 0.5, total=2) == 0.5
    with pytest.raises(ConfigError, match="concurrency=2 actors x num_cpus=1 leave 0 of"):
        actor_cpus(2, 1.0, total=2)
