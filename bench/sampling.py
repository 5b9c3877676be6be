"""Sampling throughput: charlm's hand-written step against calling nn.LSTM/GRU/RNN once per character, and
against the memory-bandwidth bound, all measured in the same run.

One generated character of one sample reads every weight once, so single-sample generation is bound by
memory bandwidth: bound = read bandwidth / fp32 weight bytes. The bandwidth is measured here by summing a
256 MB tensor. A batch of samples reads the weights once per step for all of them, so `--num-samples 64`
should be many times faster in total characters per second.

    .venv/bin/python bench/sampling.py
    .venv/bin/python bench/sampling.py --cells lstm --hidden 512 --chars 2000
"""

from __future__ import annotations

import argparse
import time

import torch

from charlm.model import CharRNN, ModelConfig
from charlm.sample import SampleConfig, Sampler
from charlm.vocab import Vocabulary

V = 65


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return repeats * x.numel() * 4 / (time.perf_counter() - start)


def charlm_rate(model, vocab, chars: int, batch: int) -> float:
    sampler = Sampler(model, vocab, batch=batch, seed=0)
    sampler.feed(vocab.encode("AB"))
    cfg = SampleConfig(length=chars, num_samples=batch, temperature=1.0)
    start = time.perf_counter()
    for _ in sampler.generate(cfg):
        pass
    return chars * batch / (time.perf_counter() - start)


@torch.no_grad()
def naive_rate(model, chars: int) -> float:
    """The obvious loop: the module's own forward on a (1, 1) input, once per character."""
    state, x = model.init_state(1), torch.zeros(1, 1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(chars):
        logits, state = model(x, state)
        x = torch.multinomial(torch.softmax(logits[0, -1], -1), 1, generator=gen).view(1, 1)
    return chars / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chars", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = Vocabulary("".join(chr(32 + i) for i in range(V)))
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'model':<10} {'MB':>5} {'bound':>7} {'naive':>7} {'charlm':>7} {'vs naive':>8} {'of bound':>8} "
          f"{'batch ' + str(args.batch):>10} {'batch/single':>12}")
    for cell in args.cells:
        model = CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden=args.hidden, layers=args.layers)).eval()
        weight_bytes = sum(p.numel() * 4 for p in model.parameters())
        bound = bandwidth / weight_bytes
        naive = naive_rate(model, max(100, args.chars // 5))
        single = charlm_rate(model, vocab, args.chars, 1)
        batched = charlm_rate(model, vocab, max(100, args.chars // 5), args.batch)
        print(f"{args.layers}x{args.hidden} {cell:<5} {weight_bytes / 1e6:5.1f} {bound:7,.0f} {naive:7,.0f} "
              f"{single:7,.0f} {single / naive:7.1f}x {single / bound:8.0%} {batched:10,.0f} {batched / single:11.1f}x",
              flush=True)
    print("characters per second; bound = bandwidth / weight bytes (single sample)")


if __name__ == "__main__":
    main()
