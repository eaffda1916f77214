"""Periodic hyper-parameter optimization: a pluggable solver the loop calls every N steps.

A :class:`PeriodicOptimizer` turns the model's current state into a problem, solves
it, and applies the solution. Any backend (a classical heuristic, an annealer behind
an API) implements the same three methods; :func:`optimize_once` runs them in order.
kiln ships one real solver, :class:`LRMultiplierAnnealer`: simulated annealing over a
discrete learning-rate multiplier per optimizer parameter group, judged by a one-step
look-ahead loss on a held-out batch.

Where it runs: :class:`PeriodicOptimizationCallback` is a kiln ``CallbackBase``;
the one worker loop calls it after every training batch, on every rank::

    set_context(model, optimizer)          -> solver.bind(optimizer) if it has bind()
    for each batch: forward, backward, optimizer.step(), scheduler.step()
        on_batch_end                       -> re-apply the current lr multipliers
                                              every `optimization_frequency` batches:
                                              problem  = formulate_problem(model, metrics)
                                              solution = solve(problem)
                                              result   = apply_solution(model, solution)

Every rank sees the same weights, optimizer state and held-out batch and the
annealer is seeded, so ranks reach the same decision. Results are appended, on
rank 0, to ``log_path`` (JSON lines) when given: the callback runs in the worker,
so that file is how the driver sees them.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kiln.engine.callbacks import CallbackBase
from kiln.errors import ConfigError


@dataclass
class OptimizationResult:
    """What one periodic optimization did.

    Attributes:
        step: the batch count at which it ran (counted from 1 over the run).
        applied: whether the solution changed anything.
        objective_before: held-out look-ahead loss of the current setting.
        objective_after: held-out look-ahead loss of the chosen setting.
        solution: the solver's answer (for the annealer: per-group multipliers).
        details: anything else (evaluations, learning rates before/after, seconds).
    """

    step: int
    applied: bool
    objective_before: float
    objective_after: float
    solution: Any = None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PeriodicOptimizer(Protocol):
    """A solver the training loop calls periodically: formulate, solve, apply."""

    def formulate_problem(self, model: nn.Module, metrics: dict[str, Any]) -> Any:
        """Build the problem from the model's current state and recent metrics."""
        ...

    def solve(self, problem: Any) -> Any:
        """Return a solution to ``problem``."""
        ...

    def apply_solution(self, model: nn.Module, solution: Any) -> OptimizationResult:
        """Apply ``solution`` to the model (or its optimizer) and say what changed."""
        ...


# ---------------------------------------------------------------------- the annealer
@dataclass
class AnnealingLRProblem:
    """Choose one multiplier per parameter group to minimise ``evaluate(multipliers)``."""

    num_groups: int
    choices: tuple[float, ...]
    evaluate: Callable[[tuple[float, ...]], float]
    step: int = 0


