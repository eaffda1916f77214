"""PBT in kiln.tune: checks before any trial, the scheduler built from the space, and
the worker's rule that a resumed run takes its optimizer settings from its config."""

from __future__ import annotations

import json
import re

import pytest
import torch
from ray import tune

from kiln.config import TrainingConfig
from kiln.engine.optim import build_optimizer, build_scheduler
from kiln.engine.worker import _Hyperparameters
from kiln.errors import ConfigError
from kiln.tune import spaces
from kiln.tune.schedulers import ClampToSpace, check_pbt, create_scheduler, pbt_mutations

BASE = TrainingConfig(epochs=6, model={"name": "mlp", "hidden": [16]})


# ---------------------------------------------------------------------- scheduler
def test_pbt_mutates_the_searched_hyperparameters_only():
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.sample import Float

    space = spaces.parse_space(
        {
            "learning_rate": {"loguniform": [1e-4, 1e-1]},
            "lr_scheduler": ["constant", "cosine"],
            "batch_size": {"grid": [8, 16]},
            "model.hidden": [[8], [16]],  # architecture follows the donor's weights
            "optimizer": ["adam", "sgd"],  # the optimizer state must fit
            "epochs": [4, 6],
            "weight_decay": 0.01,  # a constant is not searched
        }
    )
    pbt = create_scheduler("pbt", max_t=6, space=space, perturbation_interval=2)
    assert isinstance(pbt, PopulationBasedTraining)
    assert pbt._time_attr == "epoch" and pbt._perturbation_interval == 2
    mutations = pbt._hyperparam_mutations
    assert set(mutations) == {"learning_rate", "lr_scheduler", "batch_size"}
    assert isinstance(mutations["learning_rate"], Float)  # the same Tune domain
    assert mutations["lr_scheduler"] == ["constant", "cosine"]
    assert mutations["batch_size"] == [8, 16]
    # default interval: a quarter of the longest trial, at least one epoch
    assert create_scheduler("pbt", max_t=12, space=space)._perturbation_interval == 3
    assert create_scheduler("pbt", max_t=2, space=space)._perturbation_interval == 1


def test_perturbed_values_stay_inside_the_space():
    space = spaces.parse_space(
        {"momentum": {"uniform": [0.5, 0.95]}, "batch_size": {"randint": [8, 33]}}
    )
    clamp = ClampToSpace.for_mutations(pbt_mutations(space))
    out = clamp({"momentum": 0.95 * 1.2, "batch_size": 40, "learning_rate": 9.0})
    assert out["momentum"] < 0.95 and out["momentum"] == pytest.approx(0.95)
    assert out["batch_size"] == 32 and isinstance(out["batch_size"], int)
    assert out["learning_rate"] == 9.0  # not searched: untouched
    assert clamp({"momentum": 0.3, "batch_size": 2}) == {"momentum": 0.5, "batch_size": 8}
    TrainingConfig(momentum=out["momentum"]).validate()


def test_check_pbt_lists_every_problem():
    space = spaces.parse_space({"model.hidden": [[8], [16]]})
    errors = check_pbt(space, [BASE.replace(num_workers=2)], 1, perturbation_interval=0)
    text = "\n".join(errors)
    assert len(errors) == 4, text
    assert "perturbation_interval=0 must be an integer >= 1" in text
    assert "num_workers=0" in text and "[2]" in text
    assert "at least 2 trials" in text and "starts 1" in text
    assert "model.hidden stay fixed" in text
    ok = spaces.parse_space({"learning_rate": {"loguniform": [1e-4, 1e-1]}})
    assert check_pbt(ok, [BASE], 4, perturbation_interval=2) == []


@pytest.mark.parametrize(
    ("space", "kwargs", "message"),
    [
        (
            {"learning_rate": tune.loguniform(1e-4, 1e-1)},
            {"num_samples": 4, "training_config": BASE.replace(num_workers=1)},
            "in-process trials only (num_workers=0)",
        ),
        ({"learning_rate": tune.loguniform(1e-4, 1e-1)}, {"num_samples": 1}, "at least 2 trials"),
        ({"model.hidden": [[8], [16]]}, {"num_samples": 4}, "can mutate"),
        ({}, {"num_samples": 4}, "varies nothing"),
        (
            {"learning_rate": tune.loguniform(1e-4, 1e-1)},
            {"num_samples": 4, "perturbation_interval": 1.5},
            "perturbation_interval=1.5",
        ),
    ],
)
def test_search_rejects_bad_pbt_input_before_any_trial(tmp_path, space, kwargs, message):
    from kiln.tune import search

    cfg = kwargs.pop("training_config", BASE)
    with pytest.raises(ConfigError, match=re.escape(message)):
        search(
            cfg,
            None,
            "iris",
            None,
            space,
            scheduler="pbt",
            storage_path=tmp_path / "tune",
            db_path=tmp_path / "kiln.db",
            data_dir=tmp_path,
            **kwargs,
        )
    assert not (tmp_path / "tune").exists() or not any((tmp_path / "tune").iterdir())


