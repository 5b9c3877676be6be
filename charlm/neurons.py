"""What individual hidden units track: activations over a text, simple features of the text, and a ranking.

One stateful pass (the one scoring makes: warm on the context character, then read the text) records every
unit's value after each character: the hidden output h of every layer and, for LSTM, the cell state c too.
Units are numbered layer by layer: layer k's h units are k*H .. k*H+H-1; an LSTM's cell states follow all
the h units (L*H + k*H + j). Pure library code: arrays in, arrays out.

Ranking. For each feature f (a number per character, computed from the text alone) and each unit u, the
score is the absolute Pearson correlation |r(f, a_u)| between the feature and the unit's activation over
all characters of the text; a unit that is high inside quotes and low outside (or the reverse) scores near
1, a unit unrelated to the feature near 0. The sums behind r (of a, a^2, f, f^2 and a*f) are accumulated
chunk by chunk, so ranking needs no more memory than one chunk of activations; a feature that is constant
over the text (no quotes at all, say) has no correlation and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from charlm.model import CharRNN

# The features, in display order, each a number per character describing the text up to and including it.
FEATURES = {
    "inside quotes": "1 after an opening \" (or \u201c) until its closing one; a blank line ends an open quote",
    "position in line": "characters since the last line break (the column)",
    "bracket depth": "open ( [ { not yet closed",
    "indentation": "leading spaces and tabs of the current line",
    "inside a word": "1 on letters, digits and _",
    "after a newline": "1 on the first character of a line",
}


def text_features(text: str) -> dict:
    """{feature name: (n,) float32} for the characters of text (see FEATURES)."""
    n = len(text)
    quote = np.zeros(n, np.float32)
    col = np.zeros(n, np.float32)
    depth = np.zeros(n, np.float32)
    indent = np.zeros(n, np.float32)
    word = np.zeros(n, np.float32)
    line_start = np.zeros(n, np.float32)
    inside, d, c, ind, leading, prev = False, 0, 0, 0, True, "\n"
    for i, ch in enumerate(text):
        if ch == "\n":
            if prev == "\n":
                inside = False  # a paragraph break closes a quote left open
        elif ch == "\u201c":
            inside = True
        elif ch == "\u201d":
            inside = False
        elif ch == '"':
            inside = not inside
        if ch in "([{":
            d += 1
        elif ch in ")]}":
            d = max(0, d - 1)
        line_start[i] = prev == "\n"
        if prev == "\n":
            c, ind, leading = 0, 0, True
        else:
            c += 1
        if leading and ch in " \t":
            ind += 1
        elif ch != "\n":
            leading = False
        quote[i], col[i], depth[i], indent[i] = inside, c, d, ind
        word[i] = ch.isalnum() or ch == "_"
        prev = ch
    return {"inside quotes": quote, "position in line": col, "bracket depth": depth, "indentation": indent,
            "inside a word": word, "after a newline": line_start}


def unit_count(model: CharRNN) -> int:
    c = model.config
    return c.layers * c.hidden * (2 if c.cell == "lstm" else 1)


def unit_name(model: CharRNN, unit: int) -> str:
    """'layer 2 unit 17' or, for an LSTM's cell states, 'layer 2 cell 17'."""
    c = model.config
    kind, k = ("unit", unit) if unit < c.layers * c.hidden else ("cell", unit - c.layers * c.hidden)
    return f"layer {k // c.hidden + 1} {kind} {k % c.hidden}"


def _single_layers(model: CharRNN) -> list:
    """One-layer modules that share the model's weights, so each layer's outputs can be read (the fused
    multi-layer module returns only the last layer's). Dropout is off at inference, so the maths is equal."""
    c, rnn = model.config, model.rnn
    layers = []
    for k in range(c.layers):
        in_size = rnn.input_size if k == 0 else c.hidden
        if c.cell == "rnn":
            m = nn.RNN(in_size, c.hidden, nonlinearity=c.nonlinearity, batch_first=True)
        else:
            m = (nn.GRU if c.cell == "gru" else nn.LSTM)(in_size, c.hidden, batch_first=True)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(m, f"{name}_l0", getattr(rnn, f"{name}_l{k}"))
        layers.append(m.to(rnn.weight_hh_l0.device))
    return layers


def _lstm_cells(layer: nn.LSTM, x: torch.Tensor, out: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
    """Cell states (T, H) of one LSTM layer for input x (T, I), outputs out (T, H), from (h0, c0) (H,).
    The fused kernel returns only the last c; the gates are recomputed from the known h sequence and the
    cell recurrence c_t = f_t * c_{t-1} + i_t * g_t walked step by step (elementwise, cheap)."""
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])  # (T, H)
    gates = x @ layer.weight_ih_l0.t() + layer.bias_ih_l0 + h_prev @ layer.weight_hh_l0.t() + layer.bias_hh_l0
    i, f, g, _ = gates.chunk(4, dim=1)  # (T, H) each
    u = torch.sigmoid(i) * torch.tanh(g)
    f = torch.sigmoid(f)
    cells = torch.empty_like(u)
    c = c0
    for t in range(len(u)):
        c = f[t] * c + u[t]
        cells[t] = c
    return cells


