"""The one place kiln starts or joins Ray, and decides how loud Ray is.

Ray's console level is ``KILN_LOG_LEVEL`` (``WARNING`` unless set; the CLI's
``--verbose`` sets ``INFO``, ``--quiet`` sets ``ERROR``), read here and nowhere else.
At ``WARNING`` kiln keeps off the console what Ray prints on every normal run:

- ``ray.train`` INFO lines in the controller and the workers ("Reporting training
  result ...: TrainingReport(...)", "Requesting resources", "Moving model to device")
  through Ray Train's own ``RunConfig(logging_config=...)``;
- ``ray.data`` INFO lines in the workers ("Dataset ... execution finished") and the
  "Progress bars disabled" notice kiln itself causes;
- the "PlacementGroupCleaner: Failed to query Ray Train Controller actor state"
  warning, once a second for the whole run (or, with a second Ray on the machine, an
  uncaught "Found multiple active Ray instances" traceback). Ray Train's
  placement-group cleaner asks the state API whether the controller lives; the state
  API is served by the dashboard, and a Ray that kiln starts has none (it costs ~9 s
  of start-up). Without it the cleaner can never see the controller die, so it can
  never clean anything: :func:`torch_trainer_class` leaves it out on such a Ray.

The console level travels to Ray's processes without a job ``runtime_env`` on a Ray
that kiln starts (they inherit this process's environment; a runtime_env measured
~3 s more to the first actors on 2 cores), and in the job's ``runtime_env`` on a
cluster that kiln joins.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

LOG_LEVEL_ENV = "KILN_LOG_LEVEL"
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"  # the dashboard's Train view

# Loggers that say nothing a kiln user acts on, at any level below ERROR.
_NOISY = (
    "ray.data._internal.progress",  # "Progress bars disabled": kiln disabled them
    "ray._private.authentication.authentication_token_setup",  # every local start
)
# Ray Train V2 logs "Reporting training result N: TrainingReport(...)" at INFO through
# logging.getLogger(__file__): a logger named by the file's path, outside "ray.train".
_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"

# Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default) and each ray.train.report waits for that poll: up to 2 s per epoch. Polling
# much faster steals CPU from the workers (measured on 2 cores: 0.1 s made epochs ~25%
# slower than 0.25 s), so kiln uses 0.25 s unless the user sets the variable.
DEFAULT_REPORT_POLL_S = "0.25"

# Set by ensure_ray: the dashboard of the Ray kiln started or joined (None: none known).
_dashboard_url: str | None = None
_started_locally = False


def log_level() -> str:
    """Ray's console level: ``$KILN_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR), else WARNING."""
    wanted = os.environ.get(LOG_LEVEL_ENV, "WARNING").upper()
    return wanted if isinstance(logging.getLevelName(wanted), int) else "WARNING"


def ensure_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Join ``address`` / $RAY_ADDRESS / a cluster from ``ray start``, else start a local Ray.

    A Ray that kiln starts itself has no dashboard unless asked (the dashboard adds
    about 9 s to start-up on 2 cores); run ``ray start --head`` for a long-lived
    cluster with the dashboard and kiln joins it.
    """
    global _dashboard_url, _started_locally
    import ray

    level = log_level()
    quiet_ray_logs(level)  # before ray.init, which logs on start
    if not ray.is_initialized():
        os.environ[LOG_LEVEL_ENV] = level  # a Ray started here: its processes inherit it
        if dashboard:  # the Train view of a local Ray with a dashboard (inherited too)
            os.environ.setdefault(STATE_TRACKING_ENV, "1")
        joining = bool(address or os.environ.get("RAY_ADDRESS"))
        options: dict[str, Any] = {"logging_level": level}
        if joining:
            options["runtime_env"] = _cluster_runtime_env(level)
        try:
            ctx = ray.init(address=address, include_dashboard=dashboard, **options)
            _started_locally = not joining
        except ValueError as exc:  # joining an existing cluster: it owns its dashboard
            if "include_dashboard" not in str(exc):
                raise
            ctx = ray.init(
                address=address,
                logging_level=level,  # type: ignore[arg-type]  # Ray takes names too
                runtime_env=_cluster_runtime_env(level),
            )
        url = getattr(ctx, "dashboard_url", None)
        if url:  # where to watch jobs and Train runs (stderr: stdout may be a data pipe)
            _dashboard_url = url if url.startswith("http") else f"http://{url}"
            if level != "ERROR":
                print(f"kiln: Ray dashboard at {_dashboard_url}", file=sys.stderr, flush=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_logs(level)


def quiet_ray_logs(level: str | None = None) -> None:
    """This process's Ray loggers at ``level`` (default :func:`log_level`); the noisy
    ones at ERROR unless the level is INFO or below. Runs in the driver and, from the
    worker loop, in each Ray Train worker."""
    level = level or log_level()
    numeric = logging.getLevelName(level)
    for name in ("ray.train", "ray.tune", "ray.data", *_path_loggers()):
        logger = logging.getLogger(name)
        # quieter only: a level the user's own code set higher stays (INFO asks for more)
        if numeric <= logging.INFO or logger.level == logging.NOTSET or logger.level < numeric:
            logger.setLevel(numeric)
    for name in _NOISY:
        logging.getLogger(name).setLevel(_noisy_level(numeric))
    if numeric > logging.INFO:  # Ray Data's batches from read-only object-store memory
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")


def _noisy_level(numeric: int) -> int:
    """ERROR for the noisy loggers, unless Ray's logs were asked for (INFO or below)."""
    return numeric if numeric <= logging.INFO else max(numeric, logging.ERROR)