def test_a_grid_counts_towards_the_population(tmp_path):
    """Two grid points with num_samples=1 are a population of 2 (the check passes; the
    search then fails later for want of Ray, which this unit test does not start)."""
    from kiln.tune.search import _grid_size

    space = spaces.parse_space({"learning_rate": {"grid": [1e-2, 1e-3]}})
    assert _grid_size(space) == 2
    assert check_pbt(space, [BASE], 1 * _grid_size(space)) == []


# ---------------------------------------------------------------------- restores file
def test_restores_are_noted_for_other_trials_only(tmp_path):
    from kiln.tune._record import _restores
    from kiln.tune.trial import _note_restore

    def meta(owner, epoch):
        return {"epoch": epoch, "user": {"training_config": {"run_name": owner}}}

    _note_restore(tmp_path, "t1", meta("t1", 2))  # its own checkpoint (a pause): not noted
    assert _restores(tmp_path) == []
    _note_restore(tmp_path, "t1", meta("t0", 4))
    _note_restore(tmp_path, "t1", meta("t3", 6))
    assert _restores(tmp_path) == ["t0", "t3"]
    lines = (tmp_path / "restores.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"from_trial": "t0", "epoch": 4}


def test_best_params_are_the_scalars_in_effect_at_the_best_epoch():
    import numpy as np

    from kiln.tune._record import _params_at

    params = {
        "learning_rate": 0.05,
        "batch_size": 16,
        "model.hidden": [8],
        "lr_scheduler": "cosine",
    }
    at_best = {
        "learning_rate": np.float64(0.0625),
        "batch_size": np.float64(32.0),  # a column with gaps reads back as floats
        "model.hidden": "[8]",  # lists come back from Tune's table as text: kept as is
        "lr_scheduler": "constant",
    }
    out = _params_at(params, at_best)
    assert out == {
        "learning_rate": 0.0625,
        "batch_size": 32,
        "model.hidden": [8],
        "lr_scheduler": "constant",
    }
    assert type(out["batch_size"]) is int
    assert _params_at(params, {"learning_rate": float("nan")}) == params


# ---------------------------------------------------------------------- worker: resume rule
def _trained(cfg: TrainingConfig, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt, sched, (x, y)


def _resume(cfg: TrainingConfig, model, saved_opt, saved_sched):
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    configured = _Hyperparameters.read(opt, sched)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    configured.apply(opt, sched)
    return opt, sched


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_resumed_run_takes_lr_weight_decay_and_momentum_from_its_config(optimizer):
    a = TrainingConfig(
        optimizer=optimizer,
        learning_rate=1e-2,
        weight_decay=0.01,
        momentum=0.9,
        lr_scheduler="constant",
        warmup_ratio=0.0,
    )
    b = a.replace(learning_rate=3e-4, weight_decay=0.2, momentum=0.5)
    model, opt, sched, (x, y) = _trained(a, steps=4)
    opt, sched = _resume(b, model, opt.state_dict(), sched.state_dict())
    assert sched.last_epoch == 4  # the schedule's step is the checkpoint's
    assert opt.state_dict()["state"]  # the moments are the checkpoint's
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    decay, no_decay = opt.param_groups
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4]
    assert sched.get_last_lr() == [3e-4, 3e-4] and sched.base_lrs == [3e-4, 3e-4]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    if optimizer == "sgd":
        assert decay["momentum"] == no_decay["momentum"] == 0.5


def test_resuming_with_the_same_config_changes_nothing():
    cfg = TrainingConfig(learning_rate=1e-2, lr_scheduler="cosine", warmup_ratio=0.2)
    model, opt, sched, _ = _trained(cfg, steps=7)
    before = ([dict(g, params=None) for g in opt.param_groups], sched.state_dict())
    opt2, sched2 = _resume(cfg, model, opt.state_dict(), sched.state_dict())
    assert [dict(g, params=None) for g in opt2.param_groups] == before[0]
    assert sched2.state_dict() == before[1]


def test_a_new_lr_follows_the_schedule_at_the_restored_step():
    a = TrainingConfig(learning_rate=1e-2, lr_scheduler="cosine", warmup_ratio=0.0)
    model, opt, sched, _ = _trained(a, steps=10)  # half way through 20 steps
    opt, sched = _resume(a.replace(learning_rate=4e-3), model, opt.state_dict(), sched.state_dict())
    factor = sched.lr_lambdas[0](10)
    assert factor == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3 * factor)
