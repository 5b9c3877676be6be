"""The CPU GRU's written-out backward (charlm/recurrence.py) against PyTorch's nn.GRU, in charlm's real step;
or (--against bernoulli) charlm's cheaper dropout mask (charlm/dropout.py) against F.dropout's.

Two Trainers with the same model, layout and precision run `Trainer.train_step` (forward, loss, backward,
clip, AdamW) alternately, a few steps each turn, so both share the machine's noise; one trains through
recurrence.py (what `charlm train` does on a CPU), the other with recurrence.usable switched off (PyTorch's
nn.GRU, what it did before; both drop with charlm/dropout.py's mask). The default row is auto's ten-minute
Tiny Shakespeare model and layout: a 2 x 384 GRU, 32-wide embedding, dropout 0.1, 32 x 64 chunks on one
thread, 33-44 x 64 on two. Freed memory is kept in the process as `charlm train` keeps it (`--plain-malloc`:
glibc's default). With --against bernoulli both sides train through recurrence.py and the baseline draws its
dropout masks with F.dropout (bernoulli_, what charlm did before) in place of charlm/dropout.py's. The side
named "charlm" is what `charlm train` runs now.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recurrence.py --batch 32
    OMP_NUM_THREADS=2 .venv/bin/python bench/recurrence.py --batch 38
    .venv/bin/python bench/recurrence.py --hidden 256 --batch 16 --precision fp32
    OMP_NUM_THREADS=2 .venv/bin/python bench/recurrence.py --batch 38 --against bernoulli
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from charlm import model as model_module
from charlm import recurrence
from charlm.model import CharRNN, ModelConfig
from charlm.runtime import keep_freed_memory
from charlm.train import TrainConfig, Trainer

V = 65


def trainer(args, out_dir: str) -> Trainer:
    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, V, args.batch * args.seq_len * 50 + 1).astype(np.uint8)
    model = CharRNN(ModelConfig(vocab_size=V, cell="gru", hidden=args.hidden, layers=args.layers,
                                embedding=args.embedding, dropout=args.dropout))
    config = TrainConfig(batch_size=args.batch, seq_len=args.seq_len, precision=args.precision, max_steps=10**9,
                         weight_decay=0.3)
    meta = {"model_config": model.config.to_dict(), "vocab": "", "corpus": {}}
    return Trainer(model, ids, ids[:1000], config, out_dir, torch.device("cpu"), meta)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=25, help="turns each; every turn times 2 steps")
    parser.add_argument("--against", choices=["nn.GRU", "bernoulli"], default="nn.GRU",
                        help="the baseline: PyTorch's GRU, or recurrence.py with F.dropout's masks")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="leave glibc's malloc as it is (charlm train keeps freed memory: "
                             "runtime.keep_freed_memory)")
    args = parser.parse_args()
    kept = False if args.plain_malloc else keep_freed_memory()
    written, masks = recurrence.usable, recurrence.dropout

    def bernoulli(x, p, training=True):
        return F.dropout(x, p, training)

    def use(usable, dropout):
        def switch():
            recurrence.usable, recurrence.dropout, model_module.dropout = usable, dropout, dropout
        return switch

    base = "nn.GRU" if args.against == "nn.GRU" else "bernoulli"
    with tempfile.TemporaryDirectory() as tmp:
        sides = {base: (trainer(args, tmp + "/a"), use(lambda gru, x: False, masks) if base == "nn.GRU"
                        else use(written, bernoulli)),
                 "charlm": (trainer(args, tmp + "/b"), use(written, masks))}
        spent = {name: 0.0 for name in sides}
        for name, (t, switch) in sides.items():  # warm-up: allocator, kernels
            switch()
            for _ in range(3):
                t.train_step(None, 0.0)
        for _ in range(args.rounds):
            for name, (t, switch) in sides.items():
                switch()
                t.train_step(None, 0.0)  # untimed: the switch's first step
                start = time.perf_counter()
                for _ in range(2):
                    t.train_step(None, 0.0)
                spent[name] += time.perf_counter() - start
        use(written, masks)()
    steps = 2 * args.rounds
    chars = args.batch * args.seq_len * steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} x {args.hidden} GRU, "
          f"embedding {args.embedding}, dropout {args.dropout}, {args.batch} x {args.seq_len}, {args.precision}, "
          f"freed memory {'kept' if kept else 'returned (glibc default)'}")
    for name, seconds in spent.items():
        print(f"{name:<14} {seconds / steps * 1000:7.1f} ms/step {chars / seconds:9,.0f} chars/s")
    print(f"charlm / {base} time per step: {spent['charlm'] / spent[base]:.3f}")


if __name__ == "__main__":
    main()
