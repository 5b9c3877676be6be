"""Defaults that size themselves: the model and the batch layout chosen from the text, the budget and the
measured speed of the device, so that `charlm train FILE` gives about the best model the time allows.

The rule, in four lines and a note (the measurements behind each constant are in BENCHMARKS.md, "Auto defaults"):

    D  characters the run will read: budget seconds x measured chars/s (or steps x B x T, or epochs x N)
    P  parameters: the largest model with P <= ANCHOR_P x (D / ANCHOR_D)^EXPONENT (what the budget can
       train; bigger models learn more per character, so P grows as about the square root of D) and
       P <= DATA_PARAMS_PER_CHAR x N (a small text cannot feed a big model)
    B x T  the characters of one step: D / TARGET_STEPS (at least ~1,400 updates, enough for the schedule to
       work) up to MAX_STEP_CHARS (2,048 until D passes 8M, then growing as sqrt(D): a longer budget buys
       mostly more steps, not wider ones), or that widest step for a small alphabet read about once
       (D <= READ_ONCE x N) in at least MIN_STEPS updates; never so small that a step's fixed cost dominates,
       and never below MIN_STEP_CHARS a process (16 x 64 in one), whatever that leaves of the updates;
       T = 64 or 128
    dropout  by how often the run will see each character: D / N epochs; AdamW's weight decay likewise
    (and the sample each periodic evaluation scores: D / 125 characters, 16,384 to 65,536)

The input is one-hot while the vocabulary is small (a gather, no weights) and a learned embedding beyond
ONE_HOT_MAX characters, its width growing with the vocabulary; when a time budget is too short to read
SHORT_PLAN characters the input is narrower (it learns sooner): a small embedding in place of one-hot, and
half the width for a large vocabulary. Speed comes from a probe of a second or two on the real device (two
sizes of the real cell), fitted as seconds per step = c0 + c1 x FLOPs per step: c0 is the fixed cost of a
step (kernel launches, the optimizer), c1 the inverse of the achieved FLOP rate.
Everything here but `probe` is a pure function of its arguments.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

from charlm.model import GATES, ModelConfig, layer_parameter_counts
from charlm.units import human_count, human_time

# The size a budget can train grows more slowly than what it reads: P = ANCHOR_P x (D / ANCHOR_D)^EXPONENT.
# Two measured anchors fix it: the 2 x 512 GRU (2.5M parameters) was best for 10 minutes of Tiny Shakespeare
# on 2 cores, reading 12M characters; a 0.8M-parameter model was best for 45 s of a 25k-character text,
# reading ~0.9M (BENCHMARKS.md): 2.5M/0.8M over 12M/0.9M gives the exponent.
ANCHOR_P, ANCHOR_D, EXPONENT = 2.5e6, 12e6, 0.45
# A text of N characters feeds at most this many parameters per character: the 25k-character notes were
# best with a 0.8M-parameter model under dropout, 30x; far beyond that the model only memorises.
DATA_PARAMS_PER_CHAR = 30.0
TARGET_STEPS = 1400  # updates per run the layout aims at: the best 10-minute layout made ~1,400, the best
# 3-minute one 1,444 (32 x 64 against 56 x 64 at 915 steps: 0.08 nats/char better, same model)
# Wider steps buy little in a run of minutes: in every cell of the sweep the best layout read ~2,048 characters
# a step, at 3 minutes (1,260-1,444 steps, 2.7M characters read) and at 10 minutes alike (32 x 64 beat 38 x 128
# by 0.044 nats/char with the same 2 x 384 model, ~6M read): the gradient noise of a small step costs less than
# the updates a wide step gives up. A longer run can use wider steps (the useful batch grows as the loss
# falls), so the cap grows as the square root of the characters read beyond MAX_STEP_AT; that part is an
# extrapolation (no GPU has measured it).
MAX_STEP_CHARS, MAX_STEP_AT = 2048, 8e6
MIN_STEPS = 400  # fewer updates than this and the schedule has no room: steps get smaller, to MIN_STEP_CHARS
# 16 x 64: the best layout for 45 s of a 25k text. No step (a process's share of it) is narrower, not for more
# updates (MIN_STEPS) nor for the logits' memory (LOGITS_PER_STEP): 16 streams beat the 8-10 those two gave 1.2M
# characters of Chinese (6,174 distinct) by 0.43-0.49 nats/char at 1 minute and 0.04 at 3, side by side
# (BENCHMARKS.md 10, "The narrowest step"). A step of a few streams reads a few places in the text, and the
# weights chase what is written there (train 2.4-2.6 nats/char against validation 5.1), most of all where each
# place has its own characters.
MIN_STEP_CHARS = 1024
ONE_HOT_MAX = 256  # one-hot input up to this vocabulary; an embedding beyond (its matrix would dominate)
# ...except in a short run: there a 32-wide learned embedding beat one-hot input, side by side, by 0.27-0.35
# nats/char (90 s of a 262 KB manual) and 0.10-0.18 (1 and 3 minutes of Tiny Shakespeare; BENCHMARKS.md 10),
# (why, measured later: at PyTorch's initial scale its N(0, 1) rows fed the first layer a 5x stronger signal
# than one-hot columns; model.INPUT_STD now starts both at the same strength, which closed most of the gap:
# 0.015 left at 600 steps, none at 2,000, BENCHMARKS.md 10). Applied where it was measured: time budgets whose
# plan reads up to SHORT_PLAN characters: 3-minute runs read ~2.7M, and 10-minute ones 5-9M (there too, one
# thread each side by side on Tiny Shakespeare: 1.4823 against one-hot's 1.5158, both before INPUT_STD). Longer
# runs and step or epoch budgets keep one-hot, the input they were measured with. It was 12M until a faster
# CPU step (recurrence.py, and freed memory kept) made ten minutes of Tiny Shakespeare on two threads plan
# 14.4M: one-hot there scored 1.4146 where the embedding had scored 1.4042 at a 8.7M plan (BENCHMARKS.md 10).
# A large alphabet's embedding is halved in a short run for the same reason: side by side at 1 minute, one
# thread each, half of embedding_for's width won on four texts of 641-6,174 distinct characters by
# 0.03-0.11 nats/char (BENCHMARKS.md 10, "A narrower input for a large alphabet in a short run").
SMALL_EMBEDDING, SHORT_PLAN = 32, 20e6
# A plan that reads its text up to this many times reads it "about once": the weaker weight decay
# (_weight_decay), and the widest step for a small alphabet (_layout)
READ_ONCE = 2.0
# ...and beyond this many passes it reads it "many times": the strongest decay
READ_MANY = 5.0
# AdamW's weight decay for a run that reads its text about once, a few times, many times (_weight_decay)
WEIGHT_DECAY_ONCE, WEIGHT_DECAY_REREAD, WEIGHT_DECAY_MANY = 0.01, 0.1, 0.3
HIDDEN_SIZES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# B x T x V of one step that a wider step may not pass (~64 MB a copy; the loss keeps about four): 2,048
# characters of a 7,800-character vocabulary. It was 4M, which held 6,174 Chinese characters to 10 x 64 steps;
# at 10 minutes 32 x 64 beat that by 0.17 nats/char (BENCHMARKS.md 10). The narrowest step (MIN_STEP_CHARS) may
# pass it: 1,024 characters of a 20,000-character vocabulary hold 20M floats.
LOGITS_PER_STEP = 16_000_000


@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds per training step = step_s + flop_s x FLOPs of the step (forward and backward)."""

    step_s: float  # fixed cost of one step
    flop_s: float  # seconds per FLOP actually achieved
    probe_s: float = 0.0  # wall time the probe took (it counts against --max-time)

    def chars_per_s(self, flops_per_char: float, chars_per_step: int) -> float:
        return chars_per_step / (self.step_s + self.flop_s * flops_per_char * chars_per_step)


