"""An exponential moving average of a model's weights (Polyak averaging; AWD-LSTM's averaged SGD is its
arithmetic cousin): the Trainer updates it after every optimizer step and scores it beside the raw weights at
each evaluation, keeping whichever is better for best.pt and the final report. The raw weights go on
training; the average only watches them.

Early in a run the weights move fast and an average with a long memory would be stuck near the random
start, so the effective decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates: the average
follows the weights closely at first and settles into its full memory of ~1/(1 - decay) steps later
(until then the memory is ~n/9 steps: decays of 0.995 and 0.999 are the same average in a run of 1,000 steps).

Off by default (TrainConfig.average = 0): with charlm's cosine decay to 5% of the peak rate, the raw weights at
the end of a run are already as calm as an average, and an average lags a model still improving; the average
won only mid-run (BENCHMARKS.md 14b).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _averaged(model: torch.nn.Module) -> list:
    """(name, parameter) of every floating-point parameter: the ones an optimizer moves."""
    return [(name, p) for name, p in model.named_parameters() if p.dtype.is_floating_point]


class WeightAverage:
    """The running average of `model`'s parameters with memory `decay` (0 < decay < 1)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError("decay must lie strictly between 0 and 1")
        self.decay = float(decay)
        self.updates = 0
        self._names = [name for name, _ in _averaged(model)]
        # float32 whatever the training precision: an average over thousands of steps adds tiny increments
        self.shadow = [p.detach().to(torch.float32, copy=True) for _, p in _averaged(model)]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the weights as they stand after an optimizer step into the average."""
        weight = 1.0 - self.current_decay()
        params = [p.detach().float() for _, p in _averaged(model)]
        # one fused pass over all tensors: the step's cost is a few memory sweeps of the weights
        torch._foreach_lerp_(self.shadow, params, weight)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """`model` holds the averaged weights inside the block and its own again after it (even on an error)."""
        params = [p for _, p in _averaged(model)]
        raw = [p.detach().clone() for p in params]
        try:
            for p, s in zip(params, self.shadow):
                p.copy_(s)
            yield
        finally:
            for p, r in zip(params, raw):
                p.copy_(r)

    def weights(self, model: torch.nn.Module) -> dict:
        """A CPU state dict of `model` with the averaged parameters in place of its own (buffers as they are)."""
        out = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        for name, s in zip(self._names, self.shadow):
            out[name] = s.to("cpu", dtype=out[name].dtype, copy=True)
        return out

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run averages on exactly as an unbroken one would."""
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: s.detach().to("cpu", copy=True) for name, s in zip(self._names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self._names):
            raise ValueError("the saved weight average does not match the model's parameters")
        self.updates = int(state["updates"])
        for s, name in zip(self.shadow, self._names):
            s.copy_(shadow[name])
