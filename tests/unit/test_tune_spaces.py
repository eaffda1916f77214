"""kiln.tune.spaces / schedulers / search(): parsing and every check made before a trial."""

from __future__ import annotations

import pytest
from ray import tune

from kiln.config import TrainingConfig
from kiln.errors import ConfigError
from kiln.tune import spaces
from kiln.tune.schedulers import check_scheduler, create_scheduler, create_stopper

BASE = TrainingConfig(epochs=6, model={"name": "mlp", "hidden": [16]})


def _errors(space, base=BASE, **kw):
    return spaces.check_space(spaces.parse_space(space), base, **kw)


# ---------------------------------------------------------------------- parsing
def test_yaml_forms_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = spaces.parse_space(
        {
            "learning_rate": {"loguniform": [1e-4, 1e-1]},
            "weight_decay": {"uniform": [0.0, 0.1]},
            "batch_size": {"randint": [8, 33]},
            "optimizer": {"choice": ["adam", "sgd"]},
            "epochs": {"grid": [2, 4]},
            "model.hidden": [[16], [32, 16]],
            "random_seed": 7,
        }
    )
    assert isinstance(space["learning_rate"], Float) and space["learning_rate"].lower == 1e-4
    assert isinstance(space["weight_decay"], Float)
    assert isinstance(space["batch_size"], Integer)
    assert isinstance(space["optimizer"], Categorical)
    assert space["epochs"] == {"grid_search": [2, 4]}
    assert isinstance(space["model.hidden"], Categorical)  # a bare list is a choice
    assert space["model.hidden"].categories == [[16], [32, 16]]
    assert space["random_seed"] == 7  # constants pass through
    assert _errors(space) == []


def test_tune_domains_pass_through():
    domain = tune.loguniform(1e-3, 1e-1)
    assert spaces.parse_space({"learning_rate": domain})["learning_rate"] is domain


def test_search_file_with_settings(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "learning_rate: {loguniform: [1.0e-4, 1.0e-1]}\n"
        "preset: [quick_prototype, baseline]\n"
        "tune:\n  scheduler: fifo\n  num_samples: 3\n  plateau: true\n"
    )
    space, settings = spaces.load_search_file(path)
    assert set(space) == {"learning_rate", "preset"}
    assert settings == {"scheduler": "fifo", "num_samples": 3, "plateau": True}