@dataclass(frozen=True)
class Choice:
    hidden: int
    layers: int
    embedding: int
    dropout: float
    batch_size: int  # streams, all processes together
    seq_len: int
    parameters: int
    planned_chars: int  # D: characters the run is expected to read
    reason: str
    weight_decay: float = WEIGHT_DECAY_ONCE  # AdamW's, on the weight matrices (_weight_decay)

    def to_dict(self) -> dict:
        return asdict(self)


def trainable(planned: float) -> float:
    """The parameters a run that reads `planned` characters can train well (the anchors above)."""
    return ANCHOR_P * (max(planned, 1.0) / ANCHOR_D) ** EXPONENT


def parameters(cell: str, vocab: int, hidden: int, layers: int, embedding: int) -> int:
    """The model's parameter count: model.py's per-layer formula, summed."""
    config = ModelConfig(vocab_size=vocab, cell=cell, hidden=hidden, layers=layers, embedding=embedding)
    return sum(count for _, _, count in layer_parameter_counts(config))


def train_flops_per_char(cell: str, vocab: int, hidden: int, layers: int, embedding: int) -> float:
    """Forward and backward (3x the forward's 2 FLOPs per weight) per character; the one-hot input layer
    is a dense product in the fused kernels, so it counts at its full width."""
    g = GATES[cell]
    inp, total = embedding or vocab, 0.0
    for _ in range(layers):
        total += 2 * g * hidden * (inp + hidden)
        inp = hidden
    return 3.0 * (total + 2 * hidden * vocab)


