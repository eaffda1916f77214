"""Training progress: what rank 0 of a run says while it trains, and how it reaches you.

``Trainer(verbose=True)`` (the default) adds an :class:`EpochProgress` hook to a run.
On rank 0 it produces two kinds of events (plain dicts):

- ``step``: epoch, step within the epoch (and the epoch's step count), the batch loss,
  steps/s and the run's ETA, at most every ``interval_s`` (0.25 s): a clock read per
  batch is all it costs the loop;
- ``epoch``: the epoch's train/val metrics and its duration, with the plain line::

    epoch   3/30  train_loss 0.1370  train_accuracy 96.52%  val_loss 0.1046  ...  (0.05 s)

Events go to :func:`publish` in the driver process. When the loop runs in the driver
(``num_workers=0``) the hook calls it directly; when it runs in Ray Train worker
actors, :func:`relay_progress` (around ``TorchTrainer.fit()``) gives the hook a small
Ray actor to post to and pumps that mailbox into :func:`publish` from a driver thread.
``publish`` hands each event to the listeners a program registered (``kiln train``'s
live display on a terminal); with none, epoch lines go to the ``kiln.progress`` logger.
Sinks (:func:`add_sink`: the run's live TensorBoard file) get every event as well but
are not a display: the epoch lines are still logged beside them. A ``quiet`` hook's
events (one kiln adds for a sink when ``verbose=False``) go to sinks only.

That logger gets its own plain handler (stdout, the message alone) unless it already
has one, so a user's logging setup is left alone: silence it with ``verbose=False``
or ``logging.getLogger("kiln.progress").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from kiln.engine.callbacks import CallbackBase

__all__ = [
    "EpochProgress",
    "add_listener",
    "add_sink",
    "count_batches",
    "format_metric",
    "progress_mailbox",
    "publish",
    "relay_progress",
    "remove_listener",
    "remove_sink",
]

LOGGER_NAME = "kiln.progress"
# Step events at most this often (per run): enough for a live display, and the relay
# actor then handles a few small calls a second.
DEFAULT_INTERVAL_S = 0.25

Event = dict[str, Any]
_listeners: list[Callable[[Event], None]] = []  # displays
_sinks: list[Callable[[Event], None]] = []  # recorders of events (not a display)
_listeners_lock = threading.Lock()


def format_metric(key: str, value: Any) -> str:
    """Accuracy-like values as percentages, other floats to 4 decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2%}" if "accuracy" in key else f"{value:.4f}"
    return str(value)


def progress_logger() -> logging.Logger:
    """The ``kiln.progress`` logger, with a plain stdout handler when it has none."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def epoch_line(epoch: int, epochs: int, metrics: dict[str, Any]) -> str:
    """``epoch   3/30  train_loss 0.1370  ...  (0.05 s)``: train_/val_ floats and the time."""
    shown = "  ".join(
        f"{k} {format_metric(k, v)}"
        for k, v in metrics.items()
        if k.startswith(("train_", "val_")) and isinstance(v, float)
    )
    seconds = metrics.get("epoch_duration_seconds", 0.0)
    return f"epoch {epoch:>3}/{epochs}  {shown}  ({seconds:.2f} s)"


# ---------------------------------------------------------------------- driver side
def add_listener(listener: Callable[[Event], None]) -> None:
    """Send every progress event of this process's runs to ``listener(event)``."""
    with _listeners_lock:
        _listeners.append(listener)


def remove_listener(listener: Callable[[Event], None]) -> None:
    with _listeners_lock:
        if listener in _listeners:
            _listeners.remove(listener)


def add_sink(sink: Callable[[Event], None]) -> None:
    """Send every progress event of this process's runs to ``sink(event)`` too, without
    standing in for the console (a listener is a display; a sink records)."""
    with _listeners_lock:
        _sinks.append(sink)


def remove_sink(sink: Callable[[Event], None]) -> None:
    with _listeners_lock:
        if sink in _sinks:
            _sinks.remove(sink)


