"""Scoring speed: `charlm score`'s library pass against `charlm eval`'s pass over the same text.

Both walk the default model (2 x 512 GRU, one-hot input; untrained: speed does not depend on the weights)
over Tiny Shakespeare in 8 parallel streams warmed on 256 characters (eval's defaults, which score uses for
files). eval computes the summed cross-entropy; score also takes every character's log-probability, rank
and top 5 back to numpy, and keeps the summary (totals and the most surprising spans). The two are timed
alternately, round after round, in one process, so they share the machine's noise (its speed drifts 2x over
minutes); the figure is the median round. Rendering JSON lines is timed on its own, as characters/second.

    .venv/bin/python bench/score.py                       # the whole file, 3 rounds
    .venv/bin/python bench/score.py --chars 200000 --rounds 2
    .venv/bin/python bench/score.py --memory              # peak memory of `charlm score` on 1 MB and 8 MB

--memory runs `charlm score FILE --summary` (a file, 8 streams) and `charlm score - --summary` (the same
text on stdin, one stream) as child processes on Tiny Shakespeare repeated to 1 MB and 8 MB, with a small
1 x 64 GRU (memory does not depend on the weights, and a small model keeps 8 MB quick), and reports each
child's peak resident memory (wait4's ru_maxrss): constant memory means the 8 MB rows match the 1 MB rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from charlm.cli.score import json_lines
from charlm.corpus import load_corpus
from charlm.model import CharRNN, ModelConfig
from charlm.score import Summary, default_context_id, score_ids
from charlm.evaluation import evaluate_text

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=SHAKESPEARE)
    ap.add_argument("--chars", type=int, default=0, help="score only the first N characters (0 = all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    args = ap.parse_args()
    if args.memory:
        return memory(args.corpus)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus)
    ids = corpus.ids[: args.chars] if args.chars else corpus.ids
    vocab = corpus.vocab
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab.size)).eval()  # the defaults: 2 x 512 GRU, one-hot
    context = default_context_id(vocab)
    print(f"{args.corpus.name}: {len(ids):,} characters, model 2 x 512 gru, {args.streams} streams, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")

    def run_eval() -> float:
        return evaluate_text(model, ids, "cpu", streams=args.streams)["loss"]

    def run_score() -> float:
        summary = Summary(vocab)
        for chunk in score_ids(model, ids, "cpu", 5, context, vocab, streams=args.streams):
            summary.update(chunk)
        return summary.result()["nats_per_char"]

    times = {"eval": [], "score": []}
    losses = {}
    for r in range(args.rounds):
        for name, fn in (("eval", run_eval), ("score", run_score)) if r % 2 == 0 else \
                (("score", run_score), ("eval", run_eval)):
            start = time.perf_counter()
            losses[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"  round {r + 1} {name:5s} {times[name][-1]:7.2f} s  {len(ids) / times[name][-1]:9,.0f} chars/s",
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median: eval {len(ids) / med['eval']:,.0f} chars/s, score {len(ids) / med['score']:,.0f} chars/s; "
          f"score/eval speed ratio {med['eval'] / med['score']:.2f}x")
    print(f"loss: eval {losses['eval']:.5f}, score {losses['score']:.5f} nats/char (eval skips the first "
          "character, score predicts it from the context)")

    chunk = next(iter(score_ids(model, ids[:20000], "cpu", 5, context, vocab, streams=1)))
    quoted = [json.dumps(c, ensure_ascii=False) for c in vocab.chars]
    start = time.perf_counter()
    text = json_lines(chunk, quoted)
    spent = time.perf_counter() - start
    print(f"JSON lines rendering: {len(chunk) / spent:,.0f} chars/s ({len(text) / len(chunk):.0f} bytes a line)")


def memory(corpus: Path) -> None:
    import os
    import subprocess
    import sys
    import tempfile

    from charlm import checkpoint as ckpt

    text = corpus.read_text(encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = ModelConfig(len(vocab), hidden=64, layers=1)
        model_path = Path(tmp) / "model.pt"
        ckpt.save({"model_config": config.to_dict(), "vocab": vocab, "model": CharRNN(config).state_dict()},
                  model_path)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for size in (1_000_000, 8_000_000):
            path = Path(tmp) / f"text-{size}.txt"
            path.write_text((text * (size // len(text) + 1))[:size], encoding="utf-8")
            for how in ("file", "stdin"):
                arg = str(path) if how == "file" else "-"
                with open(path, "rb") as stdin:
                    start = time.perf_counter()
                    proc = subprocess.Popen([sys.executable, "-m", "charlm", "score", arg, "-c", str(model_path),
                                             "--summary", "--json"], stdin=stdin, stdout=subprocess.PIPE, env=env)
                    out = proc.stdout.read()
                    _, status, usage = os.wait4(proc.pid, 0)
                chars = json.loads(out)["chars"]
                print(f"{size / 1e6:.0f} MB {how:5s}: {chars:,} characters scored, peak RSS "
                      f"{usage.ru_maxrss / 1024:.0f} MiB, {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
