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

A run whose validation loss stops improving ends early, cooled: after `patience` evaluations without a new
best, the Trainer goes back to its best weights (and their optimizer state) and records a `Cooldown` (the
step, the rate the best was reached at, and a length of COOLDOWN_SHARE of the steps that led to the best);
the rate falls from there to the floor along half a cosine, and the run stops when it reaches the floor. The
best checkpoint is kept throughout, so the cooldown can only add a better one. On a small text read many
times over, the best comes within the first passes, while a long budget's rate is still near its peak
(BENCHMARKS.md 10, "A small text ends early").

    rate              best      stall: `patience` evaluations without a new best
    lr  |     _________*_________|
        |    /                   |'-.         back to the best's weights; the rate falls from the
        |   /                    |   '.       best's to the floor over COOLDOWN_SHARE of the steps
    5%  |  /                     |     '-._   that led to it; then the run ends
        +--------------------------------------------> steps
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

# Periodic evaluations by time come at most once per this many times their own cost: ~3% of the run at most.
EVAL_SPACING = 30
# A cooldown lasts this share of the steps that led to the best, at least COOLDOWN_MIN steps: 0.5 took a
# 3-minute run on 25k characters from 4.441 to 4.402 where 0.25 and 0.1 (on runs whose best came later)
# gained nothing, and a 10-minute run on a 250 KB manual from 2.220 to 2.180 (BENCHMARKS.md 10).
COOLDOWN_SHARE, COOLDOWN_MIN = 0.5, 10
COOLDOWN_EVALS = 4  # evaluations in a cooldown (the last at its end): the best of them is kept


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


@dataclass(frozen=True)
class Cooldown:
    """Validation stopped improving: from `step` on, the rate falls from `lr` (the best's) to the floor over
    `steps` steps, from the best's weights; the run ends when it reaches the floor."""

    step: int
    lr: float
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)

    def end(self) -> int:
        return self.step + self.steps


def cooldown_for(step: int, best_step: int, best_lr: float) -> Cooldown:
    """The Cooldown a run at `step` starts, whose best came at `best_step` at rate `best_lr`."""
    return Cooldown(step, best_lr, max(COOLDOWN_MIN, round(COOLDOWN_SHARE * best_step)))


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


def learning_rate(config, step: int, at: float, restart: Optional[Restart] = None,
                  cooldown: Optional[Cooldown] = None) -> float:
    """The rate at `step` and progress `at`. After a Restart: a linear warm-up over warmup_steps from the rate
    the run had reached to the cosine curve of its current limits, then that curve. In a Cooldown: half a
    cosine from its rate down to the floor."""
    if cooldown is not None and step >= cooldown.step:
        floor = config.lr * config.min_lr_frac
        done = min(1.0, (step - cooldown.step) / max(cooldown.steps, 1))
        return floor + (max(cooldown.lr, floor) - floor) * 0.5 * (1.0 + math.cos(math.pi * done))
    target = cosine_rate(config, step, at)
    if restart is None or step >= restart.step + config.warmup_steps:
        return target
    done = (step - restart.step + 1) / max(config.warmup_steps, 1)
    return restart.lr + (target - restart.lr) * min(1.0, max(0.0, done))


def restart_for(old, new, pos: Position, old_restart: Optional[Restart] = None,
                old_cooldown: Optional[Cooldown] = None) -> Optional[Restart]:
    """A Restart when resuming at `pos` under config `new` (limits moved further, or a Cooldown set aside by
    --patience 0) would raise the rate above what config `old` had reached there; None when the schedule
    continues as it was (the same limits, or limits that only bring the end closer: the rate then falls
    faster from where it is, without a jump)."""
    if pos.step < new.warmup_steps:
        return old_restart
    reached = learning_rate(old, pos.step, progress(old, pos), old_restart, old_cooldown)
    if cosine_rate(new, pos.step, progress(new, pos)) <= reached * (1 + 1e-9):
        return old_restart
    return Restart(pos.step, reached)