def publish(event: Event) -> None:
    """Give an event to the sinks and the listeners; with no listener, log epoch lines to
    ``kiln.progress``. A ``quiet`` event goes to the sinks only."""
    quiet = bool(event.get("quiet"))
    with _listeners_lock:
        listeners = [] if quiet else list(_listeners)
        receivers = list(_sinks) + listeners
    for receiver in receivers:
        try:
            receiver(event)
        except Exception:  # a display's or a sink's fault must not stop a run
            logging.getLogger(__name__).warning("progress listener failed", exc_info=True)
    if listeners or quiet:
        return
    global _announced
    if event.get("kind") == "epoch":
        _announced = False  # the next run's first step is announced again
        progress_logger().info(event["line"])
    elif event.get("kind") == "step" and event.get("epoch") == 1 and not _announced:
        # Plain output has no live line: say once that training runs (with worker
        # actors, the first epoch line comes only after Ray's start-up and a whole epoch).
        _announced = True
        steps = event.get("steps")
        rate = event.get("steps_per_s")
        progress_logger().info(
            "kiln: epoch 1 running: step %s%s%s",
            event.get("step"),
            f"/{steps}" if steps else "",
            f" ({rate:.1f} steps/s)" if isinstance(rate, (int, float)) else "",
        )


_announced = False  # publish: this run's first step was logged (plain output)


@contextlib.contextmanager
def relay_progress(hooks: Sequence[Any], num_workers: int) -> Iterator[None]:
    """Around ``fit()``: carry rank 0's events from worker actors to :func:`publish` here.

    A no-op for in-process runs (the hook publishes directly) and runs without an
    :class:`EpochProgress`. Otherwise one Ray actor (no CPU) holds the events rank 0
    posts (fire-and-forget calls, a few a second) and a driver thread drains it every
    ``DEFAULT_INTERVAL_S``.
    """
    # a hook that already posts somewhere (a Tune trial's, to the search's driver) keeps it
    targets = [h for h in hooks if isinstance(h, EpochProgress) and h.relay is None]
    if num_workers <= 0 or not targets:
        yield
        return
    with progress_mailbox() as mailbox:
        for hook in targets:
            hook.relay = mailbox
        try:
            yield
        finally:
            for hook in targets:
                hook.relay = None


@contextlib.contextmanager
def progress_mailbox() -> Iterator[Any]:
    """A :class:`kiln._ray.ProgressMailbox` actor (no CPU) for hooks in other processes
    to post to, drained into :func:`publish` from a driver thread every
    ``DEFAULT_INTERVAL_S``; killed on exit, after a last drain."""
    import ray

    from kiln._ray import ProgressMailbox

    mailbox: Any = ray.remote(num_cpus=0)(ProgressMailbox).remote()  # type: ignore[attr-defined]
    stop = threading.Event()

    def pump() -> None:
        while True:
            stopping = stop.wait(DEFAULT_INTERVAL_S)
            try:
                events = ray.get(mailbox.drain.remote(), timeout=30)
            except Exception:  # a lost mailbox costs the display, never the run
                logging.getLogger(__name__).debug("progress relay failed", exc_info=True)
                return
            for event in events:
                publish(event)
            if stopping:
                return

    thread = threading.Thread(target=pump, name="kiln-progress-relay", daemon=True)
    thread.start()
    try:
        yield mailbox
    finally:
        stop.set()
        thread.join(timeout=35)
        with contextlib.suppress(Exception):
            ray.kill(mailbox)


def count_batches(batches: Iterable[Any], hooks: Sequence[EpochProgress]) -> Iterable[Any]:
    """``batches``, telling ``hooks`` each time a step is done (its next batch is asked
    for, or the epoch ends) without its loss: step progress with no host sync. Without
    hooks, ``batches`` itself."""
    if not hooks:
        return batches
    return _counted(batches, hooks)


def _counted(batches: Iterable[Any], hooks: Sequence[EpochProgress]) -> Iterator[Any]:
    for index, batch in enumerate(batches):
        yield batch
        for hook in hooks:
            hook.on_batch_end(index, None)


