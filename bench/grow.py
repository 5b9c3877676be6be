"""Fine-tuning onto a text with new characters: a grown Tiny Shakespeare model against the same model from scratch.

    base     `charlm train tinyshakespeare.txt --max-steps BASE` (read from /work/shared/data, not copied)
    grown    `charlm train fr.txt --init-from base --max-steps STEPS`: the vocabulary grows by the characters
             Shakespeare never used (accents, digits, brackets, French quotes; grow.py)
    scratch  `charlm train fr.txt --max-steps STEPS`: the same architecture, layout, seed and step budget
    step 0   the grown model before its first step, scored in-process (what the growth itself starts from)

fr.txt is the French manual pages of section 1 this machine has (/usr/share/man/fr/man1, from Debian's
manpages-fr / dpkg / apt / shadow packages), rendered to plain UTF-8 text by groff in sorted file order, its
first --chars characters. grown and scratch run at the same time, one thread each (OMP_NUM_THREADS=1), with
equal step budgets, so the comparison does not depend on the machine's speed. Each is scored on the same
held-out tail of fr.txt (its last 10%, never trained on) in float32 with its best checkpoint: the end
summary's `best:` line; the curve is metrics.jsonl's periodic evaluations.

    .venv/bin/python bench/grow.py --base-steps 1500 --steps 600
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PAGES = Path("/usr/share/man/fr/man1")
MODEL = ["--hidden", "128", "--layers", "2", "--embedding", "0", "--dropout", "0.1", "--batch-size", "32",
         "--seq-len", "64", "--no-preview", "--device", "cpu", "--seed", "7", "--no-items"]


def french_text(limit: int) -> str:
    """The French section-1 manual pages as plain text (groff -k reads their UTF-8), first `limit` characters
    cut at a line end."""
    parts, total = [], 0
    for page in sorted(PAGES.glob("*.gz")):
        source = gzip.decompress(page.read_bytes())
        done = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-P-cbou"], input=source, capture_output=True)
        text = done.stdout.decode("utf-8", errors="strict")
        parts.append(text)
        total += len(text)
        if total >= limit:
            break
    text = "".join(parts)[:limit]
    return text[: text.rfind("\n") + 1]


def charlm(args, work: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "charlm", *map(str, args)], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: charlm {' '.join(map(str, args))}\n{done.stderr[-2000:]}")
    return done.stderr


def best(stderr: str) -> float:
    return float(re.search(r"best: val loss ([\d.]+) nats/char", " ".join(stderr.split())).group(1))


def curve(run: Path) -> list:
    return [(m["step"], m["val_loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in m]


def step_zero(base: Path, text: str) -> tuple:
    """(loss on the held-out tail, mean share of the probability on the new characters there) of the grown
    model before any fine-tuning: the start the growth gives."""
    import numpy as np
    import torch

    from charlm import checkpoint as ckpt
    from charlm.corpus import split_train_val
    from charlm.evaluation import evaluate_text
    from charlm.grow import decide, grow_model
    from charlm.runs import model_from_payload
    from charlm.vocab import Vocabulary

    torch.set_num_threads(1)
    model, old = model_from_payload(ckpt.load(base))
    plan = decide(old, Vocabulary("".join(sorted(set(text)))), "fr.txt")
    grown = grow_model(model, old, plan.vocab).eval()
    _, tail = split_train_val(plan.vocab.encode(text), 0.1)
    loss = evaluate_text(grown, np.asarray(tail), "cpu")["loss"]
    new = torch.tensor([plan.vocab.chars.index(c) for c in plan.added])
    with torch.no_grad():
        logits, _ = grown(torch.tensor(np.asarray(tail[:20_000]), dtype=torch.long)[None], grown.init_state(1))
    return loss, float(logits.softmax(-1)[0][:, new].sum(-1).mean()), plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--chars", type=int, default=400_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="grow-bench-") as tmp:
        work = Path(tmp)
        fr = work / "fr.txt"
        text = french_text(args.chars)
        fr.write_text(text, encoding="utf-8")
        charlm(["train", SHAKESPEARE, "--out", work / "base", "--max-steps", args.base_steps,
                "--eval-every", max(1, args.base_steps // 4), *MODEL], work)
        loss0, mass0, plan = step_zero(work / "base", text)
        every = ["--eval-every", max(1, args.steps // 6)]
        arms = {"grown": ["--init-from", work / "base"], "scratch": []}
        with ThreadPoolExecutor(len(arms)) as pool:
            jobs = {name: pool.submit(charlm, ["train", fr, "--out", work / name, "--max-steps", args.steps,
                                               *every, *extra, *MODEL], work) for name, extra in arms.items()}
            logs = {name: job.result() for name, job in jobs.items()}
        print(f"fr.txt: {len(text):,} characters; the model grows by {len(plan.added)} of them "
              f"({plan.vocab.size - len(plan.added)} + {len(plan.added)} = {plan.vocab.size})")
        print(f"base: {args.base_steps} steps on Tiny Shakespeare, then {args.steps} steps on fr.txt per arm")
        print(f"step 0 (grown, before fine-tuning): {loss0:.4f} nats/char on the tail; "
              f"{mass0:.2e} of the probability on new characters")
        for name in arms:
            points = "  ".join(f"{s}:{v:.3f}" for s, v in curve(work / name))
            print(f"{name:8s} best {best(logs[name]):.4f} nats/char on the tail   curve {points}")
        for line in logs["grown"].splitlines():
            if line.startswith("vocabulary"):
                print("grown start summary:", line.strip())


if __name__ == "__main__":
    main()
