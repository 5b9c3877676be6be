"""Continuous batching: one background thread owns the model and advances every request together.

A single `CharRNN.step` costs about the same for one row as for eight (each step is one pass over the
weights), so the engine packs every live sample of every request into one batch:

    requests  A (2 samples)  B (1)  C (warming on its prime)
    batch     [A0 A1 B0]  --step--> logits (3, V), state (layers, 3, H)
              C joins between two steps once its prime is read; a finished or abandoned request leaves
              between two steps; the rows that stay are gathered with charlm.state.select_rows and the
              newcomers' rows appended with concat_rows.

A request's rows never mix with another's: each has its own slice of the state and its own
torch.Generator seeded from its seed, and picks its characters with charlm.sample.pick exactly as
`charlm sample` does, so the same seed gives the same text alone, among many clients, or on the command line
(up to float rounding in the batched matrix product). A request never fails another: when one request's
rows cannot go on (their scores are NaN, their pick or their share of the step raises), that request alone
gets a "failed" event and leaves the batch; the others carry on. Work that is not a step (warming on a
prime, scoring a text) is cut into pieces run between steps, so a long prime or text delays the others by
one piece only.

Library code: the engine renders nothing; it hands each request's events to `publish`, which the server
points at its event loop.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch

from charlm import state as st
from charlm.model import CharRNN
from charlm.sample import SampleConfig, StopMatcher, default_context, distribution, pick
from charlm.vocab import Vocabulary

# Text events are handed over at most this often (plus at once for a request's first characters and its
# end): at ~1000 steps per second, publishing every step would wake the server's event loop and write to
# every socket 1000 times a second for a few characters each; 10 ms is still smooth to watch.
PUBLISH_EVERY = 0.01
# Prime characters warmed per request between two steps: ~5 ms of the default model's fused forward on a
# 2-core CPU, so a 4000-character prime costs the other streams a few ms per step, not a stall.
WARM_CHUNK = 256


class Busy(Exception):
    """The engine's queue is full: the caller should answer 503 and the client retry later."""


