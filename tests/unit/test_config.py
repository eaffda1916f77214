"""TrainingConfig validation and round trips, the builder's presets and groups, TaskSpec."""

from __future__ import annotations

import json

import pytest
import yaml

from kiln.config import PRESETS, TaskSpec, TrainingConfig, TrainingConfigBuilder, get_preset
from kiln.errors import ConfigError


# ---------------------------------------------------------------------- validate()
def test_defaults_are_valid_and_match_the_spec():
    cfg = TrainingConfig().validate()
    assert cfg.random_seed == 42
    assert cfg.learning_rate == 5e-5
    assert cfg.batch_size == 4
    assert cfg.epochs == 10
    assert cfg.optimizer == "adamw"
    assert cfg.lr_scheduler == "cosine"
    assert cfg.num_workers == 0
    assert cfg.keep_best_k == 3
    assert cfg.keep_last_n == 2
    assert cfg.monitor == "val_loss"
    assert cfg.mode == "min"
    assert cfg.max_grad_norm == 1.0


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("learning_rate", 0.0, "> 0"),
        ("batch_size", 0, ">= 1"),
        ("epochs", -1, ">= 1"),
        ("warmup_ratio", 1.5, "[0, 1)"),
        ("validation_split", 1.0, "[0, 1)"),
        ("optimizer", "lamb", "adamw, adam, sgd"),
        ("lr_scheduler", "step", "constant, linear, cosine"),
        ("mode", "avg", "'min' or 'max'"),
        ("num_workers", -2, ">= 0"),
        ("keep_last_n", 0, ">= 1"),
        ("gradient_accumulation_steps", 0, ">= 1"),
        ("max_grad_norm", -1.0, "> 0"),
        ("data_backend", "disk", "auto, ray, memory"),
        ("amp_dtype", "fp8", "auto, bf16, fp16"),
        ("report_interval_s", -0.5, ">= 0 seconds"),
        ("report_interval_s", "often", "finite number or null"),
    ],
)
def test_validate_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        TrainingConfig(**{field: value}).validate()
    message = str(info.value)
    assert field in message
    assert repr(value) in message
    assert allowed in message
    assert isinstance(info.value, ValueError)


def test_validate_type_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        TrainingConfig(epochs="ten", use_amp="yes").validate()
    assert info.value.errors == [
        "epochs='ten' must be an integer",
        "use_amp='yes' must be true or false",
    ]


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="batch_size=True must be an integer"):
        TrainingConfig(batch_size=True).validate()


def test_validate_collects_every_error():
    with pytest.raises(ConfigError) as info:
        TrainingConfig(learning_rate=-1.0, batch_size=0, optimizer="lamb", mode="up").validate()
    errors = info.value.errors
    assert len(errors) == 4
    assert [e.split("=")[0] for e in errors] == ["learning_rate", "batch_size", "optimizer", "mode"]
    assert "4 configuration errors" in str(info.value)


def test_fp16_amp_needs_a_gpu():
    with pytest.raises(ConfigError, match="fp16.*use_gpu"):
        TrainingConfig(use_amp=True, amp_dtype="fp16").validate()
    TrainingConfig(use_amp=True, amp_dtype="fp16", use_gpu=True).validate()


def test_replace_validates_and_rejects_unknown_names():
    cfg = TrainingConfig()
    assert cfg.replace(epochs=3).epochs == 3
    assert cfg.epochs == 10  # the original is untouched
    with pytest.raises(ConfigError, match="epochs=0"):
        cfg.replace(epochs=0)
    with pytest.raises(ConfigError, match="'epoch' is not a TrainingConfig field"):
        cfg.replace(epoch=3)


# ---------------------------------------------------------------------- from_dict / files
def test_from_dict_unknown_keys_suggest_close_fields():
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict({"learning_rat": 0.1, "batchsize": 8, "epochs": 2})
    errors = info.value.errors
    assert len(errors) == 2
    assert "'learning_rat' is not a TrainingConfig field" in errors[0]
    assert "Did you mean 'learning_rate'" in errors[0]
    assert "Did you mean 'batch_size'" in errors[1]