class LRMultiplierAnnealer:
    """Simulated annealing over learning-rate multipliers per parameter group.

    The objective of a candidate ``(m_1, ..., m_G)`` is the loss on the judge half of
    a held-out batch after one look-ahead step ``theta - m_g * lr_g * d`` per group,
    where ``d`` is the optimizer's own update direction (Adam's normalised moment, or
    the gradient on the probe half of the batch for SGD). The chosen multipliers
    scale each group's learning rate from then on (cumulatively, within bounds).

    Args:
        held_out: an ``(x, y)`` batch the model does not train on.
        loss_fn: ``loss_fn(outputs, y)``; default cross-entropy for integer labels,
            mean squared error otherwise.
        choices: the multipliers each group can take per round.
        iterations: annealing proposals per round.
        temperature, cooling: initial temperature (relative to the baseline loss) and
            its decay per proposal.
        bounds: the cumulative multiplier of a group stays within these.
        seed: the annealer's random seed (the same on every rank).
    """

    def __init__(
        self,
        held_out: tuple[torch.Tensor, torch.Tensor],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        choices: Sequence[float] = (0.5, 1.0, 2.0),
        iterations: int = 24,
        temperature: float = 0.05,
        cooling: float = 0.85,
        bounds: tuple[float, float] = (1 / 64, 64.0),
        seed: int = 0,
    ) -> None:
        if 1.0 not in choices:
            raise ConfigError(f"choices={tuple(choices)!r} must include 1.0 (keep the current lr)")
        if iterations < 1:
            raise ConfigError(f"iterations={iterations!r} must be >= 1")
        self.held_out = (torch.as_tensor(held_out[0]), torch.as_tensor(held_out[1]))
        self.loss_fn = loss_fn
        self.choices = tuple(float(c) for c in sorted(choices))
        self.iterations, self.temperature, self.cooling = iterations, temperature, cooling
        self.bounds = bounds
        self.seed = seed
        self.optimizer: torch.optim.Optimizer | None = None
        self.multipliers: list[float] = []
        self._set_lrs: list[float | None] = []
        self._rounds = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["optimizer"] = None  # process-local; bound again in the worker
        return state

    # -- wiring ------------------------------------------------------------------------
    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach the optimizer whose groups' learning rates this solver scales."""
        self.optimizer = optimizer
        groups = len(optimizer.param_groups)
        if len(self.multipliers) != groups:
            self.multipliers = [1.0] * groups
        self._set_lrs = [None] * groups

    def reapply(self) -> None:
        """Scale each group's lr by its multiplier once per scheduler update (idempotent)."""
        if self.optimizer is None:
            return
        for i, group in enumerate(self.optimizer.param_groups):
            if self._set_lrs[i] is None or group["lr"] != self._set_lrs[i]:
                group["lr"] = group["lr"] * self.multipliers[i]
                self._set_lrs[i] = group["lr"]

    # -- protocol ----------------------------------------------------------------------
    def formulate_problem(self, model: nn.Module, metrics: dict[str, Any]) -> AnnealingLRProblem:
        if self.optimizer is None:
            raise RuntimeError("LRMultiplierAnnealer.bind(optimizer) must be called first")
        net = getattr(model, "module", model)  # not through DDP: no collective calls here
        device = next(net.parameters()).device
        x, y = (t.to(device) for t in self.held_out)
        half = max(1, x.shape[0] // 2) if x.shape[0] > 1 else x.shape[0]
        probe, judge = (x[:half], y[:half]), (x[half:], y[half:]) if x.shape[0] > 1 else (x, y)
        groups = [[p for p in g["params"] if p.requires_grad] for g in self.optimizer.param_groups]
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        directions = self._directions(net, groups, probe)
        loss_of = self._loss_fn(judge[1])

        def evaluate(multipliers: tuple[float, ...]) -> float:
            was_training = net.training
            net.eval()
            saved = [[p.detach().clone() for p in ps] for ps in groups]
            try:
                with torch.no_grad():
                    for ps, ds, lr, m in zip(groups, directions, lrs, multipliers, strict=True):
                        for p, d in zip(ps, ds, strict=True):
                            p.sub_(lr * m * d)
                    out = net(judge[0])
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    return float(loss_of(out, judge[1]))
            finally:
                with torch.no_grad():
                    for ps, ss in zip(groups, saved, strict=True):
                        for p, s in zip(ps, ss, strict=True):
                            p.copy_(s)
                net.train(was_training)

        return AnnealingLRProblem(
            len(groups), self.choices, evaluate, step=int(metrics.get("step", 0))
        )

    def solve(self, problem: AnnealingLRProblem) -> dict[str, Any]:
        """Simulated annealing from "all 1.0": move one group to a neighbouring choice."""
        rng = random.Random(self.seed * 1_000_003 + self._rounds)
        self._rounds += 1
        cache: dict[tuple[float, ...], float] = {}

        def cost(m: tuple[float, ...]) -> float:
            if m not in cache:
                value = problem.evaluate(m)
                cache[m] = value if math.isfinite(value) else math.inf
            return cache[m]

        current = tuple(1.0 for _ in range(problem.num_groups))
        baseline = cost(current)
        best, best_cost, current_cost = current, baseline, baseline
        temp = self.temperature * max(abs(baseline), 1e-8)
        for _ in range(self.iterations):
            g = rng.randrange(problem.num_groups)
            idx = problem.choices.index(current[g]) + rng.choice((-1, 1))
            if not 0 <= idx < len(problem.choices):
                continue
            proposal = current[:g] + (problem.choices[idx],) + current[g + 1 :]
            delta = cost(proposal) - current_cost
            if delta <= 0 or rng.random() < math.exp(-delta / max(temp, 1e-12)):
                current, current_cost = proposal, cache[proposal]
                if current_cost < best_cost:
                    best, best_cost = current, current_cost
            temp *= self.cooling
        return {
            "multipliers": best,
            "objective_before": baseline,
            "objective_after": best_cost,
            "evaluations": len(cache),
            "step": problem.step,
        }

    def apply_solution(self, model: nn.Module, solution: dict[str, Any]) -> OptimizationResult:
        assert self.optimizer is not None
        before = [float(g["lr"]) for g in self.optimizer.param_groups]
        lo, hi = self.bounds
        applied = False
        for i, (group, m) in enumerate(
            zip(self.optimizer.param_groups, solution["multipliers"], strict=True)
        ):
            total = min(hi, max(lo, self.multipliers[i] * m))
            factor = total / self.multipliers[i]
            if factor != 1.0:
                applied = True
                self.multipliers[i] = total
                group["lr"] = group["lr"] * factor
                self._set_lrs[i] = group["lr"]
        return OptimizationResult(
            step=int(solution.get("step", 0)),
            applied=applied,
            objective_before=float(solution["objective_before"]),
            objective_after=float(solution["objective_after"]),
            solution=list(solution["multipliers"]),
            details={
                "evaluations": solution["evaluations"],
                "lr_before": before,
                "lr_after": [float(g["lr"]) for g in self.optimizer.param_groups],
                "cumulative_multipliers": list(self.multipliers),
            },
        )

    # -- helpers -----------------------------------------------------------------------
    def _loss_fn(self, y: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        if y.dtype in (torch.int64, torch.int32):
            return nn.functional.cross_entropy
        return lambda out, target: nn.functional.mse_loss(out.reshape(target.shape), target)

    def _directions(
        self, net: nn.Module, groups: list[list[torch.Tensor]], probe
    ) -> list[list[torch.Tensor]]:
        """The optimizer's next update direction per parameter (gradient when it has no state)."""
        params = [p for ps in groups for p in ps]
        out = net(probe[0])
        out = out[0] if isinstance(out, (tuple, list)) else out
        grads = torch.autograd.grad(
            self._loss_fn(probe[1])(out, probe[1]), params, allow_unused=True
        )
        by_param = {
            id(p): (g if g is not None else torch.zeros_like(p))
            for p, g in zip(params, grads, strict=True)
        }
        assert self.optimizer is not None
        directions = []
        for ps in groups:
            ds = []
            for p in ps:
                state = self.optimizer.state.get(p, {})
                if "exp_avg" in state and "exp_avg_sq" in state:
                    step = float(state.get("step", 1)) or 1.0
                    betas = next(
                        g["betas"]
                        for g in self.optimizer.param_groups
                        if any(q is p for q in g["params"])
                    )
                    m_hat = state["exp_avg"] / (1 - betas[0] ** step)
                    v_hat = state["exp_avg_sq"] / (1 - betas[1] ** step)
                    ds.append((m_hat / (v_hat.sqrt() + 1e-8)).detach())
                else:
                    ds.append(by_param[id(p)].detach())
            directions.append(ds)
        return directions


# ---------------------------------------------------------------------- loop wiring
SOLVER_METHODS = ("formulate_problem", "solve", "apply_solution")


def check_solver(solver: Any) -> None:
    """Raise ConfigError naming the :class:`PeriodicOptimizer` methods ``solver`` lacks."""
    missing = [m for m in SOLVER_METHODS if not callable(getattr(solver, m, None))]
    if missing:
        raise ConfigError(
            f"{type(solver).__name__} is not a PeriodicOptimizer: it lacks {', '.join(missing)}"
        )


def optimize_once(
    solver: PeriodicOptimizer, model: nn.Module, metrics: dict[str, Any]
) -> OptimizationResult:
    """One round: formulate the problem from the model, solve it, apply the solution."""
    problem = solver.formulate_problem(model, metrics)
    return solver.apply_solution(model, solver.solve(problem))


class PeriodicOptimizationCallback(CallbackBase):
    """Calls a :class:`PeriodicOptimizer` every ``optimization_frequency`` training batches.

    Args:
        optimizer: the periodic optimizer (solver); if it has ``bind(optimizer)`` it gets
            the torch optimizer, and ``reapply()`` is called after every batch.
        optimization_frequency: batches between calls (counted over the whole run).
        log_path: rank 0 appends one JSON line per result here (the driver's view).
    """

    def __init__(
        self,
        optimizer: PeriodicOptimizer,
        optimization_frequency: int = 100,
        log_path: str | Path | None = None,
    ) -> None:
        check_solver(optimizer)
        if optimization_frequency < 1:
            raise ConfigError(f"optimization_frequency={optimization_frequency!r} must be >= 1")
        self.solver = optimizer
        self.optimization_frequency = optimization_frequency
        self.log_path = str(log_path) if log_path else None
        self.steps = 0
        self.results: list[OptimizationResult] = []

    def set_context(self, model=None, optimizer=None, rank: int = 0, world_size: int = 1) -> None:
        super().set_context(model, optimizer, rank, world_size)
        bind = getattr(self.solver, "bind", None)
        if optimizer is not None and callable(bind):
            bind(optimizer)

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.steps += 1
        reapply = getattr(self.solver, "reapply", None)
        if callable(reapply):
            reapply()
        if self.steps % self.optimization_frequency or self.model is None:
            return
        started = time.perf_counter()
        metrics = {"step": self.steps, "batch": batch, **(logs or {})}
        result = optimize_once(self.solver, self.model, metrics)
        result.step = self.steps
        result.details.setdefault("seconds", time.perf_counter() - started)
        self.results.append(result)
        if self.log_path and self.rank == 0:
            path = Path(self.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(asdict(result), default=str) + "\n")


def read_optimization_log(path: str | Path) -> list[OptimizationResult]:
    """The results a :class:`PeriodicOptimizationCallback` wrote to ``log_path``."""
    p = Path(path)
    if not p.is_file():
        return []
    return [OptimizationResult(**json.loads(line)) for line in p.read_text().splitlines() if line]
