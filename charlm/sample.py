"""Generation: warm the carried state on a prime, then feed each sampled character back in, one step at a time.

    line break, then prime "hel" --forward (the training path)--> state, logits
    loop: logits --temperature/top-k/top-p--> char c --step(c, state)--> state, logits

Every sample starts where every training and validation stream does (model.start_state): after the text's
line break (default_context), so a prime is read as the start of a line, and never from the bare zero
state, which some LSTMs answer with a cell that counts without end (BENCHMARKS.md 10).
The prefix is never run again: a step costs one pass over the weights whatever the length so far.
`Sampler` keeps the state between calls, so an interactive session can alternate feed() and generate().
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

from charlm.model import CharRNN
from charlm.vocab import Vocabulary


@dataclass(frozen=True)
class SampleConfig:
    length: int = 500  # new characters per sample
    temperature: float = 0.8  # < 1 sharpens the distribution: fewer misspellings, a little less variety
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    greedy: bool = False  # always the most likely character (deterministic, tends to loop)
    num_samples: int = 1
    seed: Optional[int] = None
    stop: Optional[str] = None  # a sample ends early once it has produced this string

    def __post_init__(self):
        if self.length < 0:
            raise ValueError("length must be >= 0")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use greedy for the most likely character)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")


def default_context(vocab: Vocabulary) -> str:
    """What every stream reads first, before a prime or a text: a line break starts text the way a corpus
    usually does."""
    for ch in ("\n", " ", "."):
        if ch in vocab:
            return ch
    return vocab.chars[0]


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, V) / temperature in fp32, every row with a finite top: a temperature so small that
    logits/T overflows (or is 0 in fp32) would make the softmax NaN, so such a row is shifted to put its top
    logit at 0 and divided by at least fp32's smallest normal number: its top stays finite and the rest go to
    -inf (T -> 0 is greedy). Decided per row, so no row's numbers depend on which rows it is batched with."""
    x = logits.float()
    scaled = x / temperature
    if not torch.isfinite(scaled.sum()):  # one cheap test for the usual case; rows are told apart below
        overflow = ~torch.isfinite(scaled).all(dim=-1, keepdim=True)  # (B, 1)
        t = max(temperature, torch.finfo(torch.float32).tiny)
        scaled = torch.where(overflow, (x - x.amax(dim=-1, keepdim=True)) / t, scaled)
    return scaled