def test_from_dict_reports_unknown_keys_and_invalid_values_together():
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict({"epochz": 2, "epochs": 0, "optimizer": "lamb"})
    errors = info.value.errors
    assert len(errors) == 3
    assert "Did you mean 'epochs'" in errors[0]
    assert errors[1:] == [
        "epochs=0 must be >= 1",
        "optimizer='lamb' is not one of adamw, adam, sgd",
    ]


def test_from_dict_rejects_a_non_mapping_and_validates():
    with pytest.raises(ConfigError, match="must be a mapping"):
        TrainingConfig.from_dict([("epochs", 1)])
    with pytest.raises(ConfigError, match="epochs=0"):
        TrainingConfig.from_dict({"epochs": 0})


def _custom() -> TrainingConfig:
    return TrainingConfig(
        epochs=7,
        learning_rate=3e-3,
        max_grad_norm=None,
        optimizer="sgd",
        early_stopping_patience=2,
        model={"name": "mlp", "hidden": [64, 32]},
        export_formats=["onnx"],
        notes="round trip",
    )


def test_to_dict_is_json_and_round_trips():
    cfg = _custom()
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["model"] == {"name": "mlp", "hidden": [64, 32]}
    assert TrainingConfig.from_dict(data) == cfg


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = _custom()
    path = cfg.save(tmp_path / "sub" / f"run{suffix}")
    text = path.read_text()
    parsed = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert parsed["epochs"] == 7
    if suffix != ".json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    assert TrainingConfig.load(path) == cfg


def test_yaml_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-3\nweight_decay: 5E-4\nepochs: 2\nrun_name: 1e3x\n")
    cfg = TrainingConfig.load(path)
    assert cfg.learning_rate == 1e-3
    assert cfg.weight_decay == 5e-4
    assert cfg.run_name == "1e3x"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainingConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid yaml") as info:
        TrainingConfig.load(bad)
    assert "\n" not in str(info.value)  # one line, with the position
    assert "line 2, column 1" in str(info.value)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"epochs": 1,}')
    with pytest.raises(ConfigError, match="bad.json.*not valid json.*line 1"):
        TrainingConfig.load(bad_json)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TrainingConfig.load(scalar)


# ---------------------------------------------------------------------- builder
def test_presets_are_valid_and_distinct():
    built = {name: TrainingConfigBuilder.from_preset(name).build() for name in PRESETS}
    assert set(built) == {"quick_prototype", "baseline", "production", "distributed", "low_memory"}
    assert len({json.dumps(c.to_dict(), sort_keys=True) for c in built.values()}) == 5


def test_quick_prototype_preset():
    cfg = TrainingConfigBuilder.quick_prototype().build()
    assert cfg.epochs == 3
    assert cfg.learning_rate == 1e-3
    assert cfg.warmup_ratio == 0.0


def test_baseline_and_production_presets():
    base = TrainingConfigBuilder.baseline().build()
    assert base.epochs == 10
    assert base.lr_scheduler == "cosine"
    assert base.warmup_ratio > 0
    prod = TrainingConfigBuilder.production().build()
    assert prod.epochs > base.epochs
    assert prod.use_amp is True
    assert prod.early_stopping_patience is not None


def test_distributed_preset():
    cfg = TrainingConfigBuilder.distributed().build()
    assert cfg.num_workers == 4
    assert cfg.use_gpu is True


def test_low_memory_preset_is_batch_2_with_8x_accumulation():
    cfg = TrainingConfigBuilder.low_memory().build()
    assert cfg.batch_size == 2
    assert cfg.gradient_accumulation_steps == 8


def test_get_preset_unknown_lists_known():
    with pytest.raises(ConfigError) as info:
        get_preset("huge")
    assert "'huge'" in str(info.value)
    for name in PRESETS:
        assert name in str(info.value)


