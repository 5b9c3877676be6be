"""Scoring text with a model: the stateful pass that validation, `charlm eval` and the final report share."""

from __future__ import annotations

import math
from typing import Optional

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
def evaluate(model: CharRNN, streams: Streams, seq_len: int, device, precision: str = "fp32") -> tuple:
    """A stateful pass: (sum of cross-entropy in nats, number of scored characters).

    Each chunk's sum stays on the device in float32 (every backend has it; MPS has no float64) and the
    chunk sums are added in float64 on the host once, at the end: no host sync per chunk, no precision lost
    over millions of characters."""
    device = torch.device(device)
    # Bound one chunk's logits (rows x T x V floats) to ~16 MB, so a vocabulary of thousands of characters
    # does not make evaluation the largest allocation of a run.
    seq_len = max(8, min(seq_len, LOGITS_PER_CHUNK // max(1, streams.rows * model.config.vocab_size)))
    was_training = model.training
    model.eval()
    state = model.init_state(streams.rows, device)
    n = streams.num_chunks(seq_len)
    sums = torch.zeros(max(n, 1), dtype=torch.float32, device=device)
    pin = device.type == "cuda"
    for k in range(n):
        x, y = streams.chunk(k, seq_len)
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
        with autocast(device, precision):
            logits, state = model(x, state)
        sums[k] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1,
                                  reduction="sum")
    model.train(was_training)
    return float(sums.cpu().double().sum()), streams.scored()


def evaluate_text(model: CharRNN, ids: np.ndarray, device, seq_len: int = EVAL_SEQ_LEN, streams: int = 8,
                  burn_in: int = 256, precision: str = "fp32", max_chars: Optional[int] = None) -> dict:
    """Loss of the model on a text: nats/char, bits/char, perplexity, characters scored (every character
    after the first, or an evenly spread sample of max_chars of them)."""
    layout = eval_streams(ids, streams, burn_in=burn_in, max_chars=max_chars)
    total, count = evaluate(model, layout, seq_len, device, precision)
    return loss_report(total / count, count)


def loss_report(loss: float, chars: int) -> dict:
    return {"loss": loss, "bpc": loss / math.log(2), "perplexity": math.exp(min(loss, 700)), "chars": chars}


def full_pass_streams(pairs: int, base: int = 32) -> int:
    """Streams for a whole-text pass: `base`, widened for long texts (each stream keeps >= 64k characters)
    so that a pass over tens of MB runs as wide batches instead of many small steps."""
    return int(max(base, min(1024, pairs // 65_536)))