@dataclass(eq=False)
class Job:
    """One request: `rows` samples that share a prime, a sampling configuration and one generator (as the
    rows of `charlm sample --num-samples N` do). Events go to `deliver(kind, data)`:
    ("text", [delta per row]), ("done", {...}); for a task: ("result", value); or at the end
    ("failed", message) when computing this job went wrong (a NaN, an exception: the server's 500), or
    ("error", message) when the engine could not serve it (shutting down: the server's 503)."""

    deliver: Callable[[str, object], None]
    rows: int = 1
    cfg: Optional[SampleConfig] = None
    prime_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    task: Optional[Iterator] = None  # a non-sampling job: a generator advanced one piece per engine turn
    cancelled: bool = False  # set from any thread; the engine drops the job before its next step
    # Engine-side state:
    generator: Optional[torch.Generator] = None
    state: Optional[st.State] = None  # this job's rows while it warms; then they live in the batch
    logits: Optional[torch.Tensor] = None  # (rows, V)
    warmed: int = 0  # prime characters read so far
    steps: int = 0
    stops: Optional[StopMatcher] = None  # which rows have produced cfg.stop (the rule `charlm sample` uses)
    chars: int = 0

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The batching loop. `submit` from any thread; `publish(events)` is called from the engine thread once
    per turn with a list of (job, kind, data); the default delivers directly."""

    def __init__(self, model: CharRNN, vocab: Vocabulary, device, max_rows: int = 64, max_queued: int = 256,
                 publish: Optional[Callable[[list], None]] = None):
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.publish = publish or (lambda events: [job.deliver(kind, data) for job, kind, data in events])
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._warming: List[Job] = []
        self._tasks: List[Job] = []
        self._active: List[Job] = []  # in batch order
        self._state: Optional[st.State] = None  # (layers, B, H) for the active rows
        self._logits: Optional[torch.Tensor] = None  # (B, V)
        self._outbox: list = []
        self._urgent, self._published = False, 0.0
        self._context = vocab.encode(default_context(vocab))
        self._thread = threading.Thread(target=self._run, name="charlm-engine", daemon=True)
        self.steps = 0  # model steps taken (for /healthz and the load test)

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._stopping:
                raise Busy("the server is shutting down")
            if len(self._inbox) >= self.max_queued:
                raise Busy(f"{len(self._inbox)} requests are already waiting")
            self._inbox.append(job)
        self._wake.set()
        return job

    def stats(self) -> dict:
        return {"active_rows": sum(j.rows for j in self._active), "warming": len(self._warming),
                "queued": len(self._inbox), "steps": self.steps}

    def stop(self) -> None:
        """Ask the loop to stop after its current turn (safe in a signal handler: it does not wait); every
        unfinished job then gets an error event, so open streams end at once."""
        with self._lock:
            self._stopping = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """stop(), then wait for the loop to finish."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread: the engine never needs gradients
        while True:
            with self._lock:
                stopping = self._stopping
            if stopping:
                break
            try:
                self._admit()
                if not (self._active or self._warming or self._tasks):
                    self._flush()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._advance_warming()
                self._advance_tasks()
                if self._active:
                    self._step()
            except Exception as exc:  # a bug in the bookkeeping must not take the server down: fail all in hand
                self._fail_all("failed", _internal(exc))
            if self._urgent or time.perf_counter() - self._published >= PUBLISH_EVERY:
                self._flush()
        self._fail_all("error", "the server is shutting down")
        with self._lock:
            queued, self._inbox = list(self._inbox), collections.deque()
        for job in queued:
            self._emit(job, "error", "the server is shutting down")
        self._flush()

    def _emit(self, job: Job, kind: str, data) -> None:
        self._outbox.append((job, kind, data))
        if kind != "text" or job.steps == 1:  # an end, or the first characters: hand over now
            self._urgent = True

    def _flush(self) -> None:
        self._published, self._urgent = time.perf_counter(), False
        if self._outbox:
            events, self._outbox = self._outbox, []
            self.publish(events)

    def _fail_all(self, kind: str, message: str) -> None:
        for job in self._active + self._warming + self._tasks:
            self._emit(job, kind, message)
        self._active, self._warming, self._tasks = [], [], []
        self._state = self._logits = None

    def _admit(self) -> None:
        """Move queued jobs in, first come first served, while their rows fit under max_rows."""
        rows = sum(j.rows for j in self._active + self._warming)
        with self._lock:
            while self._inbox:
                job = self._inbox[0]
                if job.cancelled:
                    self._inbox.popleft()
                    continue
                if job.task is None and rows + job.rows > self.max_rows and (self._active or self._warming):
                    break
                self._inbox.popleft()
                if job.task is not None:
                    self._tasks.append(job)
                    continue
                rows += job.rows
                seed = job.cfg.seed if job.cfg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                job.generator = torch.Generator(device=self.device).manual_seed(seed)
                job.state = self.model.init_state(job.rows, self.device)
                if len(job.prime_ids) == 0:  # no prime: start after the default context, as `charlm sample`
                    job.prime_ids = self._context
                job.stops = StopMatcher(job.cfg.stop, job.rows)
                self._warming.append(job)

    def _advance_warming(self) -> None:
        """Read the next piece of each warming job's prime with the fused forward pass (as Sampler.feed)."""
        ready = []
        for job in list(self._warming):
            if job.cancelled:
                self._warming.remove(job)
                continue
            piece = job.prime_ids[job.warmed: job.warmed + WARM_CHUNK]
            x = torch.as_tensor(piece, dtype=torch.long, device=self.device).unsqueeze(0).expand(job.rows, -1)
            try:
                logits, job.state = self.model(x, job.state)  # (rows, P, V)
            except Exception as exc:  # this job's prime alone: the others warm on
                self._warming.remove(job)
                self._emit(job, "failed", _internal(exc))
                continue
            job.logits = logits[:, -1]
            job.warmed += len(piece)
            if job.warmed >= len(job.prime_ids):
                self._warming.remove(job)
                ready.append(job)
        for job in [j for j in ready if j.cfg.length == 0]:  # nothing to generate: done once warmed
            self._finish(job)
            ready.remove(job)
        if ready:
            self._regroup(keep=self._active, joining=ready)

    def _advance_tasks(self) -> None:
        for job in list(self._tasks):
            if job.cancelled:
                self._tasks.remove(job)
                continue
            try:
                next(job.task)
            except StopIteration as stop:
                self._tasks.remove(job)
                self._emit(job, "result", stop.value)
            except Exception as exc:
                self._tasks.remove(job)
                self._emit(job, "failed", _internal(exc))

    def _regroup(self, keep: List[Job], joining: List[Job]) -> None:
        """Rebuild the batch from the rows of `keep` (already in it) and the warmed rows of `joining`."""
        offsets, at = {}, 0
        for job in self._active:
            offsets[id(job)] = at
            at += job.rows
        index = [offsets[id(j)] + r for j in keep for r in range(j.rows)]
        states, logits = [], []
        if index:
            rows = torch.tensor(index, device=self.device)
            states.append(st.select_rows(self._state, rows))
            logits.append(self._logits[rows])
        for job in joining:
            states.append(job.state)
            logits.append(job.logits)
            job.state = job.logits = None
        self._active = list(keep) + list(joining)
        if self._active:
            self._state = st.concat_rows(states)  # (layers, B, H)
            self._logits = torch.cat(logits)  # (B, V)
        else:
            self._state = self._logits = None

    def _step(self) -> None:
        """Pick every row's next character with its own job's rules and generator, then one model step."""
        live = [j for j in self._active if not j.cancelled]
        if len(live) != len(self._active):
            self._regroup(keep=live, joining=[])
            if not self._active:
                return
        picks = self._picks()  # per job: its ids (rows,), or the message it fails with
        failed = [j for j, p in zip(self._active, picks) if isinstance(p, str)]
        if failed:
            for job, p in zip(self._active, picks):
                if isinstance(p, str):
                    self._emit(job, "failed", p)
            picks = [p for p in picks if not isinstance(p, str)]
            self._regroup(keep=[j for j in self._active if j not in failed], joining=[])
            if not self._active:
                return
        ids = torch.cat(picks)  # (B,)
        try:
            self._logits, self._state = self.model.step(ids, self._state)
        except Exception:
            ids = self._step_apart(ids)
            if ids is None:
                return
        self.steps += 1
        chars = self.vocab.chars
        flat, at, finished = ids.tolist(), 0, []
        for job in self._active:
            deltas = job.stops.add([chars[i] for i in flat[at: at + job.rows]])
            job.chars += sum(1 for d in deltas if d)
            at += job.rows
            job.steps += 1
            self._emit(job, "text", deltas)
            if job.steps >= job.cfg.length or job.stops.finished:
                finished.append(job)
        if finished:
            for job in finished:
                self._finish(job)
            self._regroup(keep=[j for j in self._active if j not in finished], joining=[])

    def _picks(self) -> list:
        """Each job's picks (rows,) in batch order, or the message it fails with. For the common case
        (temperature only) charlm.sample.distribution runs once for every row sharing a temperature, and each
        job draws from its own rows with its own generator: the same values and the same draw as
        charlm.sample.pick, for a fraction of the calls. The temperature's overflow guard is decided per row,
        so one request's extreme value never changes another's numbers."""
        width = self._logits.shape[-1]

        def plain(cfg) -> bool:  # temperature only: no truncation, no greedy pick
            return not cfg.greedy and not (cfg.top_k and cfg.top_k < width) and cfg.top_p >= 1.0

        shared = {}
        for job in self._active:
            if plain(job.cfg):
                shared.setdefault(job.cfg.temperature, job.cfg)
        probs = {}
        if len(shared) <= 4:  # beyond a few distinct ones, per-job softmaxes are as cheap
            for t, cfg in shared.items():
                probs[t] = distribution(self._logits, cfg)  # (B, V)
        # One check for the whole batch (one sync): a row whose scores are not finite (the model's state has
        # gone NaN) cannot be sampled; its request fails, and only it.
        bad = set()
        if not torch.isfinite(self._logits.sum()):  # finite unless some score is not (or the sum overflows)
            bad = set(torch.nonzero(~torch.isfinite(self._logits).all(dim=-1)).flatten().tolist())
        picks, at = [], 0
        for job in self._active:
            cfg = job.cfg
            if bad.intersection(range(at, at + job.rows)):
                picks.append("the model's scores for the next character are not finite (NaN or infinity): "
                             "this checkpoint cannot continue this text")
            else:
                try:
                    if plain(cfg) and cfg.temperature in probs:
                        p = probs[cfg.temperature][at: at + job.rows]
                        picks.append(torch.multinomial(p, 1, generator=job.generator).squeeze(-1))
                    else:
                        picks.append(pick(self._logits[at: at + job.rows], cfg, job.generator))  # (rows,)
                except Exception as exc:
                    picks.append(_internal(exc))
            at += job.rows
        return picks

    def _step_apart(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The batched step raised: step each job's rows on their own, fail the jobs whose step still raises
        and rebuild the batch from the rest. Returns the surviving rows' ids (None when none survive)."""
        kept, states, logits, kept_ids, at = [], [], [], [], 0
        for job in self._active:
            rows = torch.arange(at, at + job.rows, device=self.device)
            at += job.rows
            try:
                job_logits, job_state = self.model.step(ids[rows], st.select_rows(self._state, rows))
            except Exception as exc:
                self._emit(job, "failed", _internal(exc))
                continue
            kept.append(job)
            states.append(job_state)
            logits.append(job_logits)
            kept_ids.append(ids[rows])
        self._active = kept
        if not kept:
            self._state = self._logits = None
            return None
        self._state, self._logits = st.concat_rows(states), torch.cat(logits)
        return torch.cat(kept_ids)

    def _finish(self, job: Job) -> None:
        reason = "stop" if job.stops is not None and job.stops.finished else "length"
        self._emit(job, "done", {"finish_reason": reason, "chars": job.chars})


def _internal(exc: Exception) -> str:
    return f"internal error ({type(exc).__name__}: {exc})"
