"""Lists of things on a real list: the 32,000 commonest US surnames, as the PyPI package `names` ships them
(downloaded at run time with pip, never stored here), in their order of popularity like most lists.

1,000 names are held out at random (seed 0); the rest is the list charlm trains on. Every cell trains two
runs side by side, one thread each (OMP_NUM_THREADS=1), for the same wall-clock budget, and scores both on the
same held-out names with `charlm score --rank` (nats/char, each name from the start of an item):

    order      the same model (2 x 256 GRU, embedding 32, 32 streams x 64) trained --no-items (one stream in
               the list's fixed order, validation on its tail) against --items (reshuffled every epoch,
               random validation names)
    defaults   `charlm train names.txt` with no flags against each model of a small grid (2 x 128, 2 x 256,
               2 x 512 GRU, embedding 32, 32 x 64), two at a time
    new        of 1,000 distinct names the defaults' model draws (--allow-copies), how many are not in the list;
               and what `charlm sample --num-samples 1000` prints (copies left out, as by default)

    .venv/bin/python bench/items.py --budgets 1m 3m
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

GRID = {"2x128": ["--hidden", "128"], "2x256": ["--hidden", "256"], "2x512": ["--hidden", "512"]}
COMMON = ["--layers", "2", "--embedding", "32", "--batch-size", "32", "--seq-len", "64", "--dropout", "0.1"]


def fetch_names(work: Path) -> list:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "names==0.3.0",
                    "-d", str(work)], check=True, capture_output=True)
    with tarfile.open(next(work.glob("names-*.tar.gz"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("dist.all.last"))
        lines = tar.extractfile(member).read().decode().splitlines()
    return [line.split()[0].capitalize() for line in lines[:32_000]]


def train_pair(work: Path, runs: dict, budget: str) -> None:
    """Start every run of the dict at once (one thread each) and wait for all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "charlm", "train", str(work / "names.txt"),
                                     "--max-time", budget, "--no-preview", "--out", str(work / name), *flags],
                                    cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, flags in runs.items()}
    for name, p in procs.items():
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{err[-2000:]}")
        (work / name / "train.log").write_text(err)


def held_out_loss(work: Path, run: str) -> float:
    """Nats per character of the held-out names, each scored as an item (from a line break through its own),
    whichever way the model was trained: `charlm score --rank` scores every line so."""
    out = subprocess.run([sys.executable, "-m", "charlm", "score", str(work / "held-out.txt"), "-c",
                          str(work / run), "--rank", "--json"], cwd=work, capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out)
    return -sum(r["logprob"] for r in rows) / sum(len(r["item"]) + 1 for r in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["1m", "3m"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        names = fetch_names(work)
        held = set(random.Random(0).sample(range(len(names)), 1000))
        (work / "names.txt").write_text("".join(n + "\n" for i, n in enumerate(names) if i not in held))
        (work / "held-out.txt").write_text("".join(names[i] + "\n" for i in sorted(held)))
        print(f"list: {len(names) - 1000:,} names to train on, 1,000 held out; loss in nats/char on the held-out")
        for budget in args.budgets:
            tag = budget.replace(".", "_")
            train_pair(work, {f"fixed-{tag}": [*COMMON, "--hidden", "256", "--no-items"],
                              f"items-{tag}": [*COMMON, "--hidden", "256", "--items"]}, budget)
            fixed, shuffled = held_out_loss(work, f"fixed-{tag}"), held_out_loss(work, f"items-{tag}")
            print(f"{budget:>4} order     fixed {fixed:.4f}  reshuffled {shuffled:.4f}  gain {fixed - shuffled:+.4f}",
                  flush=True)
            grid = list(GRID.items())
            results = {}
            first = {f"auto-{tag}": [], f"{grid[0][0]}-{tag}": [*COMMON, *grid[0][1]]}
            train_pair(work, first, budget)
            train_pair(work, {f"{name}-{tag}": [*COMMON, *flags] for name, flags in grid[1:]}, budget)
            for name in [f"auto-{tag}"] + [f"{n}-{tag}" for n, _ in grid]:
                results[name] = held_out_loss(work, name)
            auto = results.pop(f"auto-{tag}")
            best = min(results, key=results.get)
            log = (work / f"auto-{tag}" / "train.log").read_text()
            chosen = re.search(r"repeat with\s+(.*)", log)
            print(f"{budget:>4} defaults  auto {auto:.4f}  grid best {results[best]:.4f} ({best})  "
                  f"gap {auto - results[best]:+.4f}  grid: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
                  flush=True)
            print(f"     auto chose: {chosen.group(1).strip() if chosen else '?'}")
            for temperature in ("0.8", "1.0"):  # the default, and the model's own distribution
                sample = subprocess.run([sys.executable, "-m", "charlm", "sample", "-c", str(work / f"auto-{tag}"),
                                         "--num-samples", "1000", "--allow-copies", "--json", "--seed", "1",
                                         "--temperature", temperature], cwd=work, capture_output=True, text=True,
                                        check=True).stdout
                items = json.loads(sample)["items"]
                print(f"{budget:>4} new       {sum(i['new'] for i in items)} of {len(items)} distinct samples are new "
                      f"names (temperature {temperature})", flush=True)
            answer = json.loads(subprocess.run([sys.executable, "-m", "charlm", "sample", "-c", str(work / f"auto-{tag}"),
                                                "--num-samples", "1000", "--json", "--seed", "1"], cwd=work,
                                               capture_output=True, text=True, check=True).stdout)
            print(f"{budget:>4} default   `charlm sample --num-samples 1000`: {sum(i['new'] for i in answer['items'])} "
                  f"of {len(answer['items'])} printed names are new, {answer['copies_skipped']} copies skipped",
                  flush=True)

if __name__ == "__main__":
    main()
