"""Quality per minute: validation loss reached in a fixed wall-clock budget, charlm vs a plain loop.

Runs, one after the other on the same machine in the same invocation:
  1. baseline: a plain hand-written PyTorch loop (embedding -> 2 x 256 tanh nn.RNN -> linear, AdamW 2e-3,
     batch 64 x 128 random windows, constant learning rate, fp32), trained for --minutes;
  2. charlm: `charlm train CORPUS --max-time <minutes>` with its default flags (plus --extra).
Both are scored the same way: a stateful pass over the last 10% of the corpus (nats per character).

    .venv/bin/python bench/quality.py --minutes 10
    .venv/bin/python bench/quality.py --minutes 3 --extra "--cell gru"

Nothing else should run on the machine meanwhile: the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def encode(path: Path):
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    table = {c: i for i, c in enumerate(chars)}
    ids = np.array([table[c] for c in text], dtype=np.int64)
    n_val = int(round(len(ids) * 0.1))
    return ids[:-n_val], ids[-n_val:], len(chars)


class PlainRNN(nn.Module):
    def __init__(self, vocab: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.RNN(hidden, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, h=None):
        y, h = self.rnn(self.embed(x), h)
        return self.out(y), h


@torch.no_grad()
def stateful_val_loss(model, val: np.ndarray, chunk: int = 256) -> float:
    """One stream over the whole validation text, state carried chunk to chunk."""
    model.eval()
    ids = torch.from_numpy(val)
    h, total = None, 0.0
    for a in range(0, len(ids) - 1, chunk):
        x = ids[a : min(a + chunk, len(ids) - 1)].unsqueeze(0)
        y = ids[a + 1 : a + 1 + x.shape[1]].unsqueeze(0)
        logits, h = model(x, h)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
    model.train()
    return total / (len(ids) - 1)


def run_baseline(train: np.ndarray, val: np.ndarray, vocab: int, seconds: float) -> dict:
    torch.manual_seed(0)
    model = PlainRNN(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = torch.from_numpy(train)
    gen = torch.Generator().manual_seed(0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        starts = torch.randint(0, len(data) - 129, (64,), generator=gen)
        block = torch.stack([data[s : s + 129] for s in starts.tolist()])  # (64, 129)
        logits, _ = model(block[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), block[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
    return {"val_loss": stateful_val_loss(model, val), "steps": steps, "seconds": time.perf_counter() - start}


def run_charlm(corpus: Path, minutes: float, extra: str, log: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "charlm", "train", str(corpus), "--max-time", f"{minutes * 60:.0f}s",
               "--out", str(out), "--no-preview", *shlex.split(extra)]
        start = time.perf_counter()
        with open(log, "w") as stderr:  # follow the run live with `tail -f`
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        if done.returncode != 0:
            raise SystemExit(f"charlm train failed:\n{Path(log).read_text()[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        best = min(records, key=lambda r: r["val_loss"])
        sample = subprocess.run([sys.executable, "-m", "charlm", "sample", "-c", str(out), "--seed", "1",
                                 "--length", "400", "--prime", "\n"], capture_output=True, text=True).stdout
        return {"val_loss": best["val_loss"], "steps": records[-1]["step"], "seconds": time.perf_counter() - start,
                "train_loss": best["train_loss"], "command": " ".join(cmd[2:]), "sample": sample}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--extra", default="", help="extra flags for charlm train")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--log", default="charlm-quality.log", help="where charlm train's progress goes")
    args = parser.parse_args()
    if not args.corpus.is_file():
        raise SystemExit(f"{args.corpus} not found; pass --corpus")
    rows = []
    if not args.skip_baseline:
        train, val, vocab = encode(args.corpus)
        rows.append(("plain loop 2x256 tanh RNN", run_baseline(train, val, vocab, args.minutes * 60)))
    rows.append((f"charlm defaults {args.extra}".strip(), run_charlm(args.corpus, args.minutes, args.extra, args.log)))
    base = rows[0][1]["val_loss"]
    print(f"\n{args.minutes:g}-minute budget on {args.corpus.name} (val = last 10%, stateful pass)")
    print(f"{'run':<34} {'val nats':>9} {'val bpc':>8} {'steps':>7} {'vs first':>9}")
    for name, r in rows:
        print(f"{name:<34} {r['val_loss']:9.4f} {r['val_loss'] / math.log(2):8.3f} {r['steps']:7d} "
              f"{r['val_loss'] - base:+9.4f}")
    print("\nsample from charlm's best.pt (seed 1):\n" + rows[-1][1]["sample"])


if __name__ == "__main__":
    main()