def _path_loggers() -> list[str]:
    """Names of Ray loggers named by their file's path (found without importing them)."""
    import importlib.util

    spec = importlib.util.find_spec("ray")  # ray itself only: ray.train is not imported
    if spec is None or not spec.submodule_search_locations:
        return []
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    return [os.path.join(root, *_REPORT_LOGGER_MODULE.split(".")) + ".py"]


def train_logging_config() -> Any:
    """Ray Train's console level for its controller and workers (``ray.train`` logs)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=log_level())


def prepare_train_driver(num_workers: int) -> None:
    """Environment Ray Train reads in the driver when ``TorchTrainer.fit()`` starts its
    controller (and propagates to the controller and workers); the user's own values win.

    - ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: ``DEFAULT_REPORT_POLL_S`` (see there).
    - ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train would also log every print() of a
      worker, so each line would reach the driver twice.
    - ``RAY_TRAIN_ENABLE_STATE_TRACKING=1`` when the Ray has a dashboard: the run then
      shows in the dashboard's Train view (Ray Train V2 reads it in the driver at
      ``fit()``; without a dashboard its state actor could not be queried anyway).
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` on a Ray that kiln started on this
      machine: nothing preempts it, and the watcher's start logs a core_worker error.
    """
    if num_workers <= 0:  # local mode: no controller, nothing reads these
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", DEFAULT_REPORT_POLL_S)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if has_dashboard():
        os.environ.setdefault(STATE_TRACKING_ENV, "1")
    if _started_locally:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def has_dashboard() -> bool:
    """True when the connected Ray serves a dashboard (kiln started or joined it)."""
    if _dashboard_url:
        return True
    try:  # a Ray started before kiln (a script's own ray.init): ask the node
        import ray

        node = ray._private.worker._global_node
        return bool(ray.is_initialized() and node is not None and node.webui_url)
    except Exception:  # an internal attribute: no dashboard known
        return False


def _cluster_runtime_env(level: str) -> dict[str, Any]:
    """What every process of this job gets on a cluster kiln joins: kiln's console level
    and Train state tracking (Trainers run inside Tune trials too, not only here)."""
    return {"env_vars": {LOG_LEVEL_ENV: level, STATE_TRACKING_ENV: "1"}}


def torch_trainer_class() -> Any:
    """Ray Train's ``TorchTrainer``, less its placement-group cleaner on a Ray without a
    dashboard, where the cleaner can only warn every second (see the module docstring)."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:  # another Ray: its own callbacks, as they are
        return TorchTrainer

    class KilnTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]
            if has_dashboard():
                return callbacks
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return KilnTorchTrainer


class ProgressMailbox:
    """The Ray actor that carries rank 0's progress events to the driver
    (:func:`kiln.engine.progress.relay_progress`). It lives here, in a module that
    imports nothing heavy, so its process starts without torch.

    It keeps every epoch event and only the newest step event (per Tune trial): a
    display that falls behind skips steps, never epochs.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        last = self.events[-1] if self.events else {}
        if event.get("kind") == "step" and (last.get("kind"), last.get("trial")) == (
            "step",
            event.get("trial"),
        ):
            self.events[-1] = event
        else:
            self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def flush(self) -> bool:
        return True
