"""A GRU stack for training on a CPU: PyTorch's GRU maths, with a backward pass written for the recurrence.

PyTorch's CPU GRU leaves the backward pass to autograd, which walks the chunk one time step at a time: per
step and layer, two small matrix products (the gradient to the previous state and the step's share of the
hidden weights' gradient) and about twenty elementwise kernels, each a separate launch on a (B, H) tile.
Here only what is truly sequential stays in the loop:

    forward, per step:   gh = h W_hh^T + b_hh         (B, 3H)   one product
                         r, z = sigmoid(xi_rz + gh_rz), n = tanh(xi_n + r * gh_n), h' = n + z (h - n)
    backward, per step:  g_prev = g z + (g * K) W_hh  (B, H)     one product, two elementwise kernels
    after the loop:      K, dW_hh, db_hh, d xi for all steps at once: one (3H x BT)(BT x H) product and
                         a few elementwise kernels over the whole chunk

K holds, for every step, the factors that turn the gradient reaching h_t into the gradients of its gate
pre-activations; they depend on the forward pass only, so they are computed for the whole chunk before the
loop. The input projection (x W_ih^T + b_ih) is one product over the chunk in both directions, as PyTorch's
own layer does it. bench/recurrence.py times charlm's training step both ways (BENCHMARKS.md 10, "A GRU
backward written for the recurrence").

The weights are the nn.GRU's own (same names, same layout, same checkpoints): `gru_stack` reads them from
the module, so a model trains here and samples, scores, exports or resumes through nn.GRU unchanged. In fp32
the two agree to rounding (the tests hold them to 1e-5). Under bf16 autocast both run the products and the
gates in bf16 and carry the state in fp32; the backward pass here runs in bf16, and its gradients were as
close to fp32's as PyTorch's own (relative error 0.005-0.009 against its 0.005-0.012, a 2 x 384 layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from charlm.dropout import dropout

_aten = torch.ops.aten


class _Recurrence(torch.autograd.Function):
    """One GRU layer's recurrence: xi (B, T, 3H) input pre-activations (b_ih included), h0 (B, H), w_hh
    (3H, H), b_hh (3H,) -> every step's state (B, T, H) in h0's dtype. The products run in `cdt` (bf16 under
    autocast) and so do the gates, as in PyTorch's layer under autocast; the state itself stays in h0's dtype
    (fp32), so a long memory is not rounded to 8 bits each step."""

    @staticmethod
    def forward(ctx, xi, h0, w_hh, b_hh, cdt):
        B, T, G = xi.shape
        H = G // 3
        w, b = w_hh.to(cdt), b_hh.to(cdt)
        wt = w.t()
        steps = xi.to(cdt).unbind(1)  # T x (B, 3H)
        h = h0
        hs, rzs, ns, hns = [], [], [], []
        for x in steps:
            gh = torch.addmm(b, h.to(cdt), wt)  # (B, 3H)
            rz = torch.sigmoid(x[:, :2 * H] + gh[:, :2 * H])  # (B, 2H): reset, update
            hn = gh[:, 2 * H:]  # (B, H): the hidden part of the candidate, before the reset gate
            n = torch.tanh(torch.addcmul(x[:, 2 * H:], rz[:, :H], hn))
            h = torch.addcmul(n, rz[:, H:], h - n)  # (1 - z) n + z h, in h0's dtype
            hs.append(h), rzs.append(rz), ns.append(n), hns.append(hn)
        # time-major (T, B, ...): each step's rows lie together, for the backward loop's reads
        out = torch.stack(hs)
        ctx.save_for_backward(h0, w, out, torch.stack(rzs), torch.stack(ns), torch.stack(hns))
        ctx.dtypes = (xi.dtype, w_hh.dtype)
        return out.transpose(0, 1)  # (B, T, H)

    @staticmethod
    def backward(ctx, grad_out):
        h0, w, out, rz, n, hn = ctx.saved_tensors  # out (T, B, H), rz (T, B, 2H), n and hn (T, B, H)
        T, B, H = out.shape
        cdt = w.dtype  # the backward runs in the products' dtype: a gradient's rounding is noise beside SGD's
        r, z = rz[..., :H], rz[..., H:]
        prev = torch.cat([h0.unsqueeze(0), out[:-1]]).to(cdt)  # (T, B, H): h_{t-1}
        # the gradient g_t reaching h_t, times these, is each pre-activation's gradient
        kn = _aten.tanh_backward(1 - z, n)  # n's: (1 - z)(1 - n^2)
        kz = _aten.sigmoid_backward(prev - n, z)  # z's: (h_{t-1} - n) z (1 - z)
        kr = _aten.sigmoid_backward(kn * hn, r)  # r's, through r * gh_n
        k_in = torch.stack([kr, kz, kn], 2)  # (T, B, 3, H): d xi_t = g_t * k_in
        k_hid = torch.stack([kr, kz, kn * r], 2)  # (T, B, 3, H): d gh_t = g_t * k_hid
        grads = grad_out.to(cdt).unbind(1)  # T x (B, H)
        zs, ks = z.unbind(0), k_hid.unbind(0)
        g = grads[T - 1]
        gs = [g]
        for t in range(T - 1, 0, -1):  # g_{t-1} = its own gradient + g_t z_t + (g_t * K_t) W_hh
            g = torch.addmm(torch.addcmul(grads[t - 1], g, zs[t]), (g.unsqueeze(1) * ks[t]).reshape(B, 3 * H), w)
            gs.append(g)
        g_all = torch.stack(gs[::-1]).unsqueeze(2)  # (T, B, 1, H)
        d_hid = (g_all * k_hid).reshape(T, B, 3 * H)
        d_h0 = torch.addmm(g * zs[0], d_hid[0], w)  # (B, H)
        d_hid = d_hid.reshape(T * B, 3 * H)
        d_w = d_hid.t() @ prev.reshape(T * B, H)  # (3H, H): every step's share in one product
        d_b = d_hid.float().sum(0)
        xi_dtype, w_dtype = ctx.dtypes
        d_xi = (g_all * k_in).reshape(T, B, 3 * H).transpose(0, 1)  # (B, T, 3H)
        return d_xi.to(xi_dtype), d_h0.to(h0.dtype), d_w.to(w_dtype), d_b.to(w_dtype), None


def usable(gru: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether gru_stack should run this call: the model's kind of GRU (batch first, one direction, biases) on
    a CPU, computing gradients (training; evaluation, scoring and sampling keep PyTorch's layer), outside
    torch.compile (which traces PyTorch's layer). cuDNN's fused GRU is what a GPU runs."""
    return (x.device.type == "cpu" and isinstance(gru, torch.nn.GRU) and gru.batch_first and gru.bias
            and not gru.bidirectional and torch.is_grad_enabled() and not torch.compiler.is_compiling())