def test_search_file_unknown_setting(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: [0.1]\ntune:\n  samples: 3\n")
    with pytest.raises(ConfigError, match=r"tune\.samples is not a search setting.*num_samples"):
        spaces.load_search_file(path)


def test_unknown_yaml_domain_suggests():
    with pytest.raises(ConfigError, match=r"\{loguniforn: \.\.\.\} is not a domain.*'loguniform'"):
        spaces.parse_space({"learning_rate": {"loguniforn": [1e-4, 1e-1]}})


def test_loguniform_with_negative_lower_bound():
    with pytest.raises(ConfigError, match=r"learning_rate: \{loguniform: \[-0\.1, 0\.1\]\}"):
        spaces.parse_space({"learning_rate": {"loguniform": [-0.1, 0.1]}})


def test_empty_choice():
    with pytest.raises(ConfigError, match="choice needs a non-empty list"):
        spaces.parse_space({"optimizer": {"choice": []}})


# ---------------------------------------------------------------------- checks
def test_unknown_field_names_it_and_suggests():
    (err,) = _errors({"learning_rat": [0.1]})
    assert "'learning_rat' is not a TrainingConfig field" in err
    assert "Did you mean 'learning_rate'" in err


def test_negative_learning_rate_range():
    (err,) = _errors({"learning_rate": {"uniform": [-0.1, 0.1]}})
    assert "learning_rate: uniform(-0.1, 0.1) allows -0.1" in err
    assert "must be > 0" in err


def test_float_domain_for_int_field():
    (err,) = _errors({"batch_size": {"uniform": [8, 64]}})
    assert "batch_size: uniform(8, 64) samples floats" in err and "must be an integer" in err


def test_numeric_domain_for_string_field():
    (err,) = _errors({"optimizer": tune.uniform(0, 1)})
    assert "optimizer" in err and "string field" in err


def test_invalid_choice_values_listed():
    (err,) = _errors({"optimizer": ["adamw", "rmsprop"]})
    assert "allows 'rmsprop'" in err and "adamw, adam, sgd" in err


def test_int_range_upper_end_checked():
    # randint's upper bound is exclusive: randint(1, 2) only samples 1, which is fine
    assert _errors({"batch_size": {"randint": [1, 2]}}) == []
    (err,) = _errors({"batch_size": {"randint": [0, 4]}})
    assert "allows 0" in err and "batch_size=0 must be >= 1" in err


def test_unsearchable_field():
    (err,) = _errors({"checkpoint_dir": ["/tmp/x"]})
    assert "'checkpoint_dir' cannot be searched" in err


def test_bad_preset():
    (err,) = _errors({"preset": ["baseline", "turbo"]})
    assert "['turbo'] are not presets" in err and "quick_prototype" in err
    (err,) = _errors({"preset": tune.uniform(0, 1)})
    assert "preset" in err and "choice or grid of preset names" in err


def test_model_params_checked_with_the_model_factory():
    seen = []

    def model_check(spec):
        seen.append(spec)
        return (
            []
            if isinstance(spec["hidden"], list)
            else [f"hidden={spec['hidden']!r} must be a list"]
        )

    (err,) = _errors({"model.hidden": [[8], 12]}, model_check=model_check)
    assert "model.hidden: choice([[8], 12]) allows 12, but hidden=12 must be a list" in err
    assert seen[0] == {"name": "mlp", "hidden": [8]}


def test_all_problems_collected():
    errors = _errors(
        {
            "learning_rat": [0.1],
            "batch_size": {"uniform": [8, 64]},
            "optimizer": ["rmsprop"],
        }
    )
    assert len(errors) == 3


def test_empty_space():
    assert spaces.check_space({}, BASE) == [
        "the search space is empty; give at least one field: domain"
    ]


# ---------------------------------------------------------------------- trial configs
def test_trial_config_applies_preset_then_fields_then_model():
    cfg = spaces.trial_config(
        BASE.replace(dataset="iris"),
        {"preset": "quick_prototype", "learning_rate": 0.02, "model.hidden": [8]},
    )
    assert cfg.lr_scheduler == "constant" and cfg.epochs == 3  # from the preset
    assert cfg.learning_rate == 0.02  # the sampled field wins over the preset
    assert cfg.model == {"name": "mlp", "hidden": [8]}  # model params merged
    assert cfg.dataset == "iris"  # the base's own fields kept


def test_epoch_bound():
    space = spaces.parse_space({"preset": ["quick_prototype", "production"]})
    assert spaces.epoch_bound(space, BASE) == 20
    assert spaces.epoch_bound(spaces.parse_space({"epochs": {"randint": [2, 9]}}), BASE) == 8
    assert spaces.epoch_bound(spaces.parse_space({"learning_rate": [0.1]}), BASE) == 6


def test_hardware_candidates_include_presets():
    space = spaces.parse_space({"preset": ["quick_prototype", "distributed"]})
    workers = sorted(c.num_workers for c in spaces.hardware_candidates(space, BASE))
    assert workers == [0, 4]


# ---------------------------------------------------------------------- metrics
def test_metric_must_be_reported():
    assert spaces.check_metric("val_loss", "min", "classification", True) == []
    assert spaces.check_metric("val_accuracy", "max", "classification", True) == []
    (err,) = spaces.check_metric("val_loss", "min", "classification", False)
    assert "no validation data" in err and "train_loss" in err
    (err,) = spaces.check_metric("val_accuracy", "max", "regression", True)
    assert "val_mae" in err
    (err,) = spaces.check_metric("val_loss", "lowest", "classification", True)
    assert "mode='lowest'" in err


# ---------------------------------------------------------------------- schedulers
def test_schedulers_by_name():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    asha = create_scheduler("asha", max_t=8, grace_period=1, reduction_factor=2)
    assert isinstance(asha, ASHAScheduler)
    assert isinstance(create_scheduler("median", max_t=8), MedianStoppingRule)
    assert isinstance(create_scheduler("fifo", max_t=8), FIFOScheduler)
    assert check_scheduler(asha) == []
    (err,) = check_scheduler("hyperband")
    assert "scheduler='hyperband' is not one of asha, median, fifo, pbt" in err
    assert check_scheduler("pbt") == []
    with pytest.raises(ConfigError, match="at least one searched hyperparameter"):
        create_scheduler("pbt", max_t=4)  # PBT needs a space to mutate


def test_plateau_stopper():
    from ray.tune.stopper import TrialPlateauStopper

    assert create_stopper(None, "val_loss", "min") is None
    assert isinstance(create_stopper(True, "val_loss", "min"), TrialPlateauStopper)
    assert isinstance(create_stopper({"std": 0.001}, "val_loss", "min"), TrialPlateauStopper)
    with pytest.raises(ConfigError, match="unknown options"):
        create_stopper({"patience": 3}, "val_loss", "min")


# ---------------------------------------------------------------------- search() input checks
@pytest.mark.parametrize(
    ("space", "kwargs", "message"),
    [
        ({"learnig_rate": [0.1]}, {}, "'learnig_rate' is not a TrainingConfig field"),
        ({"learning_rate": tune.uniform(-0.1, 0.1)}, {}, "learning_rate=-0.1 must be > 0"),
        ({"batch_size": tune.uniform(8, 32)}, {}, "samples floats"),
        ({"learning_rate": [0.1]}, {"metric": "val_f1"}, "metric='val_f1' is not reported"),
        ({"learning_rate": [0.1]}, {"metric": "val_mae"}, "trials report: train_loss"),
        ({"learning_rate": [0.1]}, {"scheduler": "pbt"}, "a population of at least 2 trials"),
        ({"learning_rate": [0.1]}, {"num_samples": 0}, "num_samples=0"),
        ({"model.hidden": [[8], "wide"]}, {}, "model.hidden"),
    ],
)
def test_search_rejects_bad_input_before_any_trial(tmp_path, space, kwargs, message):
    from kiln.tune import search

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        search(
            BASE,
            None,
            "iris",
            None,
            space,
            storage_path=tmp_path / "tune",
            db_path=tmp_path / "kiln.db",
            data_dir=tmp_path,
            **kwargs,
        )
    assert not (tmp_path / "tune").exists() or not any((tmp_path / "tune").iterdir())
    assert not (tmp_path / "kiln.db").exists()


def test_search_metric_without_validation_data(tmp_path):
    from kiln.tune import search

    with pytest.raises(ConfigError, match="there is no validation data"):
        search(
            BASE.replace(validation_split=0.0),
            None,
            "iris",
            None,
            {"learning_rate": [0.1]},
            storage_path=tmp_path / "tune",
            db_path=tmp_path / "kiln.db",
            data_dir=tmp_path,
        )
