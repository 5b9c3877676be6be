"""Continuous batching: one background thread owns the model and advances every request together.

A single `CharRNN.step` costs about the same for one row as for eight (each step is one pass over the
weights), so the engine packs every live sample of every request into one batch:

    requests  A (2 samples)  B (1)  C (warming on its prime)
    batch     [A0 A1 B0]  --step--> logits (3, V), state (layers, 3, H)
              C joins between two steps once its prime is read; a finished or abandoned request leaves
              between two steps; the rows that stay are gathered with charlm.state.select_rows and the
              newcomers' rows appended with concat_rows.

A tagged model's rows each carry their request's tag (a (B,) tensor beside the state, rebuilt with it).
A request's rows never mix with another's: each has its own slice of the state and its own
torch.Generator seeded from its seed, read through charlm.sample.Uniforms as `charlm sample` reads its own;
every row's character is drawn from charlm.sample.distribution by charlm.sample.draw, as charlm.sample.pick
does, so the same seed gives the same text alone, among many clients, or on the command line (up to float
rounding in the batched matrix product). Only the uniform numbers are the requests' own: the draw is one
batched call for all of them. A request never fails another: when one request's rows cannot go on (their
scores are NaN, their sampling rule or their share of the step raises), that request alone gets a "failed"
event and leaves the batch; the others carry on. Work that is not a step (warming on a prime, scoring a
text) is cut into pieces run between steps, so a long prime or text delays the others by one piece only.

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
from charlm.sample import SampleConfig, StopMatcher, Uniforms, default_context, distribution, draw
from charlm.vocab import Vocabulary

# Text events are handed over at most this often (plus at once for a streaming request's first characters
# and every request's end): at ~1000 steps per second, publishing every step would wake the server's event
# loop and write to every socket 1000 times a second for a few characters each; 10 ms is still smooth to
# watch. A job's characters since the last hand-over go as one event; a job that does not stream (a JSON
# answer) gets all its text in one event at its end.
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
    ("text", [new text per row]) (one or more), ("done", {...}); for a task: ("result", value); or at the end
    ("failed", message) when computing this job went wrong (a NaN, an exception: the server's 500), or
    ("error", message) when the engine could not serve it (shutting down: the server's 503)."""

    deliver: Callable[[str, object], None]
    rows: int = 1
    cfg: Optional[SampleConfig] = None
    prime_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    task: Optional[Iterator] = None  # a non-sampling job: a generator advanced one piece per engine turn
    stream: bool = True  # text as it comes (every PUBLISH_EVERY); False: all of it just before "done"
    tag: Optional[int] = None  # a tagged model: the tag id every row is written in (None: untagged)
    cancelled: bool = False  # set from any thread; the engine drops the job before its next step
    # Engine-side state:
    generator: Optional[torch.Generator] = None
    uniforms: Optional[Uniforms] = None  # the generator's numbers, as `charlm sample` reads them
    state: Optional[st.State] = None  # this job's rows while it warms; then they live in the batch
    logits: Optional[torch.Tensor] = None  # (rows, V)
    warmed: int = 0  # prime characters read so far
    steps: int = 0
    stops: Optional[StopMatcher] = None  # which rows have produced cfg.stop (the rule `charlm sample` uses)
    chars: int = 0
    # Steps not yet handed over: per step, each row's id (no stop string: every row shows its character) or
    # each row's shown text (with one, from `stops`). Decoded once per hand-over, not once per step.
    pending: list = field(default_factory=list)

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
        self._tags: Optional[torch.Tensor] = None  # (B,) each active row's tag id, for a tagged model
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
        if kind != "text":  # an end: the job's text so far goes first, and everything goes now
            self._take_text(job)
            self._urgent = True
        self._outbox.append((job, kind, data))

    def _take_text(self, job: Job) -> None:
        """Queue one "text" event with the job's characters since the last one (per row, joined)."""
        if not job.pending:
            return
        steps, job.pending = job.pending, []
        if job.stops.stop:  # already per-row text
            texts = ["".join(s[r] for s in steps) for r in range(job.rows)]
        else:
            chars = self.vocab.chars
            texts = ["".join([chars[s[r]] for s in steps]) for r in range(job.rows)]
        self._outbox.append((job, "text", texts))

    def _flush(self) -> None:
        self._published, self._urgent = time.perf_counter(), False
        for job in self._active:
            if job.stream:
                self._take_text(job)
        if self._outbox:
            events, self._outbox = self._outbox, []
            self.publish(events)

    def _fail_all(self, kind: str, message: str) -> None:
        for job in self._active + self._warming + self._tasks:
            self._emit(job, kind, message)
        self._active, self._warming, self._tasks = [], [], []
        self._state = self._logits = self._tags = None

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
                job.uniforms = Uniforms(job.generator, job.rows, self.device)
                job.state = self.model.init_state(job.rows, self.device)
                # every job starts after the default context, then reads its prime, as `charlm sample` does
                job.prime_ids = np.concatenate([self._context, job.prime_ids]).astype(np.int64)
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
                logits, job.state = self.model(x, job.state, job.tag)  # (rows, P, V)
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
        self._tags = self._row_tags(self._active)

    def _row_tags(self, jobs: List[Job]) -> Optional[torch.Tensor]:
        """(rows,) the tag id of every row of `jobs` for a tagged model (untagged for a job without one)."""
        if not self.model.config.tags or not jobs:
            return None
        none = self.model.untagged
        return torch.tensor([none if j.tag is None else j.tag for j in jobs for _ in range(j.rows)],
                            dtype=torch.long, device=self.device)

    def _step(self) -> None:
        """Pick every row's next character with its own job's rules and generator, then one model step."""
        live = [j for j in self._active if not j.cancelled]
        if len(live) != len(self._active):
            self._regroup(keep=live, joining=[])
            if not self._active:
                return
        ids, failures = self._picks()  # (rows of the jobs that did not fail,), {job: message}
        if failures:
            for job, message in failures.items():
                self._emit(job, "failed", message)
            self._regroup(keep=[j for j in self._active if j not in failures], joining=[])
            if not self._active:
                return
        try:
            if self._tags is not None:  # a tagged model: every row's tag
                self._logits, self._state = self.model.step(ids, self._state, self._tags)
            else:
                self._logits, self._state = self.model.step(ids, self._state)
        except Exception:
            ids = self._step_apart(ids)
            if ids is None:
                return
        self.steps += 1
        chars = self.vocab.chars
        flat, at, finished = ids.tolist(), 0, []
        for job in self._active:
            block = flat[at: at + job.rows]
            at += job.rows
            if job.stops.stop:  # the stop rule needs every row's character as it comes
                shown = job.stops.add([chars[i] for i in block])
                job.chars += sum(1 for d in shown if d)
                job.pending.append(shown)
            else:  # the ids alone: decoded when handed over
                job.chars += job.rows
                job.pending.append(block)
            job.steps += 1
            if job.steps == 1 and job.stream:  # the first characters: hand over now
                self._urgent = True
            if job.steps >= job.cfg.length or job.stops.finished:
                finished.append(job)
        if finished:
            for job in finished:
                self._finish(job)
            self._regroup(keep=[j for j in self._active if j not in finished], joining=[])

    def _picks(self):
        """Every row's next character, drawn in one batched call (charlm.sample.draw) from each row's
        probabilities under its own job's rules and one uniform number from its job's generator: the same
        numbers and the same draw as charlm.sample.pick. Returns (ids of the rows of the jobs that can go on,
        in batch order; {job: the message it fails with}). For the common case (temperature only)
        charlm.sample.distribution runs once for every row sharing a temperature. The temperature's overflow
        guard is decided per row, so one request's extreme value never changes another's numbers."""
        logits = self._logits
        width = logits.shape[-1]

        def plain(cfg) -> bool:  # temperature only: no truncation, no greedy pick
            return not cfg.greedy and not (cfg.top_k and cfg.top_k < width) and cfg.top_p >= 1.0

        shared = {}
        for job in self._active:
            if plain(job.cfg):
                shared.setdefault(job.cfg.temperature, job.cfg)
        probs = {}
        if len(shared) <= 4:  # beyond a few distinct ones, per-job softmaxes are as cheap
            for t, cfg in shared.items():
                probs[t] = distribution(logits, cfg)  # (B, V)
        # One check for the whole batch (one sync): a row whose scores are not finite (the model's state has
        # gone NaN) cannot be sampled; its request fails, and only it.
        bad = set()
        if not torch.isfinite(logits.sum()):  # finite unless some score is not (or the sum overflows)
            bad = set(torch.nonzero(~torch.isfinite(logits).all(dim=-1)).flatten().tolist())
        failures, pieces, u, at = {}, [], [], 0
        for job in self._active:
            cfg, rows = job.cfg, slice(at, at + job.rows)
            at += job.rows
            if bad.intersection(range(rows.start, rows.stop)):
                failures[job] = ("the model's scores for the next character are not finite (NaN or infinity): "
                                 "this checkpoint cannot continue this text")
                continue
            try:
                if cfg.greedy:  # its most likely character as a certainty: any number draws it; none is read
                    top = logits[rows].argmax(dim=-1)
                    piece, numbers = torch.nn.functional.one_hot(top, width).float(), [0.0] * job.rows
                else:
                    piece = probs[cfg.temperature] if plain(cfg) and cfg.temperature in probs else None
                    # A whole-batch tensor stands for its rows until the pieces are joined (see below).
                    piece = (piece, rows) if piece is not None else distribution(logits[rows], cfg)
                    numbers = job.uniforms.take()
            except Exception as exc:
                failures[job] = _internal(exc)
                continue
            pieces.append(piece)
            u.extend(numbers)
        if not pieces:
            return None, failures
        if not failures and all(isinstance(p, tuple) and p[0] is pieces[0][0] for p in pieces):
            batch = pieces[0][0]  # every row from one shared distribution: no copy (the usual case)
        else:
            batch = torch.cat([p[0][p[1]] if isinstance(p, tuple) else p for p in pieces])
        return draw(batch, torch.tensor(u, dtype=torch.float64)), failures

    def _step_apart(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The batched step raised: step each job's rows on their own, fail the jobs whose step still raises
        and rebuild the batch from the rest. Returns the surviving rows' ids (None when none survive)."""
        kept, states, logits, kept_ids, at = [], [], [], [], 0
        for job in self._active:
            rows = torch.arange(at, at + job.rows, device=self.device)
            at += job.rows
            try:
                args = (ids[rows], st.select_rows(self._state, rows)) + ((job.tag,) if job.tag is not None else ())
                job_logits, job_state = self.model.step(*args)
            except Exception as exc:
                self._emit(job, "failed", _internal(exc))
                continue
            kept.append(job)
            states.append(job_state)
            logits.append(job_logits)
            kept_ids.append(ids[rows])
        self._active = kept
        self._tags = self._row_tags(kept)
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
