"""resume_from="latest" looks only at the runs of the config's own run_name."""

from __future__ import annotations

import os

from kiln.engine.trainer import _runs_newest_first


def _run(storage, name, mtime):
    ckpt = storage / name / "checkpoints"
    ckpt.mkdir(parents=True)
    os.utime(ckpt, (mtime, mtime))
    return storage / name


def test_a_run_name_does_not_match_longer_names_that_start_with_it(tmp_path):
    own = _run(tmp_path, "digits-20261123-040000-abc123", 1_000)
    _run(tmp_path, "digits-mlp-20261123-050000-def456", 2_000)  # newer, another run name
    assert _runs_newest_first(tmp_path, "digits") == [own]


def test_runs_of_the_name_come_newest_first_and_only_they(tmp_path):
    old = _run(tmp_path, "digits-mlp-20261123-040000-abc123", 1_000)
    new = _run(tmp_path, "digits-mlp-20261123-050000-def456", 2_000)
    plain = _run(tmp_path, "digits-mlp", 1_500)  # a fixed checkpoint_dir-style name
    assert _runs_newest_first(tmp_path, "digits mlp") == [new, plain, old]
    assert _runs_newest_first(tmp_path, "iris") == []  # never another model's run
    assert _runs_newest_first(tmp_path, None) == [new, plain, old]  # no name: any run
