"""The training loop: teacher forcing over carried-state streams, clipping, schedule, evaluation, checkpoints.

The Trainer knows nothing about the command line. It reports through `callback(event, data)` with events
"step" (every optimizer step), "eval" (every evaluation) and "save" (a checkpoint written), and returns a
TrainResult. Under torchrun each process owns a contiguous block of the B streams and carries their states;
DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from charlm import checkpoint as ckpt
from charlm import state as st
from charlm.corpus import Streams, make_streams
from charlm.errors import CharlmError
from charlm.model import CharRNN
from charlm.runtime import Dist

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")


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
    eval_every: int = 200  # optimizer steps between validation passes (and checkpoints)
    patience: int = 10  # stop after this many evaluations without a new best; 0 = never stop early
    val_frac: float = 0.1  # the tail of the corpus held out for validation
    seed: int = 1337
    precision: str = "fp32"  # fp32 or bf16 (autocast); the CLI resolves "auto" per device
    eval_streams: int = 32  # parallel streams of the validation pass: 1.4x faster than 8, same loss to 1e-4
    burn_in: int = 256  # characters that warm each validation stream but the first (corpus.py)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    step: int
    epoch: int
    stopped_by: str  # "max_steps", "epochs", "max_time", "patience", "interrupt", "nonfinite", "no_limit"
    best_val_loss: float
    best_step: int
    metrics: list = field(default_factory=list)
    elapsed_s: float = 0.0


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, alpha=0.95)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay from lr to min_lr_frac*lr as progress (0..1) toward the first stop
    limit advances. With no limit at all the rate stays at lr after warmup."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_frac
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model: CharRNN, streams: Streams, seq_len: int, device, precision: str = "fp32") -> tuple:
    """A stateful pass: (sum of cross-entropy in nats, number of scored characters)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    state = model.init_state(streams.rows, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for k in range(streams.num_chunks(seq_len)):
        x, y = streams.chunk(k, seq_len)
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits, state = model(x, state)
        total += F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1, reduction="sum"
        ).double()
    model.train(was_training)
    return float(total), streams.scored()


def evaluate_text(model: CharRNN, ids: np.ndarray, device, seq_len: int = 256, streams: int = 8,
                  burn_in: int = 256, precision: str = "fp32") -> dict:
    """Loss of the model on a whole text: nats/char, bits/char, perplexity, characters scored."""
    layout = make_streams(ids, streams, burn_in=burn_in)
    total, count = evaluate(model, layout, seq_len, device, precision)
    return loss_report(total / count, count)


