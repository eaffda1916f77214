"""The CLI's console: a live progress display on a terminal, plain lines elsewhere.

On a terminal, :func:`training_display` shows the running epoch as one line that
redraws a few times a second, and leaves each finished epoch's line above it::

    epoch   2/30  train_loss 0.8203  train_accuracy 83.15%  val_loss 0.4308  ...  (0.11 s)
    epoch 3/30 ━━━━━━━━━━━╸━━━━━━━━━━━  21/42 steps  loss 0.4123  52.3 steps/s  ETA 0:00:12

Anywhere else (a pipe, a file, a CI log) it adds nothing: the ``kiln.progress``
logger prints one plain line per epoch, without ANSI codes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from kiln.engine.progress import add_listener, remove_listener


def stdout_is_terminal() -> bool:
    """True when stdout is an interactive terminal (rich's own test, which honours
    FORCE_COLOR / TERM=dumb / NO_COLOR-style overrides the same way its tables do)."""
    from rich.console import Console

    return Console(file=sys.stdout).is_terminal


class LiveTraining:
    """A progress listener that draws the running epoch with ``rich.progress``."""

    def __init__(self, console: Any, starting: str) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[steps]}"),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=True,
            refresh_per_second=4,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self.task = self.progress.add_task(starting, total=None, steps="", stats="")

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "epoch":
            self.progress.console.print(
                event["line"], markup=False, highlight=False, soft_wrap=True
            )
            self.progress.update(
                self.task,
                description=f"epoch {event['epoch']}/{event['epochs']} done",
                completed=0,
                total=None,
                steps="",
                stats=_stats(None, None, event.get("eta_s")),
            )
        elif kind == "step":
            steps = event.get("steps")
            shown = f"{event['step']}/{steps} steps" if steps else f"{event['step']} steps"
            self.progress.update(
                self.task,
                description=f"epoch {event['epoch']}/{event['epochs']}",
                completed=event["step"],
                total=steps,
                steps=shown,
                stats=_stats(event.get("loss"), event.get("steps_per_s"), event.get("eta_s")),
            )

    def __enter__(self) -> LiveTraining:
        self.progress.start()
        add_listener(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        remove_listener(self)
        self.progress.stop()


def _stats(loss: float | None, rate: float | None, eta: float | None) -> str:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if rate is not None:
        parts.append(f"{rate:.1f} steps/s")
    if eta is not None:
        parts.append(f"ETA {_clock(eta)}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@contextlib.contextmanager
def training_display(starting: str, *, quiet: bool = False) -> Iterator[None]:
    """A live display while a run trains, when stdout is a terminal and not ``quiet``;
    otherwise nothing (plain epoch lines come from the ``kiln.progress`` logger)."""
    if quiet or not stdout_is_terminal():
        yield
        return
    from rich.console import Console

    with LiveTraining(Console(file=sys.stdout), starting):
        yield