def distribution(logits: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """logits (B, V) -> the probabilities (B, V) a sample draws from under cfg's temperature, top-k and
    top-p. The one place this is computed: `charlm sample` and the server's batching engine both draw from it,
    so the same seed gives the same text through either."""
    logits = scale(logits, cfg.temperature)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a character when the ones more likely than it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        drop[:, 0] = False  # explicitly: a top_p below fp32's range would round to 0 and drop it too
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (B, V), u (B,) float64 uniforms in [0, 1) -> ids (B,): row b's character is the first whose
    cumulative probability exceeds u[b] x the row's total (inverse CDF). One batched call for every row,
    whichever generator each row's number came from: the server's engine draws all its requests at once.
    A zero-probability character adds nothing to the sum, so it is never the first to exceed it; and the
    target stays below the total (u <= 1 - 2^-53 rounds u x total below it), so every row finds one."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # (B, V)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


class Uniforms:
    """The uniform numbers one generator gives `rows` rows, one per row per step, drawn BLOCK steps at a
    time: a call into the generator costs as much as the draw itself, so per step it is a slice of a list.
    `charlm sample` and the server's engine both read their numbers through this, so a seed gives the same
    numbers (and text) through either on any device (a CUDA generator's numbers depend on how they are cut
    into calls, so both cut them the same way). A greedy pick reads none."""

    BLOCK = 64

    def __init__(self, generator: Optional[torch.Generator], rows: int, device="cpu"):
        self.generator, self.rows, self.device = generator, rows, device
        self._block: List[float] = []
        self._at = 0

    def take(self) -> List[float]:
        """The next step's number per row, as Python floats (cheap to gather across requests)."""
        if self._at >= len(self._block):
            self._block = torch.rand(self.BLOCK * self.rows, generator=self.generator, dtype=torch.float64,
                                     device=self.device).tolist()
            self._at = 0
        self._at += self.rows
        return self._block[self._at - self.rows: self._at]


def pick(logits: torch.Tensor, cfg: SampleConfig, generator, uniforms: Optional[Uniforms] = None) -> torch.Tensor:
    """logits (B, V) -> ids (B,) under the sampling rules. Each row's draw is one uniform number from
    `uniforms` (a Uniforms over `generator`), or, without one, from a fresh call into `generator`. A row whose
    scores are not finite cannot be sampled: ValueError."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = distribution(logits, cfg)
    if not torch.isfinite(probs.sum()):
        raise ValueError("the model's scores for the next character are not finite (NaN or infinity)")
    if uniforms is not None:
        u = torch.tensor(uniforms.take(), dtype=torch.float64)
    else:
        u = torch.rand(len(probs), generator=generator, dtype=torch.float64, device=probs.device)
    return draw(probs, u)


class Sampler:
    """Holds a model, its vocabulary and the carried state of `batch` parallel samples."""

    def __init__(self, model: CharRNN, vocab: Vocabulary, batch: int = 1, device="cpu", seed: Optional[int] = None):
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.device = torch.device(device)
        self.batch = batch
        self.state = model.init_state(batch, self.device)
        self.logits: Optional[torch.Tensor] = None  # (batch, V): the distribution of the next character
        # A generator of its own: sampling never disturbs the global RNG (training previews rely on this).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.uniforms = Uniforms(self.generator, batch, self.device)
        self.feed(vocab.encode(default_context(vocab)))  # the start state (model.start_state), and its logits

    @torch.no_grad()
    def feed(self, ids) -> None:
        """Advance every sample's state over the same ids, with the chunk-at-a-time path training uses."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.numel() == 0:
            return
        x = ids.unsqueeze(0).expand(self.batch, -1)  # (batch, P)
        logits, self.state = self.model(x, self.state)  # (batch, P, V)
        self.logits = logits[:, -1]

    @torch.no_grad()
    def generate(self, cfg: SampleConfig) -> Iterator[List[str]]:
        """Yield one character per sample per step (an empty string once a sample has hit cfg.stop)."""
        chars = self.vocab.chars
        stops = StopMatcher(cfg.stop, self.batch)
        for _ in range(cfg.length):
            ids = pick(self.logits, cfg, self.generator, self.uniforms)  # (batch,)
            self.logits, self.state = self.model.step(ids, self.state)
            yield stops.add([chars[i] for i in ids.tolist()])
            if stops.finished:
                return


class StopMatcher:
    """Which of `rows` samples have produced the stop string: the one rule for `charlm sample`, the library's
    sampler and the server's engine. Only generated characters count (a stop string in the prime ends
    nothing), and a stop string may arrive across any number of steps: each row keeps its last len(stop)
    characters. A row that has stopped shows "" from then on; the stop string itself is kept."""

    def __init__(self, stop: Optional[str], rows: int):
        self.stop = stop or ""
        self.done = [False] * rows
        self._tails = [""] * rows

    def add(self, chars: List[str]) -> List[str]:
        """One step's character per row -> what each row shows: its character, or "" once it has stopped."""
        shown = []
        for r, ch in enumerate(chars):
            if self.done[r]:
                shown.append("")
                continue
            shown.append(ch)
            if self.stop:
                self._tails[r] = (self._tails[r] + ch)[-len(self.stop):]
                self.done[r] = self._tails[r] == self.stop
        return shown

    @property
    def finished(self) -> bool:
        """Every row has produced the stop string (never, without one)."""
        return bool(self.stop) and all(self.done)


def stream_text(model: CharRNN, vocab: Vocabulary, prime: str, cfg: SampleConfig, device="cpu") -> Iterator[List[str]]:
    """sample_text a step at a time: each step's new character per sample ("" for a sample that has
    stopped), the prime not included. What `charlm sample` streams to stdout as it is written."""
    sampler = Sampler(model, vocab, cfg.num_samples, device, cfg.seed)
    if prime:
        sampler.feed(vocab.encode(prime))
    yield from sampler.generate(cfg)


def sample_text(model: CharRNN, vocab: Vocabulary, prime: str, cfg: SampleConfig, device="cpu") -> List[str]:
    """Whole samples, each starting with the prime: the library form of `charlm sample`."""
    texts = [[prime] for _ in range(cfg.num_samples)]
    for step in stream_text(model, vocab, prime, cfg, device):
        for b, ch in enumerate(step):
            texts[b].append(ch)
    return ["".join(t) for t in texts]
