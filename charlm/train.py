"""The training loop: teacher forcing over carried-state streams, clipping, schedule, evaluation, checkpoints.

The Trainer knows nothing about the command line. It reports through `callback(event, data)` with events
"step" (every optimizer step), "eval" (every evaluation), "save" (a checkpoint written), and for the final
report "final_start", "final_progress" (each chunk) and "final", and returns a TrainResult. The limits, the
learning rate and the evaluation cadence are plain functions and a small object in schedule.py. Under torchrun each process owns a contiguous block of the B streams and carries their states;
DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import json
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
from charlm import schedule
from charlm import state as st
from charlm.autosize import EVAL_CHARS
from charlm.errors import CharlmError
from charlm.files import write_atomic
from charlm.evaluation import EVAL_SEQ_LEN, autocast, evaluate, evaluate_rows, full_pass_streams, standard_error
from charlm.model import CharRNN
from charlm.optim import AdamW
from charlm.runtime import Dist, from_main
from charlm.streams import eval_streams, make_streams

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
# Periodic evaluations by time come at most once per this many times their own cost: ~3% of the run at most.
EVAL_SPACING = 30


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # streams per step: enough rows to keep the matrix units busy on 2 cores
    seq_len: int = 128  # characters per truncated-BPTT chunk; the state carries context beyond it
    lr: float = 3e-3  # peak learning rate: beat 2e-3 by 0.03 nats in a 10-minute GRU run (BENCHMARKS.md)
    min_lr_frac: float = 0.05  # the cosine decay ends at this fraction of lr: most of the gain of decay
    warmup_steps: int = 50  # linear warmup protects the first steps from large, noisy updates
    weight_decay: float = 0.01  # AdamW only, on weight matrices (not biases)
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
    # The final report scores the best model in float32 on the validation text. None: all of it when that
    # fits in final_share of the budget (at least FINAL_MIN_S), else an evenly spread sample that does, with
    # its standard error (the end of a run stays inside its budget on a 10 GB corpus); True: all of it
    # whatever it costs; False: no final pass (the best periodic figure stands).
    full_final_eval: Optional[bool] = None
    final_share: float = 0.05
    patience: int = 10  # stop after this many evaluations without a new best; 0 = never stop early
    val_frac: float = 0.1  # the tail of the corpus held out for validation
    seed: int = 1337
    precision: str = "fp32"  # fp32 or bf16 (autocast); the CLI resolves "auto" per device
    eval_streams: int = 32  # parallel streams of the validation pass: 1.4x faster than 8, same loss to 1e-4
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
    stopped_by: str  # "max_steps", "epochs", "max_time", "patience", "interrupt", "nonfinite", "error"
    best_val_loss: float
    best_step: int
    metrics: list = field(default_factory=list)
    elapsed_s: float = 0.0
    # the final report: {"loss", "chars" scored, "of" (the validation text's), "se" (0 when all), "step"}
    full_val: Optional[dict] = None
    eval_s: float = 0.0  # seconds of this session spent in periodic evaluations and their checkpoints


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
    ):
        self.model = model.to(device)
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.meta = meta  # model_config, vocab, corpus: copied into every checkpoint
        self.callback = callback or (lambda event, data: None)
        self.dist = dist_info
        self.stop_request: Optional[str] = None
        self.finishing = False  # True during the final full evaluation, after the last checkpoint

        c = config
        # reshuffle(epoch) -> the training text of that epoch (items.py: the items in a new order each
        # epoch); the layout below is rebuilt from it whenever an epoch begins
        self.reshuffle = reshuffle
        if reshuffle is not None:
            train_ids = reshuffle(0)
        self.train_streams = make_streams(train_ids, c.batch_size)
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
        sample = eval_streams(val_ids, c.eval_streams, c.burn_in, c.eval_chars or None)
        full = eval_streams(val_ids, full_pass_streams(len(val_ids) - 1, c.eval_streams), c.burn_in)
        # The final report is a float32 pass over the whole tail whenever the periodic ones were less: a sample,
        # or in bf16 (periodic passes run in the training precision: 1.6x faster on a bf16 CPU).
        self.needs_full_pass = c.full_final_eval is not False and (full.scored() > sample.scored()
                                                                   or c.precision != "fp32")
        self.val_ids = val_ids
        self._val_rate = 0.0  # validation characters per second of the latest periodic pass (this process)
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
        self.state = self.model.init_state(per_rank, device)
        self.best_weights: Optional[dict] = None  # a CPU copy of the best model, for the final full pass
        self.error: Optional[str] = None  # a failure on this process that every process must stop for
        # Where a longer budget took over the schedule of a resumed run (schedule.py), else None.
        self.restart: Optional[schedule.Restart] = None
        self.cadence = schedule.EvalCadence(EVAL_SPACING)  # when evaluations by time fall due
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
        self.cadence.resume(self._progress(), self.metrics[-1]["elapsed_s"] if self.metrics else None)
        while stopped_by is None:
            if not self.dist.enabled:  # under torchrun the clock is rank 0's, agreed in each step's reduce
                self.elapsed = time.perf_counter() - started
            stopped_by = self._limit_reached()  # the same on every process: steps, epochs, agreed clock
            local = self.stop_request or ("error" if self.error else None)
            if stopped_by or (local and not self.dist.enabled):
                stopped_by = stopped_by or local
                break
            lr = schedule.learning_rate(c, self.step, self._progress(), self.restart)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, agreed = self._train_step(local, time.perf_counter() - started)
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
                self.state = self.model.init_state(self.my_streams.rows, self.device)
                self._lay_out_epoch()
            now = time.perf_counter()
            rate = chars_since / max(now - last_report, 1e-9)
            self._last_rate = rate
            self.callback("step", {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                                   "chars_per_s": rate, "elapsed_s": now - started, "progress": self._progress(),
                                   "grad_norm": self._last_norm,
                                   "limits": self._limits()})
            if now - last_report > 2.0:
                last_report, chars_since = now, 0
            if self._eval_due():
                self._evaluate_and_save(loss, lr, rate, self.elapsed if self.dist.enabled else now - started)
                if c.patience and self.bad_evals >= c.patience:
                    stopped_by = "patience"
        if not self.dist.enabled:
            self.elapsed = time.perf_counter() - started
        if stopped_by == "error":
            raise CharlmError(self._agreed_error())
        full_val = None
        if stopped_by in ("max_steps", "epochs", "max_time", "patience"):
            if not self.metrics or self.metrics[-1]["step"] != self.step:
                self._evaluate_and_save(self._last_loss, self._last_lr, self._last_rate, self.elapsed)
            full_val = self._final_full_pass()
        elif stopped_by == "interrupt":
            self._save(ckpt.LAST)
        return TrainResult(self.step, self.epoch, stopped_by, self.best_val, self.best_step, self.metrics,
                           self.elapsed, full_val, self.eval_s)

    def _lay_out_epoch(self) -> None:
        """For a list of items: this epoch's order of the items, in the same stream layout."""
        if self.reshuffle is None:
            return
        self.train_streams = make_streams(self.reshuffle(self.epoch), self.config.batch_size)
        self.my_streams = self.train_streams.select(self.my_rows)

    _last_loss, _last_lr, _last_rate, _last_norm = math.nan, math.nan, 0.0, math.nan
    # Stops that every process must agree on (a signal, a failure, rank 0's clock), in the step's reduce.
    _AGREED = ("interrupt", "error", "max_time")

    def _train_step(self, local_stop: Optional[str], clock: float) -> tuple:
        """One optimizer step. Returns (global mean loss, agreed stop reason or None).

        Host syncs: one per step (the packed values below), and under torchrun one extra all-reduce, which
        carries the loss, the non-finite check, every process's stop requests and rank 0's clock together.
        When any process asks to stop, no process applies the step, so all stop at the same step."""
        c = self.config
        # Dropout masks from (seed, process, step): each process draws its own, and a resumed run draws the
        # same masks as an unbroken one whatever the generator did before.
        torch.manual_seed(_step_seed(c.seed, self.dist.rank, self.step))
        x, y = self.my_streams.chunk(self.cursor, c.seq_len)
        if self.device.type == "cuda":  # page-locked host memory lets the copy overlap the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device, c.precision):
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
            flags = [float(local_stop == reason) for reason in self._AGREED]
            if self.dist.is_main:  # rank 0's clock decides the time limit and the schedule for everyone
                flags[2] = float(bool(c.max_time) and clock >= c.max_time)
            extra = torch.tensor(flags + [clock if self.dist.is_main else 0.0], device=self.device)
            packed = torch.cat([packed, extra])
            dist.all_reduce(packed)
        values = packed.tolist()  # the one host sync of the step
        value, nonfinite = values[0], values[1] > 0
        if self.dist.enabled:
            self.elapsed = values[-1]
            agreed = next((reason for reason, flag in zip(self._AGREED, values[3:6]) if flag > 0), None)
        if agreed:
            return value, agreed
        if nonfinite or not math.isfinite(value):
            return math.nan, None
        self.optimizer.step()
        self.state = st.detach(state)  # truncated BPTT: the values carry on, the graph stops here
        self._last_loss, self._last_lr = value, self.optimizer.param_groups[0]["lr"]
        self._last_norm = values[2]
        return value, None

    def _agreed_error(self) -> str:
        """The failure message, the same on every process (the first process's that had one)."""
        if not self.dist.enabled:
            return self.error or "training failed"
        messages = [None] * self.dist.world
        dist.all_gather_object(messages, self.error)
        return next((m for m in messages if m), "another process failed")

    # ------------------------------------------------------------------ evaluation cadence
    def _eval_due(self) -> bool:
        if self.config.eval_every:
            return self.step % self.config.eval_every == 0
        return self.cadence.due(self._progress(), self.elapsed)

    # ------------------------------------------------------------------ stop limits and schedule
    def position(self) -> schedule.Position:
        return schedule.Position(self.step, self.epoch + self.cursor / self.n_chunks, self.elapsed)

    def _limits(self) -> dict:
        return schedule.limits(self.config)

    def _progress(self) -> float:
        return schedule.progress(self.config, self.position())

    def _limit_reached(self) -> Optional[str]:
        return schedule.limit_reached(self.config, self.position())

    # ------------------------------------------------------------------ evaluation and checkpoints
    def _validate(self, streams=None, precision: Optional[str] = None) -> tuple:
        """(mean loss, characters scored) over every process's share of the validation streams, in the
        training precision unless told otherwise."""
        streams = streams if streams is not None else self.val_streams
        total, count = evaluate(self.model, streams, EVAL_SEQ_LEN, self.device, precision or self.config.precision)
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
        self._val_rate = max(self._val_rate, scored / max(time.perf_counter() - began, 1e-9))
        record = {"step": self.step, "epoch": round(self.epoch + self.cursor / self.n_chunks, 4),
                  "chars": self.chars_seen,
                  "train_loss": train_loss, "val_loss": val, "bpc": val / math.log(2), "lr": lr,
                  "chars_per_s": round(rate, 1), "elapsed_s": round(elapsed, 2), "val_chars": scored,
                  "grad_norm": self._last_norm}  # the latest step's, before clipping
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
                self._write_metric(record)
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
        self.cadence.record(record["elapsed_s"], 0.0 if self.dist.enabled else cost)

    def _final_full_pass(self) -> Optional[dict]:
        """The best model's float32 loss on the validation text (all of it, or the sample _final_chars
        affords, with its standard error), when the periodic passes read less or in bf16. Every checkpoint is written before it starts, so an interrupt here (self.finishing) loses nothing."""
        if not self.needs_full_pass or not math.isfinite(self.best_val):
            return None
        self.finishing = True
        model = self.model
        if self.best_step != self.step:
            import copy

            weights = self.best_weights
            if weights is None:  # a resumed run: the best model is the one in best.pt, which only rank 0 wrote
                try:  # (other machines may not share its disk): rank 0 reads it and sends it to every process
                    weights = from_main(self.dist, lambda: ckpt.load(self.out_dir / ckpt.BEST)["model"])
                except CharlmError:  # the same on every process: all skip the report
                    return None
            model = copy.deepcopy(self.model)
            model.load_state_dict(weights)
        chars = from_main(self.dist, self._final_chars)  # every process must lay out the same pass
        streams = self.val_full
        if chars < self.val_full_chars:
            rows = max(self.config.eval_streams, full_pass_streams(chars, self.config.eval_streams))
            streams = eval_streams(self.val_ids, rows, self.config.burn_in, chars)
        mine = streams.select(slice(self.dist.rank, None, self.dist.world))
        self.callback("final_start", {"chars": streams.scored(), "of": self.val_full_chars, "step": self.best_step,
                                      "estimate_s": streams.scored() / self._fp32_rate() if self._val_rate else None})

        def progress(done, total):
            self.callback("final_progress", {"done": done, "total": total})

        sums = evaluate_rows(model, mine, EVAL_SEQ_LEN, self.device, "fp32", progress)
        counts = mine.hi - mine.lo
        if self.dist.enabled:  # every process's rows, for the total and the standard error
            parts = [None] * self.dist.world
            dist.all_gather_object(parts, (sums, counts))
            sums = np.concatenate([p[0] for p in parts])
            counts = np.concatenate([p[1] for p in parts])
        scored = int(counts.sum())
        loss = float(sums.sum()) / max(scored, 1)
        se = standard_error(sums, counts) if scored < self.val_full_chars else 0.0
        report = {"loss": loss, "chars": scored, "of": self.val_full_chars, "se": se, "step": self.best_step}
        self.callback("final", report)
        return report

    def _fp32_rate(self) -> float:
        return self._val_rate / (FP32_OVER_BF16 if self.config.precision == "bf16" else 1.0)

    def _final_chars(self) -> int:
        """How many validation characters the final report scores: all of them when asked (or when no
        periodic pass timed the model), else as many as fit in final_share of the budget (the time limit, or
        the time the run took), and never fewer than a periodic pass scored or FINAL_MIN_CHARS."""
        c = self.config
        if c.full_final_eval or not self._val_rate:
            return self.val_full_chars
        budget = c.max_time or self.elapsed
        affordable = int(self._fp32_rate() * max(c.final_share * budget, FINAL_MIN_S))
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

    def payload(self, carried: Optional[list] = None) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {**self.meta, "train_config": self.config.to_dict(),
                "model": ckpt.clean_state_dict(self.model.state_dict()),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "cursor": self.cursor, "carried_state": carried if carried is not None else st.to_list(self.state),
                "rng": rng, "elapsed_s": self.elapsed, "best_val_loss": self.best_val, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "chars_seen": self.chars_seen, "metrics": list(self.metrics),
                "schedule_restart": self.restart.to_dict() if self.restart else None}

    def _save(self, name: str, carried: Optional[list] = None) -> None:
        if carried is None:
            carried = self._gather_state()
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save(self.payload(carried), self.out_dir / name)
        self.callback("save", {"path": str(self.out_dir / name), "step": self.step})

    def _write_metric(self, record: dict) -> None:
        try:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as exc:
            raise CharlmError(f"could not append to {self.out_dir / 'metrics.jsonl'} ({exc.strerror or exc})")

    def _restore(self, payload: dict) -> None:
        saved = payload.get("train_config", {})
        for key in ("batch_size", "seq_len"):
            if key in saved and saved[key] != getattr(self.config, key):
                flag = "--" + key.replace("_", "-")
                raise CharlmError(f"{flag} {getattr(self.config, key)} differs from the run's {saved[key]}; "
                                  f"resume with {flag} {saved[key]}")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step, self.epoch, self.cursor = int(payload["step"]), int(payload["epoch"]), int(payload["cursor"])
        self._lay_out_epoch()
        self.elapsed = float(payload.get("elapsed_s", 0.0))
        self.best_val = float(payload.get("best_val_loss", math.inf))
        self.best_step = int(payload.get("best_step", 0))
        self.bad_evals = int(payload.get("bad_evals", 0))
        self.chars_seen = int(payload.get("chars_seen", 0))
        self.metrics = list(payload.get("metrics", []))
        # Limits moved further (training longer): warm up from the rate the run had reached instead of
        # jumping to the higher rate of the stretched curve (schedule.py).
        saved_restart = payload.get("schedule_restart")
        saved_restart = schedule.Restart(**saved_restart) if saved_restart else None
        old = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}) \
            if saved else self.config
        self.restart = schedule.restart_for(old, self.config, self.position(), saved_restart)
        carried = st.from_list(payload["carried_state"], self.device)
        self.state = st.select_rows(carried, self.my_rows)
        rng = payload.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.dist.is_main:  # metrics.jsonl holds exactly the evaluations the resumed state has seen
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
