"""The hidden state that training and sampling both carry forward, in one place.

A state is a tensor (layers, batch, hidden) for RNN and GRU cells, and a tuple (h, c) of two such tensors
for LSTM. Every function here accepts either form, so no caller branches on the cell type.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def zeros(cell: str, layers: int, batch: int, hidden: int, device=None) -> State:
    h = torch.zeros(layers, batch, hidden, device=device)
    return (h, torch.zeros_like(h)) if cell == "lstm" else h


def _each_tensor(fn, state: State) -> State:
    """fn applied to the state's tensor, or to each tensor of an LSTM's (h, c)."""
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def detach(state: State) -> State:
    """Cut the graph at a chunk boundary: the values carry on, the gradients stop (truncated BPTT)."""
    return _each_tensor(torch.Tensor.detach, state)


def to(state: State, device) -> State:
    return _each_tensor(lambda t: t.to(device), state)


def select_rows(state: State, rows) -> State:
    """The state of a subset of streams (dimension 1 is the batch)."""
    return _each_tensor(lambda t: t[:, rows], state)


def to_list(state: State) -> list:
    """Plain tensors for a checkpoint (CPU, no tuple)."""
    return [t.detach().cpu() for t in (state if isinstance(state, tuple) else (state,))]


def from_list(tensors: Sequence[torch.Tensor], device=None) -> State:
    """A checkpoint's state on `device`, in fp32 whatever it was saved in: a run may resume under another
    precision or on another device than it was saved from (older checkpoints could hold a bf16/fp16 state)."""
    tensors = [t.to(device=device, dtype=torch.float32) for t in tensors]
    return tuple(tensors) if len(tensors) == 2 else tensors[0]


def dtype(state: Optional[State]) -> torch.dtype:
    """The state's dtype; fp32 for no state (PyTorch's recurrent modules start from zeros then)."""
    if state is None:
        return torch.float32
    return state[0].dtype if isinstance(state, tuple) else state.dtype


def cast(state: Optional[State], dtype: torch.dtype) -> Optional[State]:
    """The state in `dtype` (the same tensors when they already are)."""
    return None if state is None else _each_tensor(lambda t: t.to(dtype), state)


def concat_rows(states: Sequence[State]) -> State:
    """Join the states of several groups of streams, in order (the inverse of select_rows on a partition)."""
    if isinstance(states[0], tuple):
        return tuple(torch.cat([s[i] for s in states], dim=1) for i in range(len(states[0])))
    return torch.cat(list(states), dim=1)


def expand(state: State, batch: int) -> State:
    """One stream's state (batch 1) repeated for `batch` streams (each row its own copy)."""
    return _each_tensor(lambda t: t.expand(-1, batch, -1).contiguous(), state)