def test_builder_chain_sets_each_group():
    cfg = (
        TrainingConfigBuilder.quick_prototype()
        .with_training(epochs=5, batch_size=32)
        .with_optimizer(optimizer="sgd", gradient_accumulation_steps=2)
        .with_hardware(num_workers=2)
        .with_logging(run_name="r1", tracking=False)
        .with_model(name="mlp", hidden=[16])
        .build()
    )
    assert (cfg.epochs, cfg.batch_size) == (5, 32)
    assert (cfg.optimizer, cfg.gradient_accumulation_steps) == ("sgd", 2)
    assert cfg.num_workers == 2
    assert (cfg.run_name, cfg.tracking) == ("r1", False)
    assert cfg.model == {"name": "mlp", "hidden": [16]}
    assert cfg.learning_rate == 1e-3  # the preset survives


def test_with_group_rejects_fields_of_other_groups():
    with pytest.raises(ConfigError) as info:
        TrainingConfigBuilder().with_training(optimizer="sgd", num_workers=2)
    errors = info.value.errors
    assert len(errors) == 2
    assert "with_training() got 'optimizer'; it is set by with_optimizer()" in errors[0]
    assert "set by with_hardware()" in errors[1]
    assert "epochs" in errors[0]  # lists what it accepts


def test_with_hardware_seed_spellings():
    cfg = TrainingConfigBuilder().with_hardware(devices=2, precision="bf16-mixed").build()
    assert cfg.num_workers == 2
    assert (cfg.use_amp, cfg.amp_dtype) == (True, "bf16")
    assert TrainingConfigBuilder().with_hardware(devices=1).build().num_workers == 0
    with pytest.raises(ConfigError, match="precision='8-bit'"):
        TrainingConfigBuilder().with_hardware(precision="8-bit")


def test_build_validates():
    builder = TrainingConfigBuilder().with_training(epochs=0, batch_size=0)
    with pytest.raises(ConfigError) as info:
        builder.build()
    assert len(info.value.errors) == 2


# ---------------------------------------------------------------------- TaskSpec
def test_taskspec_factories():
    clf = TaskSpec.classification(name="iris", num_classes=3, class_names=["a", "b", "c"])
    assert (clf.task_type, clf.num_classes, clf.is_classification) == ("classification", 3, True)
    assert clf.output_dim == 3
    reg = TaskSpec.regression(name="house", num_outputs=2)
    assert (reg.task_type, reg.num_outputs, reg.output_dim) == ("regression", 2, 2)
    assert not reg.is_classification
    lm = TaskSpec.language_modeling(name="lm", vocab_size=100, pad_token_id=0)
    assert (lm.task_type, lm.modality, lm.output_dim) == ("language_modeling", "text", 100)
    vis = TaskSpec.vision_tiny()
    assert vis.task_type == "image_classification"
    assert vis.input_shape == (1, 28, 28)
    assert vis.num_classes == 10
    assert vis.is_classification


def test_taskspec_class_names_imply_num_classes():
    assert TaskSpec.classification(class_names=["x", "y"]).num_classes == 2


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"name": ""}, "name=''"),
        ({"name": "t", "task_type": "ranking"}, "task_type='ranking' is not one of"),
        ({"name": "t", "modality": "smell"}, "modality='smell' is not one of"),
        ({"name": "t", "num_classes": 1}, "num_classes=1 must be an integer >= 2"),
        ({"name": "t", "num_classes": 3, "class_names": ["a"]}, "class_names has 1 names"),
        ({"name": "t", "task_type": "regression", "num_outputs": 0}, "num_outputs=0"),
    ],
)
def test_taskspec_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        TaskSpec(**kwargs)


def test_taskspec_validation_collects_errors():
    with pytest.raises(ConfigError) as info:
        TaskSpec(name="t", task_type="ranking", modality="smell")
    assert len(info.value.errors) == 2


def test_taskspec_dict_round_trip():
    spec = TaskSpec.vision_tiny(name="mnist", class_names=[str(i) for i in range(10)])
    data = spec.to_dict()
    assert data["input_shape"] == [1, 28, 28]
    assert json.loads(json.dumps(data)) == data
    assert TaskSpec.from_dict(data) == spec
    assert TaskSpec.from_dict({"name": "t", "type": "regression"}).task_type == "regression"
    with pytest.raises(ConfigError, match="unknown keys.*'classes'"):
        TaskSpec.from_dict({"name": "t", "classes": 3})
