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
    transformer  `charlm train names.txt` with no flags beside a small character transformer of the usual
               list-model defaults (bench/transformer_baseline.py: 4 x 64, 4 heads), same budget, one thread
               each, both scored on the held-out names; --rounds N repeats the pair
    against    `charlm train names.txt` with no flags beside the same with --against FLAGS, side by side, both
               scored on the held-out names (a rule change measured against the old rule), --rounds times

    .venv/bin/python bench/items.py --budgets 1m 3m
    .venv/bin/python bench/items.py --budgets 3m --cells transformer --rounds 2
    .venv/bin/python bench/items.py --budgets 3m --against "--val-frac 0.05" --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
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


def transformer_pair(work: Path, budget: str, tag: str, flags: list) -> tuple:
    """charlm's defaults (plus `flags`) and the transformer baseline, side by side, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    seconds = parse_budget(budget)
    result = work / f"transformer-{tag}.json"
    baseline = subprocess.Popen([sys.executable, str(Path(__file__).with_name("transformer_baseline.py")),
                                 str(work / "names.txt"), str(work / "held-out.txt"), "--seconds", str(seconds),
                                 "--out", str(result)], env=env)
    train_pair(work, {f"auto-{tag}": flags}, budget)
    if baseline.wait():
        raise SystemExit("the transformer baseline failed")
    return held_out_loss(work, f"auto-{tag}"), json.loads(result.read_text())


def parse_budget(budget: str) -> float:
    match = re.fullmatch(r"([0-9.]+)([smh]?)", budget)
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


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
    parser.add_argument("--cells", nargs="+", default=["order", "defaults", "transformer"],
                        choices=["order", "defaults", "transformer"], help="defaults includes new")
    parser.add_argument("--rounds", type=int, default=1, help="transformer (or --against) pairs per budget")
    parser.add_argument("--flags", default="", help="flags added to charlm's side of the transformer pair")
    parser.add_argument("--against", metavar="FLAGS", help="in place of the cells: the defaults beside the defaults "
                        "with these flags added, side by side, --rounds times a budget")
    args = parser.parse_args()
    if args.against:
        args.cells = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        names = fetch_names(work)
        held = set(random.Random(0).sample(range(len(names)), 1000))
        (work / "names.txt").write_text("".join(n + "\n" for i, n in enumerate(names) if i not in held))
        (work / "held-out.txt").write_text("".join(names[i] + "\n" for i in sorted(held)))
        print(f"list: {len(names) - 1000:,} names to train on, 1,000 held out; loss in nats/char on the held-out")
        for budget in args.budgets:
            tag = budget.replace(".", "_")
            for r in range(args.rounds if args.against else 0):
                train_pair(work, {f"auto-{tag}-{r}": [], f"against-{tag}-{r}": shlex.split(args.against)}, budget)
                auto, against = held_out_loss(work, f"auto-{tag}-{r}"), held_out_loss(work, f"against-{tag}-{r}")
                print(f"{budget:>4} round {r + 1}  auto {auto:.4f}  auto {args.against} {against:.4f}  "
                      f"difference {against - auto:+.4f}", flush=True)
            for r in range(args.rounds if "transformer" in args.cells else 0):
                ours, theirs = transformer_pair(work, budget, f"{tag}-{r}", args.flags.split())
                log = (work / f"auto-{tag}-{r}" / "train.log").read_text()
                chosen = re.search(r"repeat with\s+(.*\n\s+\S.*)", log)
                print(f"{budget:>4} transformer  charlm {ours:.4f}  transformer best {theirs['best']:.4f} "
                      f"(last {theirs['last']:.4f}, {theirs['steps']:,} steps, {theirs['parameters']:,} parameters)  "
                      f"charlm ahead by {theirs['best'] - ours:+.4f}", flush=True)
                print(f"     charlm chose: {' '.join(chosen.group(1).split()) if chosen else '?'} {args.flags}",
                      flush=True)
            if "order" in args.cells:
                train_pair(work, {f"fixed-{tag}": [*COMMON, "--hidden", "256", "--no-items"],
                                  f"items-{tag}": [*COMMON, "--hidden", "256", "--items"]}, budget)
                fixed, shuffled = held_out_loss(work, f"fixed-{tag}"), held_out_loss(work, f"items-{tag}")
                print(f"{budget:>4} order     fixed {fixed:.4f}  reshuffled {shuffled:.4f}  "
                      f"gain {fixed - shuffled:+.4f}", flush=True)
            if "defaults" not in args.cells:
                continue
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
