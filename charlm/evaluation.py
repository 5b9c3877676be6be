"""Scoring text with a model: the stateful pass that validation, `charlm eval` and the final report share."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from charlm.model import CharRNN
from charlm.streams import Streams, eval_streams

# Characters each evaluation stream reads per forward call: long chunks amortise the per-call cost and the
# carried state makes the chunk boundary invisible to the loss.
EVAL_SEQ_LEN = 256
LOGITS_PER_CHUNK = 1 << 22


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate_rows(model: CharRNN, streams: Streams, seq_len: int, device, precision: str = "fp32",
                  progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """A stateful pass: the sum of cross-entropy in nats of each row of `streams`, (rows,) float64.

    Each chunk's row sums stay on the device in float32 (every backend has it; MPS has no float64) and are
    added in float64 on the host once, at the end: no host sync per chunk, no precision lost over millions
    of characters. progress(done, total) is called after each chunk is queued (a display's bar)."""
    device = torch.device(device)
    # Bound one chunk's logits (rows x T x V floats) to ~16 MB, so a vocabulary of thousands of characters
    # does not make evaluation the largest allocation of a run.
    seq_len = max(8, min(seq_len, LOGITS_PER_CHUNK // max(1, streams.rows * model.config.vocab_size)))
    was_training = model.training
    model.eval()
    state = model.init_state(streams.rows, device)
    n = streams.num_chunks(seq_len)
    sums = torch.zeros(max(n, 1), streams.rows, dtype=torch.float32, device=device)  # (chunks, rows)
    pin = device.type == "cuda"
    for k in range(n):
        x, y = streams.chunk(k, seq_len)
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
        with autocast(device, precision):
            logits, state = model(x, state)  # (rows, t, V)
        sums[k] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1,
                                  reduction="none").view(y.shape).sum(1)
        if progress is not None:
            progress(k + 1, n)
    model.train(was_training)
    return sums.cpu().double().sum(0).numpy()


def evaluate(model: CharRNN, streams: Streams, seq_len: int, device, precision: str = "fp32") -> tuple:
    """A stateful pass: (sum of cross-entropy in nats, number of scored characters)."""
    return float(evaluate_rows(model, streams, seq_len, device, precision).sum()), streams.scored()


def standard_error(row_sums: np.ndarray, row_counts: np.ndarray) -> float:
    """The standard error of the mean loss of a sample made of rows: the spread of the rows' own mean losses
    (each row a contiguous segment, so the dependence between neighbouring characters stays inside it),
    weighted by their lengths. 0 for a single row."""
    counts = np.asarray(row_counts, dtype=np.float64)
    keep = counts > 0
    sums, counts = np.asarray(row_sums, dtype=np.float64)[keep], counts[keep]
    if len(counts) < 2:
        return 0.0
    weights = counts / counts.sum()
    mean = float((sums).sum() / counts.sum())
    spread = float((weights * (sums / counts - mean) ** 2).sum()) * len(counts) / (len(counts) - 1)
    return math.sqrt(spread * float((weights ** 2).sum()))


def evaluate_text(model: CharRNN, ids: np.ndarray, device, seq_len: int = EVAL_SEQ_LEN, streams: int = 8,
                  burn_in: int = 256, precision: str = "fp32", max_chars: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Loss of the model on a text: nats/char, bits/char, perplexity, characters scored (every character
    after the first, or an evenly spread sample of max_chars of them, then with its standard error "se")."""
    layout = eval_streams(ids, streams, burn_in=burn_in, max_chars=max_chars)
    sums = evaluate_rows(model, layout, seq_len, device, precision, progress)
    count = layout.scored()
    report = loss_report(float(sums.sum()) / max(count, 1), count)
    if count < len(ids) - 1:
        report["se"] = standard_error(sums, layout.hi - layout.lo)
        report["of"] = len(ids) - 1
    return report


def loss_report(loss: float, chars: int) -> dict:
    return {"loss": loss, "bpc": loss / math.log(2), "perplexity": math.exp(min(loss, 700)), "chars": chars}


def full_pass_streams(pairs: int, base: int = 32) -> int:
    """Streams for a whole-text pass: `base`, widened for long texts (each stream keeps >= 64k characters)
    so that a pass over tens of MB runs as wide batches instead of many small steps."""
    return int(max(base, min(1024, pairs // 65_536)))
