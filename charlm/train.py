"""The training loop: teacher forcing over carried-state streams, clipping, evaluation, the final report.

The Trainer knows nothing about the command line. It reports through `callback(event, data)` with events
"step" (every optimizer step), "eval" (every evaluation), "save" (a checkpoint written), and for the final
report "final_start", "final_progress" (each chunk) and "final"; it returns a TrainResult. Around it:
schedule.py (the limits, progress, learning rate and evaluation cadence, as a Schedule), persist.py (what a
checkpoint holds and how a run resumes from it; metrics.jsonl), streams.py (the stream layout, validation
burn-in). Under torchrun each process owns a contiguous block of the B streams and carries their states;
DistributedDataParallel averages the gradients, and one all-reduce per step agrees on the loss and the stops.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from charlm import checkpoint as ckpt
from charlm import persist, schedule
from charlm import state as st
from charlm.autosize import EVAL_CHARS
from charlm.errors import CharlmError
from charlm.evaluation import EVAL_SEQ_LEN, autocast, evaluate, evaluate_rows, full_pass_streams, standard_error
from charlm.model import CharRNN, start_state
from charlm.optim import AdamW
from charlm.runtime import Dist, agreed, from_main
from charlm.score import default_context_id
from charlm.streams import eval_streams, make_streams
from charlm.tags import TAG_DROPOUT
from charlm.vocab import Vocabulary

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
# The final report may always take this long, however short the run: a few seconds buy a whole small tail.
FINAL_MIN_S = 2.0
# ...and a validation text up to this long is always scored whole: seconds for any model charlm sizes on two
# CPU cores, and an estimate timed from small periodic passes (their fixed costs) would undercount it.
FINAL_MIN_CHARS = 262_144
# A float32 pass over the same text costs this many times a bf16 one (1.0 s against 1.7 s for 65.5k
# characters of a 2 x 256 GRU on one thread of the bf16 CPU; BENCHMARKS.md 9): the final pass is timed from
# the periodic ones, which run in the training precision.
FP32_OVER_BF16 = 1.8
# Stops that every process must agree on (a signal, a failure, rank 0's clock), voted in the step's all-reduce.
AGREED_STOPS = ("interrupt", "error", "max_time")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # streams per step: enough rows to keep the matrix units busy on 2 cores
    seq_len: int = 128  # characters per truncated-BPTT chunk; the state carries context beyond it
    lr: float = 5e-3  # peak learning rate: beat 3e-3 side by side at 1-10 minutes (0.013 at 10 min of Tiny
    # Shakespeare, 0.06-0.10 at 1-1.5 min), as 3e-3 had beaten 2e-3; 8e-3 was no better at 3 min (BENCHMARKS.md 10)
    min_lr_frac: float = 0.05  # the cosine decay ends at this fraction of lr: most of the gain of decay
    warmup_steps: int = 50  # linear warmup protects the first steps from large, noisy updates
    weight_decay: float = 0.01  # AdamW only, on weight matrices (not biases); `charlm train` sizes it with the
    # model (autosize._weight_decay: 0.1 once the run reads its text more than twice)
    optimizer: str = "adamw"
    clip: float = 1.0  # global gradient-norm clip: recurrent nets spike without it
    epochs: Optional[float] = None  # stop limits: whichever comes first; None = no limit of that kind
    max_steps: Optional[int] = None
    max_time: Optional[float] = None  # seconds of training since the run's start (resumes included)
    # Steps between validation passes (and checkpoints); None = by time: the first once 15 s or 10% of the
    # budget have passed, whichever is later, then every 10% of the budget (a first line soon, ~10 in all).
    eval_every: Optional[int] = None
    # Periodic evaluations score an evenly spread sample of at most this many validation characters: within
    # 0.01 nats/char of the full pass on Tiny Shakespeare and python-stdlib (BENCHMARKS.md), and a pass
    # costs the same on a 1 MB corpus and a 10 GB one. 0 = the whole validation text every time.
    eval_chars: int = EVAL_CHARS
    # The final report scores the best model in float32 on the validation text (and the last beside it, when
    # the best was picked on a sample: Trainer._final_full_pass). None: all of it when that
    # fits in final_share of the budget (at least FINAL_MIN_S), else an evenly spread sample that does, with
    # its standard error (the end of a run stays inside its budget on a 10 GB corpus); True: all of it
    # whatever it costs; False: no final pass (the best periodic figure stands).
    full_final_eval: Optional[bool] = None
    final_share: float = 0.05
    # After this many evaluations without a new best, go back to the best weights, cool the rate down from
    # there (schedule.Cooldown) and stop; 0 = never end early. Evaluations come every tenth of a time budget
    # (or every pass over a text read more than ten times): three in a row without a new best is 30% of a
    # run's budget on a large text (where the loss mostly falls to the end; a stall that late is left to the
    # schedule's own end, Schedule.cooldown_at) and a few passes on a small one, already overfitting
    # (BENCHMARKS.md 10, "A small text ends early").
    patience: int = 3
    val_frac: float = 0.1  # the tail of the corpus held out for validation
    seed: int = 1337
    precision: str = "fp32"  # fp32 or bf16 (autocast); the CLI resolves "auto" per device
    eval_streams: int = 32  # parallel streams of the validation pass: 1.4x faster than 8, same loss to 1e-4
    # (fewer on a short validation text, each scoring at least its burn-in: streams.eval_streams)
    burn_in: int = 256  # characters that warm each validation stream but the first (streams.py)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    step: int
    epoch: int
    stopped_by: str  # "max_steps", "epochs", "max_time", "patience", "interrupt" or "nonfinite" (an error raises)
    best_val_loss: float
    best_step: int
    metrics: list = field(default_factory=list)
    elapsed_s: float = 0.0
    # the final report: {"loss", "chars" scored, "of" (the validation text's), "se" (0 when all), "step"}, and
    # "compared": {"step", "loss"} when the last weights were scored beside the sample's best (_final_full_pass)
    full_val: Optional[dict] = None
    eval_s: float = 0.0  # seconds of this session spent in periodic evaluations and their checkpoints
    cooldown: Optional[schedule.Cooldown] = None  # where validation stopped improving and the run cooled down


def make_optimizer(model: torch.nn.Module, config: TrainConfig):
    """AdamW and Adam are charlm's own (charlm/optim.py: no compiler import at start-up); the others torch's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return AdamW(groups, lr=config.lr, betas=(0.9, 0.99))
    if config.optimizer == "adam":
        return AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, alpha=0.95)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def _text_and_tags(text) -> tuple:
    """A reshuffled epoch's (ids, tag track or None): reshuffle returns the ids, or both for tagged items."""
    return text if isinstance(text, tuple) else (text, None)


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed from (seed, process, step)."""
    return int(np.random.SeedSequence([seed % 2**63, rank, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Trainer:
    """One training run. `run()` trains until a stop limit, early stop, interrupt or non-finite loss."""

    def __init__(
        self,
        model: CharRNN,
        train_ids: np.ndarray,
        val_ids: np.ndarray,
        config: TrainConfig,
        out_dir,
        device: torch.device,
        meta: dict,
        callback: Optional[Callable[[str, dict], None]] = None,
        dist_info: Dist = Dist(),
        resume: Optional[dict] = None,
        compile_model: bool = False,
        spent: float = 0.0,
        reshuffle: Optional[Callable[[int], np.ndarray]] = None,
        train_tags: Optional[np.ndarray] = None,
        val_tags: Optional[np.ndarray] = None,
    ):
        self.model = model.to(device)
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.meta = meta  # model_config, vocab, corpus: copied into every checkpoint
        # every stream, in training and in evaluation, starts after the text's line break, as sampling does
        # (model.start_state); None for a caller without a vocabulary: the zero state
        self.context_id = default_context_id(Vocabulary(meta["vocab"])) if meta.get("vocab") else None
        self.callback = callback or (lambda event, data: None)
        self.dist = dist_info
        self.stop_request: Optional[str] = None
        self.finishing = False  # True during the final full evaluation, after the last checkpoint

        c = config
        # reshuffle(epoch) -> the training text of that epoch (items.py: the items in a new order each
        # epoch), or (text, its tag track); the layout below is rebuilt from it whenever an epoch begins
        self.reshuffle = reshuffle
        if reshuffle is not None:
            train_ids, train_tags = _text_and_tags(reshuffle(0))
        # a tagged text (tags.py): its tag track lies beside the ids in every layout
        self.train_streams = make_streams(train_ids, c.batch_size, tags=train_tags)
        if self.train_streams.rows % self.dist.world:
            raise CharlmError(
                f"--batch-size {self.train_streams.rows} is not divisible by the {self.dist.world} processes; "
                "pick a multiple of the process count"
            )
        per_rank = self.train_streams.rows // self.dist.world
        self.my_rows = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        self.my_streams = self.train_streams.select(self.my_rows)
        # Validation: each process scores every world-th stream. Periodic passes read a fixed sample of at
        # most eval_chars characters; the final report reads all of them (streams.py: eval_streams).
        share = slice(self.dist.rank, None, self.dist.world)
        world = self.dist.world
        sample = eval_streams(val_ids, c.eval_streams, c.burn_in, c.eval_chars or None, tags=val_tags, min_rows=world)
        full = eval_streams(val_ids, full_pass_streams(len(val_ids) - 1, c.eval_streams), c.burn_in, tags=val_tags,
                            min_rows=world)
        # The final report is a float32 pass over the whole tail whenever the periodic ones were less: a sample,
        # or in bf16 (periodic passes run in the training precision: 1.6x faster on a bf16 CPU).
        self.needs_full_pass = c.full_final_eval is not False and (full.scored() > sample.scored()
                                                                   or c.precision != "fp32")
        self.val_ids, self.val_tags = val_ids, val_tags
        self.val_rate = 0.0  # validation characters per second of the latest periodic pass (this process)
        self.val_sample_chars, self.val_full_chars = sample.scored(), full.scored()
        self.val_streams, self.val_full = sample.select(share), full  # the final pass selects its own share
        self.n_chunks = self.train_streams.num_chunks(c.seq_len)

        self.optimizer = make_optimizer(self.model, c)
        self.forward = self.model
        if compile_model:
            self.forward = torch.compile(self.model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.forward, device_ids=ids)

        # Where the run stands; everything here goes into a checkpoint and comes back on resume.
        # spent: seconds already used of the budget before training began (the speed probe)
        self.step, self.epoch, self.cursor, self.elapsed = 0, 0, 0, float(spent)
        self.best_val, self.best_step, self.bad_evals = math.inf, 0, 0
        self.chars_seen = 0  # training characters predicted so far, all processes together
        self.metrics: list = []
        self.eval_s = 0.0  # seconds spent in periodic evaluations (and their checkpoints) in this session
        self.state = start_state(self.model, per_rank, device, self.context_id)
        self.best_weights: Optional[dict] = None  # a CPU copy of the best model, for the final full pass
        self.error: Optional[str] = None  # a failure on this process that every process must stop for
        # The latest applied step's loss, learning rate and gradient norm (before clipping), and the latest
        # training speed (characters per second): the evaluation that ends a run at its limit records them.
        self.last_loss, self.last_lr, self.last_norm, self.last_rate = math.nan, math.nan, math.nan, 0.0
        # the limits, the learning rate (with the Restart of a resumed, longer run) and when to evaluate
        self.schedule = schedule.Schedule(config)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self._restore(resume)

    # ------------------------------------------------------------------ the loop
    def request_stop(self, reason: str = "interrupt") -> None:
        """Ask the loop to stop after the current step (signal handlers call this)."""
        self.stop_request = reason

    def run(self) -> TrainResult:
        c = self.config
        started = time.perf_counter() - self.elapsed
        last_report, chars_since = time.perf_counter(), 0
        stopped_by = None
        self.model.train()
        self.schedule.start(self.position(), self.metrics[-1]["elapsed_s"] if self.metrics else None)
        self._cool_down_if_stalled()  # a resumed run whose last evaluations had already stalled it
        while stopped_by is None:
            if not self.dist.enabled:  # under torchrun the clock is rank 0's, agreed in each step's reduce
                self.elapsed = time.perf_counter() - started
            # the same on every process: steps, epochs, the agreed clock
            stopped_by = self.schedule.limit_reached(self.position())
            local = self.stop_request or ("error" if self.error else None)
            if stopped_by or (local and not self.dist.enabled):
                stopped_by = stopped_by or local
                break
            lr = self.schedule.learning_rate(self.position())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, agreed = self.train_step(local, time.perf_counter() - started)
            if agreed:  # a process asked to stop: no process applied this step
                stopped_by = agreed
                break
            if not math.isfinite(loss):
                stopped_by = "nonfinite"
                break
            self.step += 1
            scored = self.train_streams.scored_in_chunk(self.cursor, c.seq_len)
            chars_since += scored
            self.chars_seen += scored
            self.cursor += 1
            if self.cursor == self.n_chunks:  # an epoch ends: streams restart at their beginnings
                self.cursor, self.epoch = 0, self.epoch + 1
                self.state = start_state(self.model, self.my_streams.rows, self.device, self.context_id)
                self._lay_out_epoch()
            now = time.perf_counter()
            rate = chars_since / max(now - last_report, 1e-9)
            self.last_rate = rate
            self.callback("step", {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                                   "chars_per_s": rate, "elapsed_s": now - started,
                                   "progress": self.schedule.progress(self.position()), "grad_norm": self.last_norm,
                                   "limits": self.schedule.limits()})
            if now - last_report > 2.0:
                last_report, chars_since = now, 0
            if self.schedule.eval_due(self.position()):
                self._evaluate_and_save(loss, lr, rate, self.elapsed if self.dist.enabled else now - started)
                self._cool_down_if_stalled()
        if not self.dist.enabled:
            self.elapsed = time.perf_counter() - started
        if stopped_by == "error":
            raise CharlmError(self._agreed_error())
        full_val = None
        if stopped_by in ("max_steps", "epochs", "max_time", "patience"):
            if not self.metrics or self.metrics[-1]["step"] != self.step:
                self._evaluate_and_save(self.last_loss, self.last_lr, self.last_rate, self.elapsed)
                # the run's time includes the evaluation that ends it, as eval_s does (rank 0's clock, as above)
                self.elapsed = from_main(self.dist, lambda: time.perf_counter() - started)
            full_val = self._final_full_pass()
        elif stopped_by == "interrupt":
            self._save(ckpt.LAST)
        return TrainResult(self.step, self.epoch, stopped_by, self.best_val, self.best_step, self.metrics,
                           self.elapsed, full_val, self.eval_s, self.schedule.cooldown)

    def _cool_down_if_stalled(self) -> None:
        """When validation has not improved for `patience` evaluations (and no Cooldown runs yet): back to the
        best weights and their optimizer state, as best.pt holds them, and a Cooldown from the rate the best
        was reached at (schedule.py), unless the schedule ends sooner than a cooldown would. The data keeps
        its place."""
        c = self.config
        if not c.patience or self.bad_evals < c.patience or self.schedule.cooldown is not None:
            return
        if not math.isfinite(self.best_val):  # no evaluation was finite: no best to go back to
            return
        best_lr = next((m["lr"] for m in self.metrics if m["step"] == self.best_step), self.last_lr)
        cooldown = self.schedule.cooldown_at(self.position(), self.best_step, best_lr)
        if cooldown is None:
            return
        best = self._read_best("model", "optimizer")  # None: cool down from where the run stands
        if best is not None:
            self.model.load_state_dict(best[0])
            self.optimizer.load_state_dict(best[1])
        self.schedule.cooldown = cooldown
        self.callback("cooldown", {**cooldown.to_dict(), "best_step": self.best_step, "best_val": self.best_val,
                                   "evaluations": self.bad_evals, "went_back": best is not None})

    def _read_best(self, *keys) -> Optional[tuple]:
        """These parts of best.pt, on every process: only rank 0 wrote it (other machines may not share its
        disk), so rank 0 reads it and sends them; None on every process when it cannot be read."""
        try:
            return from_main(self.dist, lambda: tuple(ckpt.load(self.out_dir / ckpt.BEST)[k] for k in keys))
        except CharlmError:
            return None

    def _lay_out_epoch(self) -> None:
        """For a list of items: this epoch's order of the items, in the same stream layout."""
        if self.reshuffle is None:
            return
        ids, tags = _text_and_tags(self.reshuffle(self.epoch))
        self.train_streams = make_streams(ids, self.config.batch_size, tags=tags)
        self.my_streams = self.train_streams.select(self.my_rows)

    def train_step(self, local_stop: Optional[str], clock: float) -> tuple:
        """One optimizer step. Returns (global mean loss, agreed stop reason or None).

        Host syncs: one per step (the packed values below), and under torchrun one extra all-reduce, which
        carries the loss, the non-finite check, every process's stop requests and rank 0's clock together.
        When any process asks to stop, no process applies the step, so all stop at the same step."""
        c = self.config
        # Dropout masks from (seed, process, step): each process draws its own, and a resumed run draws the
        # same masks as an unbroken one whatever the generator did before.
        torch.manual_seed(_step_seed(c.seed, self.dist.rank, self.step))
        x, y = self.my_streams.chunk(self.cursor, c.seq_len)
        tags = self.my_streams.chunk_tags(self.cursor, c.seq_len)  # (b, t) tag ids, or None
        if tags is not None:  # some rows learn the text untagged this chunk (tags.TAG_DROPOUT)
            dropped = torch.rand(tags.shape[0], 1) < TAG_DROPOUT  # (b, 1) from the step's seeded generator
            tags = torch.where(dropped, torch.full_like(tags, self.model.untagged), tags)
        if self.device.type == "cuda":  # page-locked host memory lets the copy overlap the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device, c.precision):
            if tags is not None:
                logits, state = self.forward(x, self.state, tags.to(self.device))  # (b, t, V)
            else:
                logits, state = self.forward(x, self.state)  # (b, t, V)
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   ignore_index=-1, reduction="sum")
        # Mean over the global batch: every rank divides by the global count, DDP averages over ranks.
        scored = self.train_streams.scored_in_chunk(self.cursor, c.seq_len)
        loss = loss_sum * (self.dist.world / max(scored, 1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm before clipping (what clip_grad_norm_ returns): metrics.jsonl reports it, since a norm far
        # above --clip step after step tells a diverging run from a learning one; DDP's gradients, and so the
        # norm, are the same on every process, hence the division before the sum
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip)
        bad = (~torch.isfinite(norm)).float()
        packed = torch.stack([loss.detach().float() / self.dist.world, bad,
                              norm.detach().float() / self.dist.world])  # (3,)
        agreed = None
        if self.dist.enabled:
            votes = {reason: float(local_stop == reason) for reason in AGREED_STOPS}
            if self.dist.is_main:  # rank 0's clock decides the time limit and the schedule for everyone
                votes["max_time"] = float(bool(c.max_time) and clock >= c.max_time)
            extra = torch.tensor([*votes.values(), clock if self.dist.is_main else 0.0], device=self.device)
            packed = torch.cat([packed, extra])
            dist.all_reduce(packed)
        values = packed.tolist()  # the one host sync of the step
        value, nonfinite = values[0], values[1] > 0
        if self.dist.enabled:
            self.elapsed = values[-1]
            summed = dict(zip(AGREED_STOPS, values[3:3 + len(AGREED_STOPS)]))  # votes of all processes
            agreed = next((reason for reason, votes in summed.items() if votes > 0), None)
        if agreed:
            return value, agreed
        if nonfinite or not math.isfinite(value):
            return math.nan, None
        self.optimizer.step()
        self.state = st.detach(state)  # truncated BPTT: the values carry on, the graph stops here
        self.last_loss, self.last_lr = value, self.optimizer.param_groups[0]["lr"]
        self.last_norm = values[2]
        return value, None

    def _agreed_error(self) -> str:
        """The failure message, the same on every process (the first process's that had one)."""
        if not self.dist.enabled:
            return self.error or "training failed"
        messages = [None] * self.dist.world
        dist.all_gather_object(messages, self.error)
        return next((m for m in messages if m), "another process failed")

    def position(self) -> schedule.Position:
        """Where the run stands, for its Schedule."""
        return schedule.Position(self.step, self.epoch + self.cursor / self.n_chunks, self.elapsed)

    # ------------------------------------------------------------------ evaluation and checkpoints
    def _validate(self, streams=None, precision: Optional[str] = None) -> tuple:
        """(mean loss, characters scored) over every process's share of the validation streams, in the
        training precision unless told otherwise."""
        streams = streams if streams is not None else self.val_streams
        total, count = evaluate(self.model, streams, EVAL_SEQ_LEN, self.device, precision or self.config.precision,
                                self.context_id)
        if self.dist.enabled:
            both = torch.tensor([total, float(count)], dtype=torch.float64 if self.device.type != "mps"
                                else torch.float32, device=self.device)
            dist.all_reduce(both)
            total, count = float(both[0]), float(both[1])
        return total / max(count, 1), int(count)

    def _evaluate_and_save(self, train_loss: float, lr: float, rate: float, elapsed: float) -> None:
        began = time.perf_counter()
        val, scored = self._validate()
        # the fastest pass so far: the first ones pay one-time costs (allocation, warm caches)
        self.val_rate = max(self.val_rate, scored / max(time.perf_counter() - began, 1e-9))
        record = {"step": self.step, "epoch": round(self.epoch + self.cursor / self.n_chunks, 4),
                  "chars": self.chars_seen,
                  "train_loss": train_loss, "val_loss": val, "bpc": val / math.log(2), "lr": lr,
                  "chars_per_s": round(rate, 1), "elapsed_s": round(elapsed, 2), "val_chars": scored,
                  "grad_norm": self.last_norm}  # the latest step's, before clipping
        improved = val < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
            if self.needs_full_pass:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
        record["best"] = improved
        self.metrics.append(record)
        carried = self._gather_state()
        if self.dist.is_main:
            try:
                persist.append_metric(self.out_dir, record)
                if improved:
                    self._save(ckpt.BEST, carried)
                self._save(ckpt.LAST, carried)
            except CharlmError as exc:
                if not self.dist.enabled:
                    raise
                self.error = str(exc)  # every process stops at the next step, with this message
        # eval_s: this session's seconds evaluating and saving, this evaluation's included (trackers plot the share)
        self.callback("eval", {**record, "model": self.model, "eval_s": self.eval_s + time.perf_counter() - began})
        self.model.train()  # a callback may have sampled from the model in eval mode
        cost = time.perf_counter() - began
        self.eval_s += cost
        # Spacing by an evaluation's cost needs a local clock: not under DDP, where all processes must agree.
        self.schedule.evaluated(record["elapsed_s"], 0.0 if self.dist.enabled else cost)

    def _final_full_pass(self) -> Optional[dict]:
        """The best model's float32 loss on the validation text (all of it, or the sample _final_chars
        affords, with its standard error), when the periodic passes read less or in bf16.

        When the periodic passes read a sample, the last step is not the best and the whole text fits twice in
        the report's time (or --full-final-eval asks for all), the last weights are scored on the whole text
        too, and the lower of the two is the run's best: a sample picks its best with the sample's own noise,
        while a run still improving at its end is usually best at its last step (BENCHMARKS.md 10, "The last
        weights beside the sample's best"). Checkpoints are written before the pass starts, and again only if
        the last weights win (_keep_last; atomic files, so an interrupt here loses nothing)."""
        if not self.needs_full_pass or not math.isfinite(self.best_val):
            return None
        self.finishing = True
        candidates = [(self.best_step, self.model)]
        if self.best_step != self.step:
            import copy

            weights = self.best_weights
            if weights is None:  # a resumed run: the best model is the one in best.pt
                best = self._read_best("model")
                if best is None:  # the same on every process: all skip the report
                    return None
                weights = best[0]
            model = copy.deepcopy(self.model)
            model.load_state_dict(weights)
            candidates = [(self.best_step, model)]
            if (self.val_sample_chars < self.val_full_chars and self.metrics[-1]["step"] == self.step
                    and from_main(self.dist, lambda: self._final_chars(passes=2)) >= self.val_full_chars):
                candidates.append((self.step, self.model))
        chars = from_main(self.dist, self._final_chars)  # every process must lay out the same pass
        streams = self.val_full
        if chars < self.val_full_chars:
            rows = max(self.config.eval_streams, full_pass_streams(chars, self.config.eval_streams))
            streams = eval_streams(self.val_ids, rows, self.config.burn_in, chars, tags=self.val_tags)
        mine = streams.select(slice(self.dist.rank, None, self.dist.world))
        passes = len(candidates)
        self.callback("final_start", {"chars": streams.scored(), "of": self.val_full_chars, "step": self.best_step,
                                      "last": self.step if passes > 1 else None,
                                      "estimate_s": passes * streams.scored() / self._fp32_rate()
                                      if self.val_rate else None})
        scores = [self._score_rows(model, mine, k, passes) for k, (_, model) in enumerate(candidates)]
        k = min(range(passes), key=lambda i: scores[i][0])  # the same choice on every process
        loss, sums, counts = scores[k]
        scored = int(counts.sum())
        se = standard_error(sums, counts) if scored < self.val_full_chars else 0.0
        report = {"loss": loss, "chars": scored, "of": self.val_full_chars, "se": se, "step": candidates[k][0]}
        if passes > 1:
            report["compared"] = {"step": candidates[1 - k][0], "loss": scores[1 - k][0]}
        if candidates[k][0] != self.best_step:
            self._keep_last()
        self.callback("final", report)
        return report

    def _score_rows(self, model, rows, k: int, passes: int) -> tuple:
        """(loss, per-row sums, per-row counts) of `model` on this process's `rows` and every other's: the
        k-th of `passes` passes of the final report."""
        def progress(done, total):
            self.callback("final_progress", {"done": k * total + done, "total": passes * total})

        sums = evaluate_rows(model, rows, EVAL_SEQ_LEN, self.device, "fp32", progress, self.context_id)
        counts = rows.hi - rows.lo
        if self.dist.enabled:  # every process's rows, for the total and the standard error
            parts = [None] * self.dist.world
            dist.all_gather_object(parts, (sums, counts))
            sums = np.concatenate([p[0] for p in parts])
            counts = np.concatenate([p[1] for p in parts])
        return float(sums.sum()) / max(int(counts.sum()), 1), sums, counts

    def _keep_last(self) -> None:
        """The last weights scored lower than the sample's best on the whole validation text: they are the
        run's best now, in best.pt and last.pt alike (a resumed run starts from that), and in metrics.jsonl. A
        failed write fails the run as a periodic one does; each file is whole, the old one or the new (a write
        that fails after best.pt leaves the new best.pt beside the old last.pt)."""
        self.best_step, self.best_val, self.bad_evals = self.step, self.metrics[-1]["val_loss"], 0
        self.best_weights = None
        self.metrics[-1]["best"] = True
        carried = self._gather_state()

        def write():
            self._save(ckpt.BEST, carried)
            self._save(ckpt.LAST, carried)
            try:
                persist.rewrite_metrics(self.out_dir, self.metrics)
            except OSError as exc:
                raise CharlmError(f"could not write {self.out_dir / persist.METRICS} ({exc.strerror or exc})")

        agreed(self.dist, write, here=self.dist.is_main)

    def _fp32_rate(self) -> float:
        return self.val_rate / (FP32_OVER_BF16 if self.config.precision == "bf16" else 1.0)

    def _final_chars(self, passes: int = 1) -> int:
        """How many validation characters the final report scores: all of them when asked (or when no
        periodic pass timed the model), else as many as fit in final_share of the budget (the time limit, or
        the time the run took; `passes` models share it), and never fewer than a periodic pass scored or
        FINAL_MIN_CHARS."""
        c = self.config
        if c.full_final_eval or not self.val_rate:
            return self.val_full_chars
        budget = c.max_time or self.elapsed
        affordable = int(self._fp32_rate() * max(c.final_share * budget, FINAL_MIN_S) / passes)
        return min(self.val_full_chars, max(affordable, self.val_sample_chars, FINAL_MIN_CHARS))

    def _gather_state(self) -> list:
        """Every stream's carried state, in stream order (all ranks take part under torchrun)."""
        mine = st.to_list(self.state)
        if not self.dist.enabled:
            return mine
        out = []
        for t in mine:
            parts = [torch.empty_like(t, device=self.device) for _ in range(self.dist.world)]
            dist.all_gather(parts, t.to(self.device).contiguous())
            out.append(torch.cat([p.cpu() for p in parts], dim=1))
        return out

    def _save(self, name: str, carried: Optional[list] = None) -> None:
        if carried is None:
            carried = self._gather_state()
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save(persist.payload(self, carried), self.out_dir / name)
        self.callback("save", {"path": str(self.out_dir / name), "step": self.step})

    def _restore(self, payload: dict) -> None:
        saved = persist.resumed(payload, self.config)
        self.model.load_state_dict(saved.model)
        self.optimizer.load_state_dict(saved.optimizer)
        self.step, self.epoch, self.cursor = saved.step, saved.epoch, saved.cursor
        self._lay_out_epoch()
        self.elapsed, self.best_val, self.best_step = saved.elapsed, saved.best_val, saved.best_step
        self.bad_evals, self.chars_seen, self.metrics = saved.bad_evals, saved.chars_seen, saved.metrics
        # Limits moved further (training longer): warm up from the rate the run had reached instead of
        # jumping to the higher rate of the stretched curve (schedule.py).
        # A run that had stopped improving stays cooled (its resume ends at once) unless --patience 0 asks it to
        # go on: then the rate warms up from where the cooldown left it, as when training longer.
        self.schedule.cooldown = saved.cooldown if self.config.patience else None
        self.schedule.restart = saved.restart if self.schedule.cooldown is not None else schedule.restart_for(
            saved.config, self.config, self.position(), saved.restart, saved.cooldown)
        self.state = st.select_rows(st.from_list(saved.carried, self.device), self.my_rows)
        persist.restore_rng(saved.rng, self.device)
        if self.dist.is_main:  # metrics.jsonl holds exactly the evaluations the resumed state has seen
            persist.rewrite_metrics(self.out_dir, self.metrics)