def gru_stack(gru: torch.nn.GRU, x: torch.Tensor, h0: torch.Tensor):
    """What `gru(x, h0)` returns for a batch_first nn.GRU: (output (B, T, H), final state (layers, B, H)),
    dropout between layers in training mode as nn.GRU applies it. Under CPU autocast the products and gates
    compute in the autocast dtype, as in PyTorch's layer, and the state stays in h0's dtype, as it does there;
    the output is returned in the autocast dtype."""
    cpu_autocast = torch.is_autocast_enabled("cpu")
    cdt = torch.get_autocast_dtype("cpu") if cpu_autocast else x.dtype
    finals = []
    for k in range(gru.num_layers):
        if k and gru.training and gru.dropout:  # in the products' dtype: a bf16 mask costs half an fp32 one
            x = dropout(x.to(cdt), gru.dropout)
        w_ih, w_hh = getattr(gru, f"weight_ih_l{k}"), getattr(gru, f"weight_hh_l{k}")
        b_ih, b_hh = getattr(gru, f"bias_ih_l{k}"), getattr(gru, f"bias_hh_l{k}")
        xi = F.linear(x, w_ih, b_ih)  # (B, T, 3H): the input's share for the whole chunk, one product
        with torch.autocast("cpu", enabled=False):
            x = _Recurrence.apply(xi, h0[k], w_hh, b_hh, cdt)  # (B, T, H), in h0's dtype
        finals.append(x[:, -1])
    # the output in the products' dtype (what the decoder's autocast would cast it to, and its dropout's mask
    # is cheaper there); the final state in h0's
    return x.to(cdt), torch.stack(finals)
