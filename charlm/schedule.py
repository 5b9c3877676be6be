"""Where a run stands against its limits, and the learning rate that follows from it: plain functions of a
config and a position, so that the Trainer, a resumed run and the tests all compute them the same way.

    rate
    lr  |     ______                                       warmup: linear, from lr/warmup_steps to lr
        |    /      ''--..__                               then cosine decay toward the nearest limit,
        |   /               ''--..__                       ending at min_lr_frac * lr
    5%  |  /                        ''--..___________
        +--------------------------------------------> progress (0 .. 1 of the nearest stop limit)

Training longer (`--resume` with a larger limit) moves the end away: the same progress now stands earlier
on the curve, where the rate is higher. A run that had decayed to 5% of its peak would jump back to half of
it in one step. Instead the resumed run records a `Restart` (the step and the rate it had reached) and warms
up from that rate, over `warmup_steps`, to the rate an unbroken run of the longer budget has at that point;
from there on the two runs follow the same curve (README, "Training longer"; BENCHMARKS.md 13).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

# Periodic evaluations by time come at most once per this many times their own cost: ~3% of the run at most.
EVAL_SPACING = 30


@dataclass(frozen=True)
class Position:
    """How far a run has come: optimizer steps, passes over the text (fractional), seconds of training."""

    step: int
    epochs: float
    elapsed: float


@dataclass(frozen=True)
class Restart:
    """The point where a longer budget took over a run's schedule: the step and the rate the run had then."""

    step: int
    lr: float

    def to_dict(self) -> dict:
        return asdict(self)


def limits(config) -> dict:
    """The stop limits that are set, by name."""
    return {k: v for k, v in (("max_steps", config.max_steps), ("epochs", config.epochs),
                              ("max_time", config.max_time)) if v}


def progress(config, pos: Position) -> float:
    """How far the run is toward its nearest stop limit, 0..1 (the schedule and the progress bar); 0 with
    no limit at all."""
    fractions = []
    if config.max_steps:
        fractions.append(pos.step / config.max_steps)
    if config.epochs:
        fractions.append(pos.epochs / config.epochs)
    if config.max_time:
        fractions.append(pos.elapsed / config.max_time)
    return max(fractions) if fractions else 0.0


def limit_reached(config, pos: Position) -> Optional[str]:
    """The first stop limit the position has reached, or None."""
    if config.max_steps and pos.step >= config.max_steps:
        return "max_steps"
    if config.epochs and pos.epochs >= config.epochs - 1e-12:
        return "epochs"
    if config.max_time and pos.elapsed >= config.max_time:
        return "max_time"
    return None


def cosine_rate(config, step: int, at: float) -> float:
    """Linear warmup, then cosine decay from lr to min_lr_frac * lr as progress `at` (0..1) advances."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_frac
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, at))))


def learning_rate(config, step: int, at: float, restart: Optional[Restart] = None) -> float:
    """The rate at `step` and progress `at`. After a Restart: a linear warm-up over warmup_steps from the rate
    the run had reached to the cosine curve of its current limits, then that curve."""
    target = cosine_rate(config, step, at)
    if restart is None or step >= restart.step + config.warmup_steps:
        return target
    done = (step - restart.step + 1) / max(config.warmup_steps, 1)
    return restart.lr + (target - restart.lr) * min(1.0, max(0.0, done))


def restart_for(old, new, pos: Position, old_restart: Optional[Restart] = None) -> Optional[Restart]:
    """A Restart when resuming at `pos` under config `new` (limits moved further) would raise the rate above
    what config `old` had reached there; None when the schedule continues as it was (the same limits, or
    limits that only bring the end closer: the rate then falls faster from where it is, without a jump)."""
    if pos.step < new.warmup_steps:
        return old_restart
    reached = learning_rate(old, pos.step, progress(old, pos), old_restart)
    if cosine_rate(new, pos.step, progress(new, pos)) <= reached * (1 + 1e-9):
        return old_restart
    return Restart(pos.step, reached)


@dataclass
class EvalCadence:
    """When periodic evaluations by time fall due: the first once 15 s and 10% of the budget have passed
    (the later), then every 10% of the budget, never more often than `spacing` times an evaluation's own cost
    (so they stay under ~1/spacing of the run), and none that close to the end, where the final evaluation
    comes anyway. Schedule asks `due` at every step and tells `record` after each evaluation."""

    spacing: float  # evaluations are at least this many times their own cost apart
    first_s: float = 15.0  # no evaluation before this many seconds: the first line is worth waiting for
    next_mark: float = 0.1  # the progress (0..1) at which the next one falls due
    last_s: Optional[float] = None  # the run's clock at the latest evaluation
    cost_s: float = 0.0  # seconds the latest evaluation took (0: not measured, or under DDP)

    def resume(self, at: float, last_s: Optional[float]) -> None:
        """Where a run (resumed, with its evaluations so far) stands: the next tenth of the budget after `at`."""
        self.last_s = last_s
        self.next_mark = math.floor(at * 10 + 1e-9) / 10 + 0.1 if last_s is not None else 0.1

    def due(self, at: float, elapsed: float) -> bool:
        if at < self.next_mark or elapsed < self.first_s:
            return False
        gap = self.spacing * self.cost_s
        if self.last_s is not None and elapsed - self.last_s < gap:
            return False
        if gap and elapsed * (1 - at) / max(at, 1e-9) < gap:  # the seconds left, estimated
            return False
        self.next_mark = at + 0.1
        return True

    def record(self, elapsed: float, cost_s: float) -> None:
        self.last_s, self.cost_s = elapsed, cost_s


@dataclass
class Schedule:
    """One run's schedule: the functions above for its config, the Restart a longer budget took over at, and
    its evaluation cadence. The Trainer asks it at every step, with the run's Position; tests drive it alone."""

    config: object  # a TrainConfig: the limits, lr, warmup_steps, min_lr_frac, eval_every
    restart: Optional[Restart] = None
    cadence: EvalCadence = field(default_factory=lambda: EvalCadence(EVAL_SPACING))

    def limits(self) -> dict:
        return limits(self.config)

    def progress(self, pos: Position) -> float:
        return progress(self.config, pos)

    def limit_reached(self, pos: Position) -> Optional[str]:
        return limit_reached(self.config, pos)

    def learning_rate(self, pos: Position) -> float:
        return learning_rate(self.config, pos.step, self.progress(pos), self.restart)

    def start(self, pos: Position, last_eval_s: Optional[float]) -> None:
        """Training (re)starts at `pos`; the latest evaluation was at `last_eval_s` on the run's clock (None: none)."""
        self.cadence.resume(self.progress(pos), last_eval_s)

    def eval_due(self, pos: Position) -> bool:
        """Whether an evaluation falls due after the step that brought the run to `pos`: every eval_every
        steps when set, else by the cadence (which then counts it as done: ask once per step)."""
        if self.config.eval_every:
            return pos.step % self.config.eval_every == 0
        return self.cadence.due(self.progress(pos), pos.elapsed)

    def evaluated(self, elapsed: float, cost_s: float) -> None:
        """An evaluation ended at `elapsed` on the run's clock and took `cost_s` seconds (0: not measured)."""
        self.cadence.record(elapsed, cost_s)
