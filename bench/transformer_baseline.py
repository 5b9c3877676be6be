"""Small character transformers, the baselines charlm is measured against: one for lists of words, one for
running text.

Lists (the default mode):

The model and its training follow the published defaults of the best-known small character-level model for
lists of names (makemore's default `--type transformer`): 4 pre-norm blocks of 4-head causal attention and a
4x MLP with tanh-GELU, 64-wide, learned positions, one block as long as the longest word plus one; every word
is a sequence <start> w o r d <end> padded with ignored targets; AdamW at 5e-4, weight decay 0.01, betas
(0.9, 0.99), eps 1e-8, 32 words a step drawn at random with replacement; the held-out words are scored every
500 steps and the best score is the run's (as that tool saves its best model by it: generous to the
baseline, since charlm's figure is its best checkpoint on its own validation sample, then the held-out
words). Written here from that description; nothing of that project's code is in this repository.

    OMP_NUM_THREADS=1 python bench/transformer_baseline.py train.txt held-out.txt --seconds 180 --out r.json

Loss: nats per character of the held-out words, every character and the end of each word counted, as
bench/items.py counts charlm's (`charlm score --rank`: a line's characters and its line break).

Running text (`--text`): the published CPU recipe of the best-known small GPT's character-level Shakespeare
example (nanoGPT's shakespeare_char on a CPU): 4 blocks, 4 heads, 128 wide, no biases, tied input and
output weights, no dropout, 64-character windows drawn at random from the first 90%, 12 a step, 2,000 steps,
AdamW at 1e-3 (warmup 100, cosine to 1e-4 at step 2,000), betas (0.9, 0.99), weight decay 0.1 on matrices,
clip 1.0. Scored on the last 10% cut into 64-character windows, each from an empty context: the same average
context as that recipe's own estimate (random windows, every position). charlm scores the same tail
statefully, which is the point of a recurrent model.

    OMP_NUM_THREADS=1 python bench/transformer_baseline.py --text tinyshakespeare.txt --out r.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH, LAYERS, HEADS = 64, 4, 4
LR, WEIGHT_DECAY, BETAS, EPS, BATCH = 5e-4, 0.01, (0.9, 0.99), 1e-8, 32
EVAL_EVERY = 500


class Block(nn.Module):
    def __init__(self, width: int, heads: int, block: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width, bias=bias), nn.LayerNorm(width, bias=bias)
        self.qkv, self.proj = nn.Linear(width, 3 * width, bias=bias), nn.Linear(width, width, bias=bias)
        self.up, self.down = nn.Linear(width, 4 * width, bias=bias), nn.Linear(4 * width, width, bias=bias)
        self.tanh_gelu = bias  # the list recipe's GELU is the tanh form, the text recipe's the exact one
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, c/h)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, h, T, T)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        gelu = F.gelu(self.up(self.ln2(x)), approximate="tanh" if self.tanh_gelu else "none")
        return x + self.down(gelu)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, block: int, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS,
                 text: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads, block, bias=not text) for _ in range(layers))
        self.ln = nn.LayerNorm(width, bias=not text)
        self.head = nn.Linear(width, vocab, bias=False)
        if text:  # the text recipe: N(0, 0.02) weights, residual projections scaled down, tied embedding
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def encode(words: list, stoi: dict, block: int) -> tuple:
    """(N, block) inputs <start> + word, targets word + <end>, then -1 (ignored)."""
    x = torch.zeros(len(words), block, dtype=torch.long)
    y = torch.full((len(words), block), -1, dtype=torch.long)
    for i, w in enumerate(words):
        ids = [stoi[ch] for ch in w]
        x[i, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        y[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        y[i, len(ids)] = 0
    return x, y


@torch.no_grad()
def held_out(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), 100):
        logits = model(x[i:i + 100])
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i:i + 100].reshape(-1), ignore_index=-1,
                                 reduction="sum").item()
        count += int((y[i:i + 100] >= 0).sum())
    model.train()
    return total / count


def text_run(path: Path, seed: int, seconds: float = 0.0) -> dict:
    """The text recipe (module docstring) on one file; returns its score and what it cost. With `seconds`, the
    recipe is given that wall-clock budget instead of its 2,000 steps: it steps until the time is up, and its
    cosine follows the fraction of the time spent (as charlm's schedule does under --max-time)."""
    began = time.perf_counter()
    torch.manual_seed(seed)
    text = path.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    block, batch, steps, warmup, lr, min_lr = 64, 12, 2000, 100, 1e-3, 1e-4
    model = TinyTransformer(len(chars), block, width=128, layers=4, heads=4, text=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    step, warm_done, t0 = 0, 0.0, time.perf_counter()  # the budget counts from the first step, as --max-time
    while (time.perf_counter() - t0 < seconds) if seconds else step < steps:
        if step < warmup:
            rate = lr * (step + 1) / (warmup + 1)
            warm_done = time.perf_counter() - t0
        else:
            if seconds:
                done = min(1.0, (time.perf_counter() - t0 - warm_done) / max(seconds - warm_done, 1e-9))
            else:
                done = (step - warmup) / (steps - warmup)
            rate = min_lr + 0.5 * (1 + math.cos(math.pi * done)) * (lr - min_lr)
        for group in opt.param_groups:
            group["lr"] = rate
        start = torch.randint(0, len(train) - block - 1, (batch,))
        x = torch.stack([train[i:i + block] for i in start])
        y = torch.stack([train[i + 1:i + 1 + block] for i in start])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        n = (len(val) - 1) // block
        x, y = val[:n * block].view(n, block), val[1:n * block + 1].view(n, block)
        for i in range(0, n, 256):
            logits = model(x[i:i + 256])
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i:i + 256].reshape(-1),
                                     reduction="sum").item()
            count += y[i:i + 256].numel()
    return {"val": total / count, "steps": step, "scored": count,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - began}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", type=Path)
    parser.add_argument("held_out", type=Path, nargs="?")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--text", action="store_true", help="the running-text recipe on TRAIN (split 90/10)")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.text:
        args.out.write_text(json.dumps(text_run(args.train, args.seed, args.seconds or 0.0)))
        return
    if args.held_out is None or args.seconds is None:
        parser.error("a list run takes TRAIN HELD_OUT --seconds S")
    began = time.perf_counter()
    torch.manual_seed(args.seed)
    train = [w for w in args.train.read_text().splitlines() if w]
    test = [w for w in args.held_out.read_text().splitlines() if w]
    chars = sorted(set("".join(train + test)))
    stoi = {ch: i + 1 for i, ch in enumerate(chars)}  # 0 is <start> / <end>
    block = max(len(w) for w in train + test) + 1
    xs, ys = encode(train, stoi, block)
    xt, yt = encode(test, stoi, block)
    model = TinyTransformer(len(chars) + 1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS)
    best, step, last = float("inf"), 0, float("nan")
    while time.perf_counter() - began < args.seconds:
        pick = torch.randint(0, len(xs), (BATCH,))
        logits = model(xs[pick])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ys[pick].reshape(-1), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % EVAL_EVERY == 0:
            best = min(best, held_out(model, xt, yt))
    last = held_out(model, xt, yt)
    best = min(best, last)
    params = sum(p.numel() for p in model.parameters())
    args.out.write_text(json.dumps({"best": best, "last": last, "steps": step, "parameters": params,
                                    "seconds": time.perf_counter() - began}))


if __name__ == "__main__":
    main()
