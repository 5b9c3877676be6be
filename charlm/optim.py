"""Adam with decoupled weight decay (AdamW), written here so that a run does not import torch's compiler stack.

Every `torch.optim` optimizer imports `torch._dynamo` when it is built and on every step (its methods are
wrapped to keep the compiler out): about 2 seconds of a 4-second start on a 2-core machine, paid by every
`charlm train`, for a compiler that eager training never uses. The update is a few lines of tensor
arithmetic, the same as torch's (tests/test_optim.py holds it to `torch.optim.AdamW` step by step), and the
state dict has torch's layout, so checkpoints written by either load into either:

    {"state": {index: {"step": tensor, "exp_avg": tensor, "exp_avg_sq": tensor}},
     "param_groups": [{"lr", "betas", "eps", "weight_decay", ..., "params": [index, ...]}]}

With weight_decay 0 it is plain Adam. The multi-tensor `torch._foreach_*` kernels do one launch per
operation for all parameters on a GPU; on a CPU they loop in C++.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class AdamW:
    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        self.state: dict = {}  # parameter -> {"step", "exp_avg", "exp_avg_sq"}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:
                    self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            avgs = [s["exp_avg"] for s in states]
            sqs = [s["exp_avg_sq"] for s in states]
            (beta1, beta2), lr, eps, decay = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            steps = []
            for s in states:
                s["step"] += 1  # a CPU scalar, as torch keeps it when not capturable
                steps.append(float(s["step"]))  # each parameter's own count (one may have missed a step)
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            torch._foreach_lerp_(avgs, grads, 1 - beta1)
            torch._foreach_mul_(sqs, beta2)
            torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(sqs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** n) for n in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, avgs, denom, [-lr / (1 - beta1 ** n) for n in steps])

    def state_dict(self) -> dict:
        index, groups = {}, []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index[p] = len(index)
                ids.append(index[p])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[p]: dict(s) for p, s in self.state.items() if p in index}  # the tensors, as torch's does
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        groups = saved["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has a different number of parameters per group")
        by_index = {}
        for saved_group, group in zip(groups, self.param_groups):
            for i, p in zip(saved_group["params"], group["params"]):
                by_index[i] = p
            for key in ("lr", "betas", "eps", "weight_decay"):
                if key in saved_group:
                    group[key] = tuple(saved_group[key]) if key == "betas" else saved_group[key]
        self.state = {}
        for i, s in saved["state"].items():
            p = by_index[int(i)]
            self.state[p] = {"step": s["step"].detach().to("cpu", torch.float32).clone(),
                             "exp_avg": s["exp_avg"].detach().to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].detach().to(p.device, p.dtype).clone()}