def embedding_for(vocab: int, short: bool = False) -> int:
    """0 (one-hot) for small vocabularies, else a power of two near 3 x sqrt(V), 32..256. In a short run
    (`short`: a time budget whose plan reads up to SHORT_PLAN characters) a narrower input learns sooner:
    SMALL_EMBEDDING for a small vocabulary, half the width (at least SMALL_EMBEDDING) for a large one."""
    if vocab <= ONE_HOT_MAX:
        return SMALL_EMBEDDING if short else 0
    width = int(min(256, max(32, 2 ** round(math.log2(3 * math.sqrt(vocab))))))
    return max(SMALL_EMBEDDING, width // 2) if short else width


def layers_for(hidden: int) -> int:
    return 1 if hidden <= 64 else 2  # a second layer pays from ~100 units; a third rarely does in minutes


def _layout(planned: float, n_train: int, world: int, gpu: bool, vocab: int = 0, efficient: float = 0.0) -> tuple:
    """(B, T): about TARGET_STEPS steps over the planned characters (more when a step would exceed the
    widest step for this plan; that widest step for a small alphabet read about once), but no step smaller
    than `efficient` characters (below it the fixed cost of a step dominates and the device idles) unless
    that would leave fewer than MIN_STEPS steps, and a wider step's logits (B x T x V floats, kept about four
    times over by the loss and its gradient) under LOGITS_PER_STEP; never fewer than MIN_STEP_CHARS
    characters a process, and within what the text can fill."""
    widest = MAX_STEP_CHARS * max(1.0, planned / MAX_STEP_AT) ** 0.5
    # A plan that reads a text of a small alphabet about once aims at the widest step, not at TARGET_STEPS
    # updates: every character is new, and a wide step reads more of them a second (16 rows of a 2 x 256 GRU
    # read 75% of what 32 read on a bf16 CPU: a step's fixed cost is half of a 16-row one). At 1 minute, one
    # thread each side by side, 32 streams beat the 16 that TARGET_STEPS gave by 0.067 nats/char on Tiny
    # Shakespeare and 0.096 on Python's sources (0.9 and 0.3 passes planned). Not for thousands of characters,
    # whose decoder costs every row alike (Chinese, 6,174: 32 streams made 290 steps where 16 made 545, and
    # lost 0.077), nor for a text read several times (a 250 KB manual wanted the updates: +0.061);
    # BENCHMARKS.md 10, "Wide steps for a text read once".
    once = planned <= READ_ONCE * n_train and vocab <= ONE_HOT_MAX
    aim = widest if once else min(planned / TARGET_STEPS, widest)
    per_step = max(min(max(aim, efficient),
                       planned / MIN_STEPS,
                       LOGITS_PER_STEP / max(vocab, 1)),
                   MIN_STEP_CHARS * world)
    seq_len = 128 if per_step >= 4096 else 64
    cap = 1024 if gpu else 64 * world  # a CPU is busy at 64 rows per process; a GPU wants far more
    batch = int(min(cap, round(per_step / seq_len)))
    return _fit(batch, seq_len, n_train, world)


def _fit(batch: int, seq_len: int, n_train: int, world: int) -> tuple:
    """Fewer streams for a small text: each stream holds at least four chunks of its own."""
    batch = max(world, batch - batch % world)
    while batch > world and n_train / batch < 4 * seq_len:
        batch = max(world, batch // 2 - (batch // 2) % world)
    return batch, seq_len


def _dropout(epochs: float) -> float:
    """By how often the run reads each character. A run of minutes stops before it overfits much, so dropout
    stays light for longer than in long trainings: 0.1 beat 0.2 by 0.08 nats/char at 10-15 epochs (3-minute
    sweep, 250k characters); 0.3 was as good as 0.1 at 96 epochs (25k characters)."""
    if epochs <= 1.0:
        return 0.0  # every character is new: nothing to overfit
    if epochs <= 20.0:
        return 0.1
    return 0.2 if epochs <= 60 else 0.3


def _weight_decay(epochs: float) -> float:
    """AdamW's decay on the weight matrices, by how often the run reads each character (as dropout): a text
    read about once needs no pull toward zero, one read over and over does. Side by side, one thread each
    (BENCHMARKS.md 10, "Weight decay"), 0.1 in place of 0.01 lost 0.012-0.027 nats/char where the plan read
    the text once or a little more (Tiny Shakespeare and python-stdlib at 1 minute, python-stdlib at 3: 1.1
    passes planned), and won 0.008 at three passes (Tiny Shakespeare, 3 minutes), 0.029-0.037 at five and
    more (a 250 KB manual, 25k characters of Tang poems) and 0.035 in ten minutes of Tiny Shakespeare. Past
    READ_MANY passes 0.3 beat 0.1 in every pair (BENCHMARKS.md 10, "Weight decay for a text read many
    times"): 0.119 on the Tang poems at 1 minute, 0.037 on 250 KB of fortunes, 0.020 on 31,000 names and
    0.019 on a 250 KB manual at 3; ten minutes of Tiny Shakespeare (7 passes) 0.004."""
    if epochs <= READ_ONCE:
        return WEIGHT_DECAY_ONCE
    return WEIGHT_DECAY_REREAD if epochs <= READ_MANY else WEIGHT_DECAY_MANY


def choose(n_train: int, vocab: int, cell: str = "gru", seconds: Optional[float] = None,
           steps: Optional[int] = None, epochs: Optional[float] = None, speed: Optional[DeviceSpeed] = None,
           world: int = 1, gpu: bool = False, fixed: Optional[dict] = None) -> Choice:
    """The sizes for a run, from the training characters, the vocabulary, the budget (any of seconds, steps,
    epochs: the tightest wins) and the device's speed (needed for a time budget). `fixed` holds the values
    the user gave (hidden, layers, embedding, batch_size, seq_len, dropout, weight_decay): they are kept,
    and the rest fit around them."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    if "embedding" not in fixed and seconds:
        wide = choose(n_train, vocab, cell, seconds, steps, epochs, speed, world, gpu,
                      {**fixed, "embedding": embedding_for(vocab)})  # one-hot for a small alphabet
        if wide.planned_chars > SHORT_PLAN:
            return wide
        # a short run: the same rule around a narrower input (its plan differs a little: a cheaper first layer)
        return choose(n_train, vocab, cell, seconds, steps, epochs, speed, world, gpu,
                      {**fixed, "embedding": embedding_for(vocab, short=True)})
    embedding = fixed.get("embedding", embedding_for(vocab))
    cap_params = DATA_PARAMS_PER_CHAR * n_train

    def layout(planned: Optional[float], efficient: float = 0.0) -> tuple:
        if planned is None or (steps and not seconds):  # a step budget keeps the standard step size
            batch, seq = _layout(64 * world * 128 * TARGET_STEPS, n_train, world, gpu, vocab)
        else:
            batch, seq = _layout(planned, n_train, world, gpu, vocab, efficient)
        return fixed.get("batch_size", batch), fixed.get("seq_len", seq)

    def efficient_step(flops: float) -> float:
        """Characters per step at which the fixed cost of a step is two thirds of it: more, smaller steps beat
        fewer, fuller ones down to there (the 3-minute sweep: 32 x 64 beat 35 x 128 by 0.18 nats/char)."""
        if speed is None or speed.flop_s <= 0:
            return 0.0
        return world * speed.step_s / (2 * speed.flop_s * flops)

    def plan(hidden: int) -> tuple:
        layers = fixed.get("layers", layers_for(hidden))
        # the embedding table is a lookup: each row learns only from its own character, at no compute cost,
        # so it does not count toward the size the budget must train
        params = parameters(cell, vocab, hidden, layers, embedding) - vocab * embedding
        flops = train_flops_per_char(cell, vocab, hidden, layers, embedding)
        limits = [epochs * n_train] if epochs else []
        batch, seq = layout(None)
        if seconds and speed is not None:
            for _ in range(3):  # the step size depends on the plan, the plan on the speed at that step size
                rate = world * speed.chars_per_s(flops, max(1, batch * seq // world))
                guess = rate * max(1.0, seconds - speed.probe_s) * 0.95  # ~5% goes to evaluations
                batch, seq = layout(min(limits + [guess]), efficient_step(flops))
            limits.append(guess)
        if steps:
            limits.append(steps * batch * seq)
        planned = min(limits) if limits else 10.0 * n_train
        return layers, params, planned, flops

    if "hidden" in fixed:
        hidden = fixed["hidden"]
        layers, params, planned, flops = plan(hidden)
    else:
        hidden = HIDDEN_SIZES[0]
        layers, params, planned, flops = plan(hidden)
        for h in HIDDEN_SIZES[1:]:
            lay, par, pla, flo = plan(h)
            if par > trainable(pla) or par > cap_params:
                break
            hidden, layers, params, planned, flops = h, lay, par, pla, flo
    batch, seq = layout(planned, efficient_step(flops))
    dropout = fixed.get("dropout", _dropout(planned / max(n_train, 1)))
    decay = fixed.get("weight_decay", _weight_decay(planned / max(n_train, 1)))
    return Choice(hidden, layers, embedding, dropout, batch, seq, params, int(planned),
                  _reason(hidden, layers, embedding, cell, n_train, vocab, seconds, steps, epochs, planned), decay)


# Validation characters a periodic evaluation scores at most (they track the full pass to 0.01 nats/char,
# BENCHMARKS.md 9) and at least (fewer and a minute's run compares its checkpoints on noise).
EVAL_CHARS, EVAL_CHARS_MIN = 65_536, 16_384


def eval_chars(planned: float) -> int:
    """Validation characters a periodic evaluation scores: 1/125 of what the run reads, within the bounds
    above. A forward pass scores ~4x as fast as training reads, so ten of them cost ~2% of the run: a
    2-minute run gets its five lines and more, and a 10-minute one reads all EVAL_CHARS. The sample is fixed
    for the run, so its evaluations compare like with like."""
    return int(min(EVAL_CHARS, max(EVAL_CHARS_MIN, round(planned / 125 / 1024) * 1024)))


def _reason(hidden, layers, embedding, cell, n_train, vocab, seconds, steps, epochs, planned) -> str:

    budget = []
    if seconds:
        budget.append(human_time(seconds) if seconds >= 60 else f"{seconds:.0f} s")
    if steps:
        budget.append(f"{steps:,} steps")
    if epochs:
        budget.append(f"{epochs:g} epochs")
    inp = f"embedding {embedding}" if embedding else "one-hot"
    return (f"{layers} x {hidden} {cell}, {inp}: {human_count(n_train)} characters, {vocab} distinct, "
            f"{', '.join(budget)}; plans to read {human_count(planned)} characters")


def flags(choice: Choice) -> str:
    """The command-line flags that reproduce a choice exactly."""
    return (f"--hidden {choice.hidden} --layers {choice.layers} --embedding {choice.embedding} "
            f"--dropout {choice.dropout:g} --weight-decay {choice.weight_decay:g} --batch-size {choice.batch_size} "
            f"--seq-len {choice.seq_len}")


def probe(device, cell: str, vocab: int, embedding: int, precision: str, world: int = 1,
          limit_s: float = 3.0) -> DeviceSpeed:
    """Time a few training steps of the real cell at two sizes on the real device, and fit the cost model.
    About a second on a CPU, never much more than limit_s (a busy machine gets fewer timed steps); the
    seconds are reported so that they count against --max-time."""
    import torch
    import torch.nn.functional as F

    from charlm.evaluation import autocast
    from charlm.model import CharRNN
    from charlm.optim import AdamW

    began = time.perf_counter()
    torch_state = torch.get_rng_state()
    points = []
    batch, seq = 32, 64
    for hidden in (128, 384):
        model = CharRNN(ModelConfig(vocab_size=vocab, cell=cell, hidden=hidden, layers=2, dropout=0.0,
                                    embedding=embedding)).to(device)
        opt = AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, vocab, (batch, seq), device=device)
        state = model.init_state(batch, device)
        times = []
        for i in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, precision):
                logits, _ = model(x, state)
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), x.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as every training step does
            opt.step()
            loss.item()
            times.append(time.perf_counter() - t0)
            if i >= 1 and time.perf_counter() - began > limit_s:
                break
        step_s = min(times[1:] or times)  # the fastest timed step (the first warms up; others' jobs slow steps)
        points.append((train_flops_per_char(cell, vocab, hidden, 2, embedding) * batch * seq, step_s))
        if time.perf_counter() - began > limit_s:
            break
    torch.set_rng_state(torch_state)
    if len(points) == 1:  # out of time after one size: all of its cost is taken as FLOPs
        (f1, t1), = points
        return DeviceSpeed(0.0, t1 / f1, time.perf_counter() - began)
    (f1, t1), (f2, t2) = points
    flop_s = max((t2 - t1) / (f2 - f1), t2 / f2 * 0.25)
    step_s = max(t1 - flop_s * f1, 0.0)
    return DeviceSpeed(step_s, flop_s, time.perf_counter() - began)
