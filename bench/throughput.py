"""Training throughput: charlm's real training step against a plain hand-written PyTorch loop.

Both do the same work per step: forward over a (64, 128) chunk, cross-entropy, backward, clip at 1.0, AdamW.
The plain loop is what one writes from the PyTorch docs: nn.Embedding(V, H) -> nn.RNN/GRU/LSTM(H, H, 2) ->
nn.Linear(H, V), fp32, default settings. charlm runs `Trainer.train_step` (one-hot input, its oneDNN
choice per cell) in fp32 and in bf16 autocast. The three are timed alternately, step by step, so they share
the machine's noise; the figure is the median of the timed steps.

FLOP fraction: a character costs about 3 x 2*G*H*(I+H) FLOPs per layer (G gates, I the layer's input size:
V for charlm's one-hot first layer, H for the plain loop's embedding) plus 3 x 2*H*V for the decoder; the
limit is the rate torch.mm reaches on 2048 x 2048 matrices in the same run (fp32, and bf16 for bf16 rows).

    .venv/bin/python bench/throughput.py                  # all cells at 2x128, 2x256, 2x512
    .venv/bin/python bench/throughput.py --cells lstm --hidden 512 --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm.model import GATES, CharRNN, ModelConfig
from charlm.train import TrainConfig, Trainer

V, B, T = 65, 64, 128


def mm_rate(dtype, n=2048, repeats=10) -> float:
    a = torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n**3 / (time.perf_counter() - start)


def flops_per_char(cell: str, hidden: int, layers: int, first_input: int) -> float:
    g, total, inp = GATES[cell], 0.0, first_input
    for _ in range(layers):
        total += 3 * 2 * g * hidden * (inp + hidden)
        inp = hidden
    return total + 3 * 2 * hidden * V


class PlainLoop:
    def __init__(self, cell: str, hidden: int, layers: int):
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.embed, self.rnn, self.out = nn.Embedding(V, hidden), cls(hidden, hidden, layers, batch_first=True), nn.Linear(hidden, V)
        self.params = [*self.embed.parameters(), *self.rnn.parameters(), *self.out.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=2e-3)
        self.x, self.y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def step(self):
        out, _ = self.rnn(self.embed(self.x))
        loss = F.cross_entropy(self.out(out).reshape(-1, V), self.y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


class CharlmStep:
    def __init__(self, cell: str, hidden: int, layers: int, precision: str, out_dir: str):
        ids = np.random.default_rng(0).integers(0, V, B * T * 4 + 1).astype(np.uint8)
        model = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden=hidden, layers=layers, dropout=0.0))
        config = TrainConfig(batch_size=B, seq_len=T, precision=precision, max_steps=10**9)
        meta = {"model_config": model.config.to_dict(), "vocab": "", "corpus": {}}
        self.trainer = Trainer(model, ids, ids[:1000], config, out_dir, torch.device("cpu"), meta)

    def step(self):
        self.trainer.train_step(None, 0.0)  # no stop asked, clock 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    args = parser.parse_args()
    torch.manual_seed(0)
    rate32, rate16 = mm_rate(torch.float32), mm_rate(torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; torch.mm 2048^2: "
          f"fp32 {rate32 / 1e9:.0f} GFLOP/s, bf16 {rate16 / 1e9:.0f} GFLOP/s")
    print(f"{'model':<10} {'plain fp32':>11} {'charlm fp32':>12} {'charlm bf16':>12} {'fp32 ratio':>10} "
          f"{'bf16 ratio':>10} {'plain %peak':>11} {'charlm fp32 %peak':>17} {'bf16 %bf16peak':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells:
            for hidden in args.hidden:
                impls = {"plain": PlainLoop(cell, hidden, args.layers),
                         "fp32": CharlmStep(cell, hidden, args.layers, "fp32", tmp),
                         "bf16": CharlmStep(cell, hidden, args.layers, "bf16", tmp)}
                times = {k: [] for k in impls}
                for impl in impls.values():  # warm-up: allocator, oneDNN primitive caches
                    impl.step()
                    impl.step()
                for _ in range(args.steps):
                    for name, impl in impls.items():
                        start = time.perf_counter()
                        impl.step()
                        times[name].append(time.perf_counter() - start)
                cps = {k: B * T / statistics.median(v) for k, v in times.items()}
                f_plain = flops_per_char(cell, hidden, args.layers, hidden)
                f_ours = flops_per_char(cell, hidden, args.layers, V)
                print(f"{args.layers}x{hidden} {cell:<5} {cps['plain']:>11,.0f} {cps['fp32']:>12,.0f} "
                      f"{cps['bf16']:>12,.0f} {cps['fp32'] / cps['plain']:>9.2f}x {cps['bf16'] / cps['plain']:>9.2f}x "
                      f"{cps['plain'] * f_plain / rate32:>10.0%} {cps['fp32'] * f_ours / rate32:>16.0%} "
                      f"{cps['bf16'] * f_ours / rate16:>13.0%}", flush=True)
    print("chars/s of a full training step (batch 64 x chunk 128); ratios against the plain loop of the same row")


if __name__ == "__main__":
    main()