@dataclass
class EvalCadence:
    """When periodic evaluations by time fall due: the first once 15 s and 10% of the budget have passed
    (the later), then every 10% of the budget, never more often than `spacing` times an evaluation's own cost
    (so they stay under ~1/spacing of the run), and none that close to the end, where the final evaluation
    comes anyway. A run that reads its text more than ten times also evaluates after every pass over it: on a
    small text the best comes within a few passes, and the patience that ends such a run counts passes then.
    Schedule asks `due` at every step and tells `record` after each evaluation."""

    spacing: float  # evaluations are at least this many times their own cost apart
    first_s: float = 15.0  # no evaluation before this many seconds: the first line is worth waiting for
    next_mark: float = 0.1  # the progress (0..1) at which the next one falls due
    next_pass: float = 1.0  # ...or the pass over the text, when passes are shorter than a tenth of the run
    last_s: Optional[float] = None  # the run's clock at the latest evaluation
    cost_s: float = 0.0  # seconds the latest evaluation took (0: not measured, or under DDP)

    def resume(self, at: float, last_s: Optional[float], epochs: float = 0.0) -> None:
        """Where a run (resumed, with its evaluations so far) stands: the next tenth of the budget after `at`,
        and the next pass."""
        self.last_s = last_s
        self.next_mark = math.floor(at * 10 + 1e-9) / 10 + 0.1 if last_s is not None else 0.1
        self.next_pass = math.floor(epochs) + 1.0

    def due(self, at: float, elapsed: float, epochs: float = 0.0) -> bool:
        by_pass = epochs >= self.next_pass and at < 0.1 * epochs  # a pass is under a tenth of the run so far
        if (at < self.next_mark and not by_pass) or elapsed < self.first_s:
            return False
        gap = self.spacing * self.cost_s
        if self.last_s is not None and elapsed - self.last_s < gap:
            return False
        if gap and elapsed * (1 - at) / max(at, 1e-9) < gap:  # the seconds left, estimated
            return False
        self.next_mark, self.next_pass = at + 0.1, math.floor(epochs) + 1.0
        return True

    def record(self, elapsed: float, cost_s: float) -> None:
        self.last_s, self.cost_s = elapsed, cost_s


@dataclass
class Schedule:
    """One run's schedule: the functions above for its config, the Restart a longer budget took over at, and
    its evaluation cadence. The Trainer asks it at every step, with the run's Position; tests drive it alone."""

    config: object  # a TrainConfig: the limits, lr, warmup_steps, min_lr_frac, eval_every
    restart: Optional[Restart] = None
    cooldown: Optional[Cooldown] = None  # set when validation stopped improving: the run's end
    cadence: EvalCadence = field(default_factory=lambda: EvalCadence(EVAL_SPACING))

    def limits(self) -> dict:
        return limits(self.config)

    def progress(self, pos: Position) -> float:
        return progress(self.config, pos)

    def limit_reached(self, pos: Position) -> Optional[str]:
        """The stop limit reached, or "patience" once a Cooldown has reached the floor."""
        if self.cooldown is not None and pos.step >= self.cooldown.end():
            return "patience"
        return limit_reached(self.config, pos)

    def learning_rate(self, pos: Position) -> float:
        return learning_rate(self.config, pos.step, self.progress(pos), self.restart, self.cooldown)

    def steps_left(self, pos: Position) -> float:
        """Steps to the nearest stop limit, estimated from the progress so far (infinite with no limit)."""
        at = self.progress(pos)
        return math.inf if at <= 0 else pos.step * max(0.0, 1.0 - at) / at

    def cooldown_at(self, pos: Position, best_step: int, best_lr: float) -> Optional[Cooldown]:
        """The Cooldown to start at `pos` when validation has stopped improving, or None when the schedule's
        own end comes sooner (its cosine is cooling the run already; a late stall on a noisy text is no stall)."""
        cooldown = cooldown_for(pos.step, best_step, best_lr)
        return cooldown if cooldown.steps < self.steps_left(pos) else None

    def start(self, pos: Position, last_eval_s: Optional[float]) -> None:
        """Training (re)starts at `pos`; the latest evaluation was at `last_eval_s` on the run's clock (None: none)."""
        self.cadence.resume(self.progress(pos), last_eval_s, pos.epochs)

    def eval_due(self, pos: Position) -> bool:
        """Whether an evaluation falls due after the step that brought the run to `pos`: every eval_every
        steps when set, else by the cadence (which then counts it as done: ask once per step); and in a
        Cooldown at each quarter of it, so that its best point is kept, however long it proves to be."""
        cool = self.cooldown
        if cool is not None and pos.step - cool.step in {k * cool.steps // COOLDOWN_EVALS
                                                        for k in range(1, COOLDOWN_EVALS)}:
            return True
        if self.config.eval_every:
            return pos.step % self.config.eval_every == 0
        return self.cadence.due(self.progress(pos), pos.elapsed, pos.epochs)

    def evaluated(self, elapsed: float, cost_s: float) -> None:
        """An evaluation ended at `elapsed` on the run's clock and took `cost_s` seconds (0: not measured)."""
        self.cadence.record(elapsed, cost_s)