@torch.no_grad()
def activations(model: CharRNN, ids: np.ndarray, device, context_id: int, chunk: int = 2048) -> Iterator[tuple]:
    """Yield (start, acts (n, units) float32) over ids: each row is every unit's value after reading that
    character. 2048-character chunks keep a chunk of a 2 x 512 LSTM's values near 16 MB."""
    device = torch.device(device)
    model.eval()
    c = model.config
    layers = _single_layers(model)
    state = model.init_state(1, device)
    hs, cs = (state if c.cell == "lstm" else (state, None))
    hs = [hs[k : k + 1] for k in range(c.layers)]  # per layer (1, 1, H)
    cs = [cs[k : k + 1] for k in range(c.layers)] if cs is not None else None
    ids = np.asarray(ids, dtype=np.int64)
    first = True
    for a in range(0, len(ids), chunk):
        piece = torch.from_numpy(ids[a : a + chunk]).to(device)
        if first:  # warm on the context character, as scoring does, and drop its row
            piece = torch.cat([torch.tensor([context_id], device=device), piece])
        x = model.encode(piece.unsqueeze(0))  # (1, T, I)
        h_rows, c_rows = [], []
        for k, layer in enumerate(layers):
            if c.cell == "lstm":
                out, (h, cell) = layer(x, (hs[k], cs[k]))
                c_rows.append(_lstm_cells(layer, x[0], out[0], hs[k][0, 0], cs[k][0, 0]))
                hs[k], cs[k] = h, cell
            else:
                out, hs[k] = layer(x, hs[k])
            h_rows.append(out[0])
            x = out
        acts = torch.cat(h_rows + c_rows, dim=1)  # (T, units)
        if first:
            acts, first = acts[1:], False
        yield a, acts.float().cpu().numpy()


@dataclass
class Ranking:
    """corr[f, u]: Pearson r between feature f and unit u over the text (0 where undefined)."""

    features: list  # feature names, in corr's row order (only those that vary over the text)
    corr: np.ndarray  # (F, units) float64

    def best(self, feature: str, k: int = 1) -> list:
        """The k units with the largest |r| for a feature, best first."""
        row = np.abs(self.corr[self.features.index(feature)])
        return np.argsort(-row, kind="stable")[:k].tolist()


def rank_units(model: CharRNN, ids: np.ndarray, features: dict, device, context_id: int) -> Ranking:
    """Rank every unit against every varying feature by |Pearson r| (module docstring), in one pass."""
    names = [f for f in features if np.ptp(features[f]) > 0] if len(ids) else []
    units = unit_count(model)
    n = 0
    sa, saa = np.zeros(units), np.zeros(units)  # sums of a and a^2 per unit
    fmat = np.stack([features[f] for f in names], axis=1).astype(np.float64) if names else np.zeros((len(ids), 0))
    sf, sff = fmat.sum(0), (fmat ** 2).sum(0)  # (F,)
    saf = np.zeros((len(names), units))  # sums of a*f
    for start, acts in activations(model, ids, device, context_id):
        a = acts.astype(np.float64)  # (t, units)
        sa += a.sum(0)
        saa += (a ** 2).sum(0)
        saf += fmat[start : start + len(a)].T @ a
        n += len(a)
    cov = n * saf - np.outer(sf, sa)  # (F, units)
    var_f = np.maximum(n * sff - sf ** 2, 0.0)
    var_a = np.maximum(n * saa - sa ** 2, 0.0)
    denom = np.sqrt(np.outer(var_f, var_a))
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)
    return Ranking(names, np.clip(corr, -1.0, 1.0))


def unit_values(model: CharRNN, ids: np.ndarray, units: list, device, context_id: int) -> np.ndarray:
    """(n, len(units)) float32: the chosen units' values after each character (a second pass, so that only
    the units shown are ever held for the whole text)."""
    out = np.zeros((len(ids), len(units)), np.float32)
    for start, acts in activations(model, ids, device, context_id):
        out[start : start + len(acts)] = acts[:, units]
    return out


def check_unit(model: CharRNN, unit: int) -> Optional[str]:
    """None if unit exists in this model, else a sentence saying which numbers do."""
    total = unit_count(model)
    if 0 <= unit < total:
        return None
    c = model.config
    extra = f" (0..{c.layers * c.hidden - 1} hidden outputs, then cell states)" if c.cell == "lstm" else ""
    return f"--unit {unit} does not exist: this {c.layers} x {c.hidden} {c.cell} has units 0..{total - 1}{extra}"
