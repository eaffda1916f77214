"""kiln's exceptions: one base class, specific subclasses.

Every exception here pickles (it may cross Ray processes), and its message says
what was wrong, the value that was given, and what is allowed. Lookup errors
subclass ``KeyError`` as well, so ``except KeyError`` keeps working, but print
their message without KeyError's quoting.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "KilnError",
    "ConfigError",
    "DatasetError",
    "DatasetNotFoundError",
    "ModelConfigError",
    "CheckpointError",
    "CheckpointWriteError",
    "WorkerDiedError",
    "NotFoundError",
    "RunNotFoundError",
    "ModelNotFoundError",
    "IntegrityError",
    "TrainingFailedError",
    "RequestError",
    "StoreError",
    "RegistryError",
    "ArtifactPathError",
    "ExportError",
    "GradientExplosionError",
    "DriftError",
    "JobNotFoundError",
    "JobStateError",
    "LeaseLostError",
    "PortInUseError",
    "ScheduleNotFoundError",
]


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (self.__class__, (self.message,))


class ConfigError(KilnError, ValueError):
    """A configuration has one or more invalid fields.

    ``errors`` holds one line per problem; all are collected before raising.
    """

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} configuration errors:\n" + "\n".join(
                f"  - {e}" for e in self.errors
            )
        super().__init__(message)

    def __reduce__(self):
        return (self.__class__, (self.errors,))


class DatasetError(KilnError, ValueError):
    """Data that cannot be used as given (missing files, wrong shapes, bad columns)."""


class ModelConfigError(KilnError, ValueError):
    """A model description that cannot be built or does not fit the data."""


class CheckpointError(KilnError):
    """A checkpoint that is missing, incomplete or cannot be loaded."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (disk full, say); nothing of it was kept."""


class WorkerDiedError(KilnError, RuntimeError):
    """A training worker process died (kill -9, the OOM killer) with no restarts left."""


class IntegrityError(KilnError):
    """Stored bytes whose sha256 does not match the recorded one."""


class TrainingFailedError(KilnError):
    """A training run that ended with an error inside the training loop (e.g. a Tune trial
    of an LLM fine-tune whose job reported failure)."""


class RequestError(KilnError):
    """A request a server answers with ``status`` and ``message`` instead of a result."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    def __reduce__(self):
        return (self.__class__, (self.status, self.message))


class StoreError(KilnError):
    """A store file that cannot be opened, migrated or used."""


class RegistryError(KilnError, ValueError):
    """A registry request that is not allowed (bad name or version, retired model...)."""


class ArtifactPathError(KilnError, ValueError):
    """A path that should lie inside the artifact store but does not."""


class ExportError(KilnError):
    """A model that could not be exported, or whose export does not match PyTorch."""


class GradientExplosionError(KilnError):
    """A gradient norm above the critical threshold (or NaN/inf) with ``raise_on_critical``."""


class DriftError(KilnError, ValueError):
    """Data or profiles that cannot be compared for drift (other features, bins, shapes)."""


class NotFoundError(KilnError, KeyError):
    """A lookup by id, name, version or tag that matched nothing."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class DatasetNotFoundError(NotFoundError):
    """An unknown dataset id."""


class RunNotFoundError(NotFoundError):
    """An unknown experiment run id or name."""


class ModelNotFoundError(NotFoundError):
    """An unknown model id, name, version or tag in the registry."""


class JobNotFoundError(NotFoundError):
    """An unknown job id in the job queue."""


class ScheduleNotFoundError(NotFoundError):
    """An unknown schedule id or name."""


class JobStateError(KilnError, ValueError):
    """A queue request that the job's (or schedule's) current state does not allow."""


class LeaseLostError(KilnError, RuntimeError):
    """A worker reported on a job it no longer holds (its lease expired or was cancelled).

    The report is refused and changes nothing; another attempt owns the job now.
    """


class PortInUseError(KilnError, OSError):
    """A port a server needs is already bound by another process (named in the message)."""

    def __str__(self) -> str:  # OSError would format its args
        return self.message
