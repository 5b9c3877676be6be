"""What should training longer (`--resume` with a larger limit) do to the learning-rate schedule?

Four runs of the same model, layout and seed on Tiny Shakespeare, each ending at STEPS2 optimizer steps:

    unbroken   one run of --max-steps STEPS2
    rewarm     --max-steps STEPS1, then --resume --max-steps STEPS2: charlm's rule (schedule.py): warm up
               over --warmup steps from the rate the run had reached to the curve of the longer budget
    jump       the same two commands under the rule charlm had before: the stretched cosine at once (the
               rate jumps from 5% of its peak to about half of it)
    floor      the same two commands, continuing from the rate reached (5% of the peak) to the new end

Equal step budgets, so the comparison does not depend on the machine's speed; the runs go two at a time, one
thread each (OMP_NUM_THREADS=1). Each is scored on the whole validation tail in float32 with its best
checkpoint (the end summary's `best:` line).

    .venv/bin/python bench/train_longer.py --steps 1200 2400
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL = ["--hidden", "256", "--layers", "2", "--embedding", "0", "--dropout", "0.1", "--batch-size", "32",
         "--seq-len", "64", "--no-preview", "--device", "cpu", "--seed", "7"]

# The rules compared with charlm's own, patched into charlm.schedule before the CLI runs (the second
# command of a pair only: the first is the same for all).
PATCH = {
    "rewarm": "",
    "jump": "import charlm.schedule as s; s.learning_rate = lambda c, step, at, restart=None: s.cosine_rate(c, step, at)",
    "floor": (
        "import math, charlm.schedule as s\n"
        "def lr(c, step, at, restart=None):\n"
        "    if restart is None: return s.cosine_rate(c, step, at)\n"
        "    floor = c.lr * c.min_lr_frac\n"
        "    start = restart.lr\n"
        "    return max(floor, min(start, s.cosine_rate(c, step, at)))\n"
        "s.learning_rate = lr"),
}


def charlm(args, work: Path, patch: str = "") -> str:
    code = f"{patch}\nimport sys\nfrom charlm.cli import main\nsys.argv = ['charlm'] + {list(map(str, args))!r}\nmain()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{done.stderr[-2000:]}")
    return done.stderr


def best(stderr: str) -> float:
    return float(re.search(r"best: val loss (\d+\.\d+)", stderr).group(1))


def variant(name: str, steps1: int, steps2: int, work: Path, eval_every: int) -> tuple:
    out = work / name
    common = [CORPUS, "--out", out, "--eval-every", eval_every, *MODEL]
    if name == "unbroken":
        return name, best(charlm([ "train", *common, "--max-steps", steps2], work))
    charlm(["train", *common, "--max-steps", steps1], work)
    return name, best(charlm(["train", *common, "--max-steps", steps2, "--resume"], work, PATCH[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[1200, 2400], metavar=("FIRST", "LONGER"))
    parser.add_argument("--eval-every", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        names = ["unbroken", "rewarm", "jump", "floor"]
        with ThreadPoolExecutor(2) as pool:
            results = dict(pool.map(lambda n: variant(n, *args.steps, work, args.eval_every), names))
    print(f"Tiny Shakespeare, 2 x 256 GRU, 32 x 64, seed 7, one thread each: {args.steps[0]} steps, then "
          f"resumed to {args.steps[1]}")
    print("| run | best val loss (whole tail, fp32) | minus unbroken |")
    print("| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {results[name]:.4f} | {results[name] - results['unbroken']:+.4f} |")


if __name__ == "__main__":
    main()
