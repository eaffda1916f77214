"""TaskSpec: what the model predicts, which decides loss, metrics, collation and export."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ConfigError


class TaskType(str, enum.Enum):
    """What a model predicts; each kind knows its default loss and collator.

    A ``str`` enum: ``TaskSpec.task_type`` stays a plain string in configs and JSON,
    and ``TaskType(spec.task_type)`` gives the behaviour.
    """

    CLASSIFICATION = "classification"
    IMAGE_CLASSIFICATION = "image_classification"
    REGRESSION = "regression"
    LANGUAGE_MODELING = "language_modeling"
    SEQUENCE_TO_SEQUENCE = "sequence_to_sequence"
    SEGMENTATION = "segmentation"

    @property
    def is_classification(self) -> bool:
        """One class per example (not per pixel or token)."""
        return self in (TaskType.CLASSIFICATION, TaskType.IMAGE_CLASSIFICATION)

    @property
    def default_loss(self) -> str:
        """The loss strategy name (``kiln.engine.loss``) used when the config names none."""
        return "classification" if self.is_classification else self.value

    @property
    def collator(self) -> str:
        """The name of the collator (``kiln.data.CollatorRegistry``) that batches this
        task's samples in plain torch DataLoaders: the one table of task -> collator."""
        return _COLLATORS[self]


_COLLATORS: dict[TaskType, str] = {
    TaskType.CLASSIFICATION: "classification",
    TaskType.IMAGE_CLASSIFICATION: "vision",
    TaskType.REGRESSION: "regression",
    TaskType.LANGUAGE_MODELING: "language_modeling",
    TaskType.SEQUENCE_TO_SEQUENCE: "sequence_to_sequence",
    TaskType.SEGMENTATION: "segmentation",
}
TASK_TYPES = tuple(t.value for t in TaskType)
MODALITIES = ("tabular", "text", "vision", "audio", "tokens")
# The collator name per task type, as plain strings (a view of TaskType.collator).
COLLATORS: dict[str, str] = {t.value: t.collator for t in TaskType}


@dataclass
class TaskSpec:
    """What is predicted, from which columns, with which shapes.

    ``task_type`` picks the default loss (``kiln.engine.loss.loss_for_task``) and the
    collator (:attr:`collator`). ``num_classes`` (classification, segmentation),
    ``num_outputs`` (regression) and ``vocab_size`` (language modeling, sequence to
    sequence) may be left None and filled in from the dataset.
    """

    name: str
    modality: str = "tabular"
    task_type: str = "classification"
    num_classes: int | None = None
    class_names: list[str] | None = None
    input_shape: tuple[int, ...] | None = None
    num_outputs: int | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = None
    preprocessing_config: dict[str, Any] = field(default_factory=dict)
    input_column: str = "x"
    label_column: str = "y"

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
        errors = []
        if not isinstance(self.name, str) or not self.name:
            errors.append(f"name={self.name!r} must be a non-empty string")
        if self.task_type not in TASK_TYPES:
            errors.append(f"task_type={self.task_type!r} is not one of {', '.join(TASK_TYPES)}")
        if self.modality not in MODALITIES:
            errors.append(f"modality={self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int) or self.num_classes < 2
        ):
            errors.append(f"num_classes={self.num_classes!r} must be an integer >= 2")
        if (
            self.class_names is not None
            and self.num_classes is not None
            and len(self.class_names) != self.num_classes
        ):
            errors.append(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes}"
            )
        if self.num_outputs is not None and self.num_outputs < 1:
            errors.append(f"num_outputs={self.num_outputs!r} must be >= 1")
        if errors:
            raise ConfigError(errors)
        if self.num_classes is None and self.class_names:
            self.num_classes = len(self.class_names)

    # factories ------------------------------------------------------------
    @classmethod
    def classification(
        cls,
        name: str = "classification",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        modality: str = "tabular",
        **kwargs: Any,
    ) -> TaskSpec:
        return cls(
            name=name,
            modality=modality,
            task_type="classification",
            num_classes=num_classes,
            class_names=class_names,
            **kwargs,
        )

    @classmethod
    def regression(cls, name: str = "regression", num_outputs: int = 1, **kwargs: Any) -> TaskSpec:
        kwargs.setdefault("modality", "tabular")
        return cls(name=name, task_type="regression", num_outputs=num_outputs, **kwargs)

    @classmethod
    def language_modeling(
        cls,
        name: str = "language_modeling",
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> TaskSpec:
        kwargs.setdefault("modality", "text")
        return cls(
            name=name,
            task_type="language_modeling",
            vocab_size=vocab_size,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @classmethod
    def vision_tiny(
        cls,
        name: str = "vision_tiny",
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        **kwargs: Any,
    ) -> TaskSpec:
        """A small image-classification task (MNIST-sized) for tests and demos."""
        return cls(
            name=name,
            modality="vision",
            task_type="image_classification",
            num_classes=num_classes,
            input_shape=input_shape,
            **kwargs,
        )

    @classmethod
    def sequence_to_sequence(
        cls,
        name: str = "sequence_to_sequence",
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> TaskSpec:
        """Token ids in, token ids out (translation, summarisation); loss per target token."""
        kwargs.setdefault("modality", "text")
        return cls(
            name=name,
            task_type="sequence_to_sequence",
            vocab_size=vocab_size,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @classmethod
    def segmentation(
        cls, name: str = "segmentation", num_classes: int | None = None, **kwargs: Any
    ) -> TaskSpec:
        """A class per pixel: logits ``[B, C, H, W]``, labels ``[B, H, W]``."""
        kwargs.setdefault("modality", "vision")
        return cls(name=name, task_type="segmentation", num_classes=num_classes, **kwargs)

    # helpers --------------------------------------------------------------
    @property
    def is_classification(self) -> bool:
        """One class per example (not per pixel or token)."""
        return TaskType(self.task_type).is_classification

    @property
    def collator(self) -> str:
        """The name of the collator for this task in ``kiln.data.CollatorRegistry``."""
        return TaskType(self.task_type).collator

    @property
    def output_dim(self) -> int | None:
        """Width of the model's last layer (channels, for segmentation) for this task."""
        if self.is_classification or self.task_type == "segmentation":
            return self.num_classes
        if self.task_type == "regression":
            return self.num_outputs
        return self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["input_shape"] is not None:
            d["input_shape"] = list(d["input_shape"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if "type" in data and "task_type" not in data:  # tolerate {type: classification} in YAML
            data["task_type"] = data.pop("type")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"task has unknown keys {unknown!r}; allowed: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TaskSpec:
        return dataclasses.replace(self, **changes)
