"""What `--compile` (torch.compile) costs and buys: the compile time of the first call, and the time of a
training step and of a sampling step afterwards, eager against compiled, in one run.

Dynamo refuses nn.RNN/GRU/LSTM modules (a graph break: "Dynamo does not support RNN, GRU, or LSTM"), so a
compiled training step compiles the one-hot (or embedding) input and the decoder around an eager recurrent
call. The sampling step (`CharRNN.step`) is plain tensor code, but it reads its weights from the nn.GRU
module, which breaks the graph at once: nothing of it compiles, and the compiled call only adds Dynamo's
guard checks. Eager and compiled steps are timed alternately so they share the machine's noise; the figures
are medians.

    .venv/bin/python bench/compile.py
    .venv/bin/python bench/compile.py --cell lstm --hidden 256 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from charlm.model import CharRNN, ModelConfig

V = 65


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(label: str, eager, compiled, steps: int) -> None:
    eager()  # warm
    first = once(compiled)  # includes compiling
    e, c = [], []
    for _ in range(steps):
        e.append(once(eager))
        c.append(once(compiled))
    e_ms, c_ms = statistics.median(e) * 1e3, statistics.median(c) * 1e3
    saved = e_ms - c_ms
    payback = f"pays back after {first * 1e3 / saved:,.0f} steps" if saved > 0 else "never pays back"
    print(f"{label:<34} compile {first:6.1f} s   eager {e_ms:8.2f} ms   compiled {c_ms:8.2f} ms   "
          f"{e_ms / c_ms:5.2f}x   {payback}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} x {args.hidden} "
          f"{args.cell}, training {args.batch} x {args.seq_len} fp32, sampling batch 1")
    x = torch.randint(0, V, (args.batch, args.seq_len))
    y = torch.randint(0, V, (args.batch, args.seq_len))
    for embedding in (0, 64):
        model = CharRNN(ModelConfig(vocab_size=V, cell=args.cell, hidden=args.hidden, layers=args.layers,
                                    embedding=embedding, dropout=0.0))
        fast = torch.compile(model)

        def train_step(m):
            def run():
                logits, _ = m(x, model.init_state(args.batch))
                F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
                model.zero_grad(set_to_none=True)
            return run

        label = "training step, " + ("one-hot input" if not embedding else f"{embedding}-d embedding")
        compare(label, train_step(model), train_step(fast), args.steps)

    model = CharRNN(ModelConfig(vocab_size=V, cell=args.cell, hidden=args.hidden, layers=args.layers)).eval()
    fast_step = torch.compile(model.step)
    ids, state = torch.zeros(1, dtype=torch.long), model.init_state(1)

    def sample_steps(fn, n=100):
        def run():
            s = state
            for _ in range(n):
                _, s = fn(ids, s)
        return run

    compare("sampling, 100 steps at batch 1", sample_steps(model.step), sample_steps(fast_step), args.steps)


if __name__ == "__main__":
    main()