def loss_report(loss: float, chars: int) -> dict:
    return {"loss": loss, "bpc": loss / math.log(2), "perplexity": math.exp(min(loss, 700)), "chars": chars}


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
    ):
        self.model = model.to(device)
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.meta = meta  # model_config, vocab, corpus: copied into every checkpoint
        self.callback = callback or (lambda event, data: None)
        self.dist = dist_info
        self.stop_request: Optional[str] = None

        c = config
        self.train_streams = make_streams(train_ids, c.batch_size)
        if self.train_streams.rows % self.dist.world:
            raise CharlmError(
                f"--batch-size {self.train_streams.rows} is not divisible by the {self.dist.world} processes; "
                "pick a multiple of the process count"
            )
        per_rank = self.train_streams.rows // self.dist.world
        self.my_rows = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        self.my_streams = self.train_streams.select(self.my_rows)
        val = make_streams(val_ids, c.eval_streams, burn_in=c.burn_in)
        self.val_streams = val.select(slice(self.dist.rank, None, self.dist.world))
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
        self.step, self.epoch, self.cursor, self.elapsed = 0, 0, 0, 0.0
        self.best_val, self.best_step, self.bad_evals = math.inf, 0, 0
        self.chars_seen = 0  # training characters predicted so far, all processes together
        self.metrics: list = []
        self.state = self.model.init_state(per_rank, device)
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
        while stopped_by is None:
            self.elapsed = time.perf_counter() - started
            stopped_by = self._agreed_stop(self._limit_reached() or self.stop_request)
            if stopped_by:
                break
            lr = learning_rate(c, self.step, self._progress())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self._train_step()
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
            now = time.perf_counter()
            rate = chars_since / max(now - last_report, 1e-9)
            self._last_rate = rate
            self.callback("step", {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                                   "chars_per_s": rate, "elapsed_s": now - started, "progress": self._progress(),
                                   "limits": self._limits()})
            if now - last_report > 2.0:
                last_report, chars_since = now, 0
            if self.step % c.eval_every == 0:
                self._evaluate_and_save(loss, lr, rate, now - started)
                if c.patience and self.bad_evals >= c.patience:
                    stopped_by = "patience"
        self.elapsed = time.perf_counter() - started
        if stopped_by in ("max_steps", "epochs", "max_time", "no_limit") and (
            not self.metrics or self.metrics[-1]["step"] != self.step
        ):
            self._evaluate_and_save(self._last_loss, self._last_lr, self._last_rate, self.elapsed)
        elif stopped_by == "interrupt":
            self._save(ckpt.LAST)
        return TrainResult(self.step, self.epoch, stopped_by, self.best_val, self.best_step, self.metrics, self.elapsed)

    _last_loss, _last_lr, _last_rate = math.nan, math.nan, 0.0

    def _train_step(self) -> float:
        c = self.config
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
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip)
        value = loss.item() / self.dist.world  # this rank's share of the global mean
        if self.dist.enabled:  # the global mean; every rank must also agree on a non-finite loss
            total = torch.tensor([value], device=self.device)
            dist.all_reduce(total)
            value = total.item()
        if not (math.isfinite(value) and torch.isfinite(norm)):
            return math.nan
        self.optimizer.step()
        self.state = st.detach(state)  # truncated BPTT: the values carry on, the graph stops here
        self._last_loss, self._last_lr = value, self.optimizer.param_groups[0]["lr"]
        return value

    # ------------------------------------------------------------------ stop limits and schedule
    def _limits(self) -> dict:
        c = self.config
        return {k: v for k, v in (("max_steps", c.max_steps), ("epochs", c.epochs), ("max_time", c.max_time)) if v}

    def _progress(self) -> float:
        """How far the run is toward its nearest stop limit, 0..1 (the schedule and the progress bar)."""
        c = self.config
        fractions = []
        if c.max_steps:
            fractions.append(self.step / c.max_steps)
        if c.epochs:
            fractions.append((self.epoch + self.cursor / self.n_chunks) / c.epochs)
        if c.max_time:
            fractions.append(self.elapsed / c.max_time)
        return max(fractions) if fractions else 0.0

    def _limit_reached(self) -> Optional[str]:
        c = self.config
        if c.max_steps and self.step >= c.max_steps:
            return "max_steps"
        if c.epochs and self.epoch + self.cursor / self.n_chunks >= c.epochs - 1e-12:
            return "epochs"
        if c.max_time and self.elapsed >= c.max_time:
            return "max_time"
        return None

    def _agreed_stop(self, reason: Optional[str]) -> Optional[str]:
        """Under torchrun all ranks stop together, at the same step, with the same clock (rank 0's view of
        elapsed time wins, via a max), so their learning rates and stop decisions never diverge."""
        if not self.dist.enabled:
            return reason
        codes = ["", "max_steps", "epochs", "max_time", "patience", "interrupt"]
        flag = torch.tensor([float(codes.index(reason or "")), self.elapsed], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.elapsed = float(flag[1])
        return codes[int(flag[0])] or None

    # ------------------------------------------------------------------ evaluation and checkpoints
    def _validate(self) -> float:
        total, count = evaluate(self.model, self.val_streams, self.config.seq_len, self.device)
        if self.dist.enabled:
            both = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
            dist.all_reduce(both)
            total, count = float(both[0]), float(both[1])
        return total / max(count, 1)

    def _evaluate_and_save(self, train_loss: float, lr: float, rate: float, elapsed: float) -> None:
        val = self._validate()
        record = {"step": self.step, "epoch": round(self.epoch + self.cursor / self.n_chunks, 4),
                  "chars": self.chars_seen,
                  "train_loss": train_loss, "val_loss": val, "bpc": val / math.log(2), "lr": lr,
                  "chars_per_s": round(rate, 1), "elapsed_s": round(elapsed, 2)}
        improved = val < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
        else:
            self.bad_evals += 1
        record["best"] = improved
        self.metrics.append(record)
        carried = self._gather_state()
        if self.dist.is_main:
            self._write_metric(record)
            if improved:
                self._save(ckpt.BEST, carried)
            self._save(ckpt.LAST, carried)
        self.callback("eval", {**record, "model": self.model})
        self.model.train()  # a callback may have sampled from the model in eval mode

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
                "bad_evals": self.bad_evals, "chars_seen": self.chars_seen, "metrics": list(self.metrics)}

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
        self.elapsed = float(payload.get("elapsed_s", 0.0))
        self.best_val = float(payload.get("best_val_loss", math.inf))
        self.best_step = int(payload.get("best_step", 0))
        self.bad_evals = int(payload.get("bad_evals", 0))
        self.chars_seen = int(payload.get("chars_seen", 0))
        self.metrics = list(payload.get("metrics", []))
        carried = st.from_list(payload["carried_state"], self.device)
        self.state = st.select_rows(carried, self.my_rows)
        rng = payload.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.dist.is_main:  # metrics.jsonl holds exactly the evaluations the resumed state has seen
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.out_dir / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(m) + "\n" for m in self.metrics), encoding="utf-8")
            os.replace(tmp, self.out_dir / "metrics.jsonl")