# ---------------------------------------------------------------------- the hook
class EpochProgress(CallbackBase):
    """Rank 0's step and epoch events (see the module docstring); every rank runs it,
    the others return at once.

    Args:
        epochs: the run's epoch count (N in ``epoch i/N``).
        interval_s: at least this long between two step events.
        quiet: epoch events for sinks only (no step events, no console line, no
            display); the loop then calls no per-batch hook for it.
    """

    def __init__(
        self, epochs: int, interval_s: float = DEFAULT_INTERVAL_S, *, quiet: bool = False
    ) -> None:
        self.epochs = epochs
        self.interval_s = interval_s
        self.quiet = quiet
        self.relay: Any = None  # a ProgressMailbox actor handle when ranks are actors
        self.trial: str | None = None  # in a Tune trial: its id, in every event
        self.steps_per_epoch: int | None = None
        self._run_start = self._epoch_start = self._last = 0.0
        self._first_epoch: int | None = None
        self._epoch = 0
        self._seen = 0  # batches seen this epoch (learns the epoch's length)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        steps = (logs or {}).get("steps_per_epoch")
        self.steps_per_epoch = int(steps) if steps else None
        self._first_epoch = None
        if self.relay is not None and self.trial is None:
            self.trial = _trial_id()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if self._first_epoch is None:  # the pace is measured from here (a resumed
            self._first_epoch, self._run_start = epoch, now  # run starts past epoch 1)
        self._epoch, self._seen = epoch, 0
        self._epoch_start = self._last = now

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.quiet:  # for sinks (TensorBoard), which take epoch events only
            return
        self._seen = batch + 1
        if self.rank != 0:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = max(now - self._epoch_start, 1e-9)
        loss = (logs or {}).get("loss")
        self._send(
            {
                "kind": "step",
                "epoch": self._epoch,
                "epochs": self.epochs,
                "step": self._seen,
                "steps": self.steps_per_epoch,
                "loss": float(loss) if loss is not None else None,
                "steps_per_s": self._seen / elapsed,
                "eta_s": self._eta(now),
            }
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._seen:  # the true length (max_steps or a short shard may cut it)
            self.steps_per_epoch = max(self.steps_per_epoch or 0, self._seen)
        if self.rank != 0:
            return
        metrics = dict(logs or {})
        now = time.monotonic()
        self._send(
            {
                "kind": "epoch",
                "epoch": epoch,
                "epochs": self.epochs,
                "metrics": {
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                },
                "line": epoch_line(epoch, self.epochs, metrics),
                "eta_s": self._eta(now, epoch_done=True),
            }
        )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.rank == 0 and self.relay is not None:
            import ray

            # Calls from one caller run in order: this returns once every event is posted.
            with contextlib.suppress(Exception):
                ray.get(self.relay.flush.remote(), timeout=30)

    def _eta(self, now: float, *, epoch_done: bool = False) -> float | None:
        """Seconds left: the run's pace so far (validation included) over the work left."""
        if self._first_epoch is None:
            return None
        steps = self.steps_per_epoch
        fraction = 1.0 if epoch_done else (self._seen / steps if steps else None)
        if fraction is None:
            return None
        done = (self._epoch - self._first_epoch) + min(fraction, 1.0)
        if done <= 0:
            return None
        left = (self.epochs - self._epoch) + (1.0 - min(fraction, 1.0))
        return (now - self._run_start) / done * left

    def _send(self, event: Event) -> None:
        if self.trial is not None:
            event["trial"] = self.trial
        if self.quiet:
            event["quiet"] = True
        if self.relay is not None:
            self.relay.post.remote(event)  # fire and forget: the loop never waits
        else:
            publish(event)


def _trial_id() -> str | None:
    """The Ray Tune trial this process runs in-process, else None."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session

        if not _in_tune_session():
            return None
        import ray.tune

        return ray.tune.get_context().get_trial_id()
    except Exception:  # no Tune here: not a trial
        return None
