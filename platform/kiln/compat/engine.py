"""TrainingEngine: a dataset id and a layer list in, a TrainingSession out.

A thin facade over :class:`kiln.engine.trainer.Trainer`; it has no loop of its own.
``train()`` never raises: failures come back as ``status="failed"`` with a message
that names the problem and what would be valid.

    engine = TrainingEngine(dataset_id="iris", model_config={"layers": [...]})
    session = engine.train(model_id="iris_mlp_v1")
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from kiln.compat.callbacks import adapt_callback
from kiln.config import TrainingConfig
from kiln.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class TrainingMetrics:
    """One epoch of a session: training loss, accuracy (validation when present)."""

    epoch: int
    loss: float
    accuracy: float | None
    timestamp: datetime
    val_loss: float | None = None


@dataclass
class TrainingSession:
    """The record of one ``TrainingEngine.train`` call: status, timing, per-epoch metrics."""

    session_id: str
    model_id: str | None
    dataset_id: str
    status: str = "pending"  # "completed" or "failed" once train() returns
    start_time: datetime | None = None
    end_time: datetime | None = None
    total_epochs: int = 0
    current_epoch: int = 0
    metrics: list[TrainingMetrics] = field(default_factory=list)
    error_message: str | None = None
    checkpoint_path: str | None = None
    run_id: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_engine_config() -> TrainingConfig:
    """10 epochs of AdamW at 1e-2, batch 32: a sound default for small MLPs.

    (At 1e-3, 10 epochs of iris are ~50 optimizer steps, too few to leave chance level.)
    """
    return TrainingConfig(
        epochs=10,
        batch_size=32,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        weight_decay=0.0,
    )


class TrainingEngine:
    """Train a model described by ``model_config`` on a registered dataset.

    Args:
        dataset_id: a dataset id (``kiln datasets`` lists them) or a local file path.
        model_config: ``{"layers": [...]}`` (a layer list) or an architecture
            dict such as ``{"name": "mlp", "hidden": [64]}``.
        device: "cpu" or "cuda".
        training_config: hyperparameters; default :func:`default_engine_config`.
        callbacks: kiln ``CallbackBase`` / ``TrainingHooks`` objects, or trainer-first
            :class:`~kiln.compat.callbacks.TrainingCallback` objects, run inside the loop.
    """

    def __init__(
        self,
        dataset_id: str,
        model_config: dict[str, Any],
        device: str = "cpu",
        training_config: TrainingConfig | None = None,
        callbacks: list[Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        self.dataset_id = dataset_id
        self.model_config = model_config
        self.device = device
        self.training_config = training_config or default_engine_config()
        self.callbacks = [adapt_callback(cb, self.training_config) for cb in callbacks or []]
        self.trainer_kwargs = trainer_kwargs
        self.trainer: Any = None  # the kiln Trainer of the last train() call

    def train(self, model_id: str | None = None, resume_from: str | None = None) -> TrainingSession:
        """Train and return the session; failures are reported, never raised.

        Args:
            model_id: registers the best checkpoint under this name (and names the run).
            resume_from: ``"latest"``, ``"best"`` or a checkpoint path to continue from;
                the session's metrics then include the epochs trained before.
        """
        from kiln.engine.trainer import Trainer

        session = TrainingSession(
            session_id=str(uuid.uuid4()),
            model_id=model_id,
            dataset_id=self.dataset_id,
            status="running",
            start_time=datetime.now(),
            total_epochs=self.training_config.epochs,
        )
        try:
            if not isinstance(self.model_config, dict):
                raise ConfigError(
                    f"model_config must be a dict with a 'layers' list, got {type(self.model_config).__name__}"
                )
            cfg = self.training_config.replace(
                dataset=self.dataset_id,
                model=dict(self.model_config),
                register_as=model_id or self.training_config.register_as,
                run_name=self.training_config.run_name or model_id,
            )
            self.trainer = Trainer(
                training_config=cfg, hooks=self.callbacks, device=self.device, **self.trainer_kwargs
            )
            results = self.trainer.train(resume_from=resume_from)
        except Exception as exc:  # the session carries the failure
            logger.debug("training session failed", exc_info=True)
            session.status = "failed"
            session.error_message = f"{type(exc).__name__}: {exc}"
            session.end_time = datetime.now()
            return session
        for row in results["history"]:
            session.metrics.append(
                TrainingMetrics(
                    epoch=row["epoch"],
                    loss=row["train_loss"],
                    accuracy=row.get("val_accuracy", row.get("train_accuracy")),
                    timestamp=datetime.fromtimestamp(row["timestamp"]),
                    val_loss=row.get("val_loss"),
                )
            )
        session.current_epoch = results["history"][-1]["epoch"] if results["history"] else 0
        session.status = "completed"
        session.end_time = datetime.now()
        session.checkpoint_path = results["checkpoint_path"]
        session.run_id = results.get("run_id")
        if model_id is None:
            session.model_id = results.get("model_id")
        return session
