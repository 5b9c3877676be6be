"""GPU figures in one run: training throughput against cuDNN's own recurrent kernel, and sampling at batch 1
on the GPU against the CPU (what `charlm sample --device auto` chooses between), plus a batch on the GPU.

Training: charlm's model (one-hot input, the recurrent stack, the decoder) runs forward, cross-entropy,
backward and an AdamW step under autocast; the limit is the bare nn.LSTM/GRU/RNN stack alone, forward and
backward, same shapes, same autocast: no input layer, decoder, loss or optimizer. Both are timed
alternately so they share the machine's noise; the figure is the median step.

Sampling: `Sampler.generate` at batch 1 on the GPU and on the CPU, and at --batch on the GPU.

    python bench/gpu_bench.py                                   # 3 x 1024 LSTM, 256 x 256, bf16, on cuda
    python bench/gpu_bench.py --device cpu --hidden 64 --layers 1 --batch 8 --seq-len 16 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from charlm.model import CharRNN, ModelConfig
from charlm.sample import SampleConfig, Sampler
from charlm.vocab import Vocabulary

V = 65


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="training streams, and the sampling batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per implementation")
    parser.add_argument("--chars", type=int, default=500, help="characters per sampling measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {args.layers} x {args.hidden} {args.cell}, "
          f"{args.batch} x {args.seq_len}, {args.precision}")

    model = CharRNN(ModelConfig(vocab_size=V, cell=args.cell, hidden=args.hidden, layers=args.layers,
                                dropout=0.0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    bare = type(model.rnn)(V, args.hidden, args.layers, batch_first=True).to(device)
    onehot = F.one_hot(x, V).float()

    def charlm_step():
        with torch.autocast(**amp):
            logits, _ = model(x, model.init_state(args.batch, device))
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def bare_step():
        with torch.autocast(**amp):
            out, _ = bare(onehot)
        out.float().sum().backward()

    for fn in (charlm_step, bare_step):  # warm-up: cuDNN plans, allocator
        fn()
    times = {"charlm": [], "bare": []}
    for _ in range(args.steps):
        times["charlm"].append(timed(charlm_step, device))
        times["bare"].append(timed(bare_step, device))
    chars = args.batch * args.seq_len
    rate = {k: chars / statistics.median(v) for k, v in times.items()}
    print(f"training: charlm {rate['charlm']:,.0f} ch/s, bare {args.cell} kernel {rate['bare']:,.0f} ch/s, "
          f"ratio {rate['bare'] / rate['charlm']:.2f}x (target: within 2x)")

    model.eval()
    vocab = Vocabulary("".join(chr(32 + i) for i in range(V)))
    cfg = SampleConfig(length=args.chars, temperature=1.0)

    def sample_rate(dev, batch):
        sampler = Sampler(model, vocab, batch=batch, device=dev, seed=0)
        sampler.feed(vocab.encode("AB"))
        sync(torch.device(dev))
        start = time.perf_counter()
        for _ in sampler.generate(SampleConfig(length=cfg.length, temperature=1.0, num_samples=batch)):
            pass
        sync(torch.device(dev))
        return batch * cfg.length / (time.perf_counter() - start)

    single_dev = sample_rate(device, 1)  # warm
    single_cpu = sample_rate("cpu", 1)
    single_dev = max(single_dev, sample_rate(device, 1))
    batched = sample_rate(device, args.batch)
    print(f"sampling batch 1: {device.type} {single_dev:,.0f} ch/s, cpu {single_cpu:,.0f} ch/s "
          f"({single_dev / single_cpu:.2f}x); batch {args.batch} on {device.type}: {batched:,.0f} ch/s total")
    print(f"weights {sum(p.numel() for p in model.parameters()) * 4 / 2**20:.1f} MB fp32 "
          "(charlm.runtime.SINGLE_SAMPLE_CPU_BYTES decides batch-1 sampling by this size)")


if __name__ == "__main__":
    main()
