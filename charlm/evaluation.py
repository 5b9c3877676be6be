"""Scoring text with a model: the stateful pass that validation, `charlm eval` and the final report share."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from charlm.model import CharRNN, start_state
from charlm.streams import Streams, eval_streams

# Characters each evaluation stream reads per forward call: long chunks amortise the per-call cost and the
# carried state makes the chunk boundary invisible to the loss.
EVAL_SEQ_LEN = 256
LOGITS_PER_CHUNK = 1 << 22


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate_rows(model: CharRNN, streams: Streams, seq_len: int, device, precision: str = "fp32",
                  progress: Optional[Callable[[int, int], None]] = None,
                  context_id: Optional[int] = None) -> np.ndarray:
    """A stateful pass: the sum of cross-entropy in nats of each row of `streams`, (rows,) float64. Every row
    starts where sampling does (model.start_state: after context_id, the text's line break).

    Each chunk's row sums stay on the device in float32 (every backend has it; MPS has no float64) and are
    added in float64 on the host once, at the end: no host sync per chunk, no precision lost over millions
    of characters. progress(done, total) is called after each chunk is queued (a display's bar)."""
    device = torch.device(device)
    # Bound one chunk's logits (rows x T x V floats) to ~16 MB, so a vocabulary of thousands of characters
    # does not make evaluation the largest allocation of a run.
    seq_len = max(8, min(seq_len, LOGITS_PER_CHUNK // max(1, streams.rows * model.config.vocab_size)))
    was_training = model.training
    model.eval()
    state = start_state(model, streams.rows, device, context_id)
    n = streams.num_chunks(seq_len)
    sums = torch.zeros(max(n, 1), streams.rows, dtype=torch.float32, device=device)  # (chunks, rows)
    pin = device.type == "cuda"
    for k in range(n):
        x, y = streams.chunk(k, seq_len)
        tags = streams.chunk_tags(k, seq_len)  # (rows, t) for a tagged text, else None
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
        tags = tags.to(device) if tags is not None else None
        with autocast(device, precision):
            logits, state = model(x, state, tags) if tags is not None else model(x, state)  # (rows, t, V)
        sums[k] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1,
                                  reduction="none").view(y.shape).sum(1)
        if progress is not None:
            progress(k + 1, n)
    model.train(was_training)
    return sums.cpu().double().sum(0).numpy()


def evaluate(model: CharRNN, streams: Streams, seq_len: int, device, precision: str = "fp32",
             context_id: Optional[int] = None) -> tuple:
    """A stateful pass: (sum of cross-entropy in nats, number of scored characters)."""
    sums = evaluate_rows(model, streams, seq_len, device, precision, context_id=context_id)
    return float(sums.sum()), streams.scored()


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
                  progress: Optional[Callable[[int, int], None]] = None, tags: Optional[np.ndarray] = None,
                  context_id: Optional[int] = None) -> dict:
    """Loss of the model on a text: nats/char, bits/char, perplexity, characters scored (every character
    after the first, or an evenly spread sample of max_chars of them, then with its standard error "se")."""
    layout = eval_streams(ids, streams, burn_in=burn_in, max_chars=max_chars, tags=tags)
    sums = evaluate_rows(model, layout, seq_len, device, precision, progress, context_id)
    count = layout.scored()
    report = loss_report(float(sums.sum()) / max(count, 1), count)
    if count < len(ids) - 1:
        report["se"] = standard_error(sums, layout.hi - layout.lo)
        report["of"] = len(ids) - 1
    return report


def perplexity(loss: float) -> float:
    """e^loss, held finite: a run thrown off by a huge learning rate can end thousands of nats out."""
    return math.exp(min(loss, 700))


def loss_report(loss: float, chars: int) -> dict:
    return {"loss": loss, "bpc": loss / math.log(2), "perplexity": perplexity(loss), "chars": chars}


def full_pass_streams(pairs: int, base: int = 32) -> int:
    """Streams for a whole-text pass: `base`, widened for long texts (each stream keeps >= 64k characters)
    so that a pass over tens of MB runs as wide batches instead of many small steps."""
    return int(max(base, min(1024, pairs // 65_536)))


@torch.no_grad()
def nats_under_tags(model: CharRNN, texts, tag_ids, device, context_id: Optional[int] = None,
                    seq_len: int = EVAL_SEQ_LEN, rows: int = 256) -> np.ndarray:
    """(P, K) total nats of each of P texts (id arrays) under each of K tags of a tagged model (tag_ids None:
    (P, 1) under an untagged model): what `charlm classify` ranks. Batched: texts of similar length share a pass, one row per (text, tag), padded
    and masked. With context_id, each row first reads that character (where sampling starts) and every
    character of its text is scored; without it, a text's first character is read and the rest scored."""
    device = torch.device(device)
    tags = list(tag_ids) if tag_ids is not None else [None]  # None: an untagged model, one row per text
    seqs = [np.concatenate([[context_id], np.asarray(t, dtype=np.int64)]) if context_id is not None
            else np.asarray(t, dtype=np.int64) for t in texts]
    out = np.zeros((len(seqs), len(tags)), dtype=np.float64)
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    per_pass = max(1, rows // max(1, len(tags)))
    for a in range(0, len(order), per_pass):
        group = order[a : a + per_pass]
        width = max(len(seqs[i]) for i in group)
        if width < 2:
            continue
        ids = np.zeros((len(group), width), dtype=np.int64)
        lengths = np.array([len(seqs[i]) for i in group])
        for r, i in enumerate(group):
            ids[r, : len(seqs[i])] = seqs[i]
        # every text once per tag: row r * K + k is text group[r] under tags[k]
        x = torch.from_numpy(np.repeat(ids, len(tags), axis=0)).to(device)  # (G*K, width)
        valid = torch.from_numpy(np.repeat(np.arange(width)[None, 1:] < lengths[:, None], len(tags), axis=0))
        row_tags = torch.as_tensor(tags * len(group), dtype=torch.long, device=device) if tag_ids is not None \
            else None  # (G*K,)
        state = model.init_state(x.shape[0], device)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        step = max(8, min(seq_len, LOGITS_PER_CHUNK // max(1, x.shape[0] * model.config.vocab_size)))
        for c in range(0, width - 1, step):
            inputs, targets = x[:, c : c + step], x[:, c + 1 : c + step + 1]
            inputs = inputs[:, : targets.shape[1]]
            logits, state = model(inputs, state, row_tags)  # (G*K, t, V)
            logp = F.log_softmax(logits.float(), -1).gather(2, targets.unsqueeze(2)).squeeze(2)
            total -= (logp * valid[:, c : c + targets.shape[1]].to(device)).double().sum(1)
        out[group] = total.cpu().numpy().reshape(len(group), len(tags))
    model.train(was_training)
    return out
