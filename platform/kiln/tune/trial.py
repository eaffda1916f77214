"""The trial side of a search: what runs inside each Ray Tune trial actor.

``run_trial`` is Tune's function trainable: one kiln :class:`~kiln.engine.trainer.Trainer`
run with the trial's sampled config, reporting each epoch to Tune (in-process) or
through Ray Train's ``TuneReportCallback`` (worker actors). Trials never write the
database; the driver records them after the search (:mod:`kiln.tune._record`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import TaskSpec, TrainingConfig
from kiln.tune import spaces

__all__ = [
    "RESTORES_FILE",
    "TRIALS_DIR",
    "TrialResources",
    "TrialSetup",
    "run_trial",
    "trial_resources",
]

TRIALS_DIR = "kiln_trials"
#: Per trial, one JSON line per restart from another trial's checkpoint (PBT exploits).
RESTORES_FILE = "restores.jsonl"


@dataclass
class TrialSetup:
    """The picklable part every trial shares (the data travels separately, via ray.put)."""

    base: TrainingConfig
    task: TaskSpec
    trials_dir: str
    metric: str
    mode: str
    data_dir: str | None = None
    hooks: list[Any] = field(default_factory=list)
    report_checkpoints: bool = False  # PBT: trials hand Tune every epoch's checkpoint
    metrics: Any = None  # search(metrics=...): a kiln.engine.custom_metrics.MetricSet

    def config_for(self, params: Mapping[str, Any], trial_id: str) -> TrainingConfig:
        """The trial's config: sampled params on the base, plus kiln's per-trial settings."""
        cfg = spaces.trial_config(self.base, params)
        ranked = self.metric.startswith(("train_", "val_"))
        return cfg.replace(
            tracking=False,
            register_as=None,
            export_formats=[],
            run_name=trial_id,
            report_to=[],  # the driver records trials after the search
            checkpoint_dir=str(Path(self.trials_dir) / trial_id / "checkpoints"),
            monitor=self.metric if ranked else cfg.monitor,
            mode=self.mode if ranked else cfg.mode,
        )


def run_trial(
    params: dict[str, Any],
    *,
    setup: TrialSetup,
    train_data: Any = None,
    val_data: Any = None,
    model: Any = None,
) -> None:
    """Tune function trainable: one kiln Trainer run with this trial's config."""
    from ray import tune

    from kiln.engine.trainer import Trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = setup.config_for(params, trial_id)
    callbacks = []
    if cfg.num_workers > 0:  # Ray Train workers report through Train; forward to Tune
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
        if cfg.report_interval_s is None:  # schedulers decide on every epoch's report
            cfg = cfg.replace(report_interval_s=0.0)
    trainer = Trainer(
        model=model,
        training_config=cfg,
        task_spec=setup.task,
        hooks=list(setup.hooks),
        storage_path=Path(setup.trials_dir) / trial_id,
        data_dir=setup.data_dir,
        ray_callbacks=callbacks,
        report_checkpoints=setup.report_checkpoints,
        verbose=False,  # Tune's own reporter shows trials; a line per epoch per trial is noise
        metrics=setup.metrics,
    )
    checkpoint = tune.get_checkpoint() if setup.report_checkpoints else None
    if checkpoint is None:  # without one the Trainer resumes from this trial's own latest
        trainer.train(train_data, val_data)
        return
    with checkpoint.as_directory() as path:  # PBT's exploit, a pause, or a resumed search
        from kiln.engine.checkpoint_reader import read_metadata

        meta = read_metadata(path)
        _note_restore(Path(setup.trials_dir) / trial_id, trial_id, meta)
        epoch = int(meta.get("epoch", 0))
        if epoch >= cfg.epochs:  # a donor's final checkpoint: nothing is left to train
            tune.report({**meta.get("metrics", {}), "epoch": epoch})
            return
        trainer.train(train_data, val_data, resume_from=str(path))


def _note_restore(trial_dir: Path, trial_id: str, meta: Mapping[str, Any]) -> None:
    """Append a restore from another trial's checkpoint to the trial's restores file."""
    donor = (meta.get("user", {}).get("training_config") or {}).get("run_name")
    if donor and donor != trial_id:
        trial_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"from_trial": donor, "epoch": int(meta.get("epoch", 0))})
        with open(trial_dir / RESTORES_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class TrialResources:
    """Resources of one trial from its config (Tune calls this with the sampled params)."""

    def __init__(self, base: TrainingConfig, override: Mapping[str, float] | None) -> None:
        self.base, self.override = base, dict(override) if override else None

    def __call__(self, params: Mapping[str, Any]) -> dict[str, float]:
        return trial_resources(spaces.trial_config(self.base, params), self.override)


def trial_resources(cfg: TrainingConfig, override: Mapping[str, float] | None) -> dict[str, float]:
    """What the trial actor reserves. In-process trials hold the CPUs (and GPU) they train
    on; with num_workers>=1 the trial only drives Ray Train, whose workers reserve their own."""
    if override:
        return {
            k.upper() if k.lower() in ("cpu", "gpu") else k: float(v) for k, v in override.items()
        }
    if cfg.num_workers == 0:
        return {"CPU": float(cfg.cpus_per_worker or 1), "GPU": 1.0 if cfg.use_gpu else 0.0}
    return {"CPU": 0, "memory": 1}  # Ray Train reserves the workers; the trial only drives
