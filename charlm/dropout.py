"""Dropout for training on a CPU, with a mask that costs half of PyTorch's.

On a CPU `F.dropout` draws its mask with `bernoulli_`: one Mersenne Twister draw per element, on one thread
whatever the thread count. For the default model's two dropouts (between the layers and before the decoder,
38 x 64 x 384 values each) that was 6 ms of a 120 ms step on two threads. Here one 64-bit draw serves four
elements: each 16-bit lane of it is compared with a threshold, so the draws are a quarter as many and the
rest is two vectorised kernels. bench/recurrence.py --against bernoulli times the step both ways
(BENCHMARKS.md 10, "A cheaper dropout mask").

    words  (n/4,) int64, random_(): 63 random bits each (bit 63 is always 0)
    << 1   the 63 random bits fill bits 1..63; bit 0 is 0, so the lane of bits 0-15 takes even values only
    lanes  (n,) int16 view: four per word, each uniform over its values; keep where lane >= -32768 + q

q = 2 x round(p x 32768) dropped values of 65,536, the same in all four lanes (the lane of bits 0-15 has
32,768 even values, split at an even threshold; on either byte order), so p is kept to 1/32,768 (0.1 drops
0.100006 of the values) and the kept ones are scaled by 65,536 / (65,536 - q) as F.dropout scales by
1 / (1 - p). A rate that 1/32,768 steps cannot hold (p within 1/65,536 of 0 or of 1) goes to
F.dropout. The draws come from PyTorch's CPU generator, which the trainer seeds each step from (seed,
process, step), so a resumed run draws the same masks as an unbroken one, as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LANES = 4  # 16-bit lanes in a 64-bit draw


def _dropped(p: float) -> int:
    """Lane values of 65,536 that drop a value: q = 2 x round(p x 32,768)."""
    return 2 * round(p * 32768)


def keep_mask(shape: torch.Size, p: float, device=None) -> tuple[torch.Tensor, float]:
    """A boolean mask of `shape`, True with probability 1 - p (to 1/32,768), and the factor that scales the
    kept values to keep the expectation. p more than 1/65,536 from 0 and from 1."""
    q = _dropped(p)
    if not 0 < q < 65536:
        raise ValueError(f"a lane mask cannot hold dropout {p}: p must be more than 1/65,536 from 0 and 1")
    n = math.prod(shape)
    words = torch.empty(-(-n // _LANES), dtype=torch.int64, device=device).random_()  # bits 0..62 random
    words.bitwise_left_shift_(1)  # random bits 1..63; the lane holding bits 0-15 takes even values only
    lanes = words.view(torch.int16)[:n]  # (n,), each uniform over its lane's values
    return (lanes >= q - 32768).view(shape), 65536 / (65536 - q)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the cheaper mask on a CPU (outside torch.compile, which traces
    F.dropout); anywhere else, and for a rate the lanes cannot hold, F.dropout itself."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < _dropped(p) < 65536:
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(scale)  # autograd keeps the scaled mask for the backward: g * mask
