"""Do the auto defaults give about the best model the text and the time allow? A sweep over corpora of every
size and budgets of minutes, each cell measured in one invocation.

Corpora (made at run time from what the machine has; nothing is stored here):

    25k        the first 25,000 characters of Tang poems (Debian's fortunes-zh: tang300), 1,800+ distinct
    250k       English fortunes (Debian's fortunes: cookie)
    1m         Tiny Shakespeare (../shared/data)
    4m         this Python's standard library (charlm's python-stdlib corpus)
    zh         Chinese fortunes and poems (fortunes-zh: chinese, tang300, song100; 1.2M chars, 6,000+ distinct)
    manual     a 250-265 KB software manual: Node.js's fs module (Debian's nodejs docs; 254,546 characters in
               Debian 12's 18.20.4), prose with code blocks and tables, ~97 distinct: the mid-sized prose where
               short budgets were the weak spot (issue 25)

In every cell (corpus x budget) the runs train for the same wall-clock budget, two at a time, one thread each
(OMP_NUM_THREADS=1), in this order: `auto` (no model or layout flags) beside `fixed` (the fixed defaults charlm
had before: 2 x 512 GRU, one-hot, 64 x 128, dropout 0.2, weight decay 0.01), then the grid models two at a
time: 2 x 128 and 2 x 256 (embedding 64 when the vocabulary has more than 256 characters, else one-hot),
then 2 x 256 with a 32-wide embedding whatever the vocabulary, all at 32 x 64 and dropout 0.1 (weight decay
auto, as auto's). `--grid` picks others: `2x384`, `2x384@64x128` (a layout other than 32 x 64), `2x256e32`
(an embedding of 32). A budget is anything --max-time reads: 90s, 1m, 3m. Each run is scored on the whole
validation tail (the last 10%) with its best checkpoint (--full-final-eval: without it a short run on a
large text scores an even sample sized to its budget, and two runs' samples then differ).
Pairs share the machine with each other, so the comparison within a pair is fair; between pairs, a busy
machine can move both. With --threads 2 the runs cannot share 2 cores, so they go one after another in the
same order. `--no-fixed` leaves the old defaults out: auto runs beside the first grid model (a cell then takes
two budgets, not three). `--against FLAGS` skips the sweep and runs auto beside auto with FLAGS added, in the
same pair: the way to measure a rule change against the old rule's choice given as flags; its difference is
the flags' run minus auto's (negative: the flags did better), as in bench/items.py.

    apt-get install fortunes fortunes-zh     # once
    .venv/bin/python bench/sweep.py --budgets 1m 3m
    .venv/bin/python bench/sweep.py --corpora 1m --budgets 10m --grid 2x256 2x384
    .venv/bin/python bench/sweep.py --corpora 1m --budgets 10m --threads 2 --grid 2x384
    .venv/bin/python bench/sweep.py --corpora 1m 4m manual 250k zh 25k --budgets 10m --no-fixed
    .venv/bin/python bench/sweep.py --corpora manual --budgets 90s --grid 2x256 2x256e32
    .venv/bin/python bench/sweep.py --corpora manual 1m --budgets 90s --against "--embedding 0" --rounds 2
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORTUNES = Path("/usr/share/games/fortunes")
MANUAL = Path("/usr/share/doc/nodejs/api/fs.md")  # apt-get install nodejs-doc (some releases ship fs.md.gz)
FIXED = ["--hidden", "512", "--layers", "2", "--embedding", "0", "--dropout", "0.2", "--weight-decay", "0.01",
         "--batch-size", "64", "--seq-len", "128"]  # the old fixed defaults, weight decay included (now auto)


def make_corpora(work: Path, names) -> dict:
    from charlm.datasets import corpus_path

    out = {}
    for name in names:
        if name in ("25k", "250k", "zh") and not FORTUNES.exists():
            raise SystemExit(f"corpus {name} needs {FORTUNES}: apt-get install fortunes fortunes-zh")
        if name == "25k":
            path = work / "tang-25k.txt"
            path.write_text((FORTUNES / "tang300").read_text(encoding="utf-8", errors="replace")[:25_000])
        elif name == "250k":
            path = FORTUNES / "cookie"
        elif name == "1m":
            path = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
        elif name == "4m":
            path = corpus_path("python-stdlib", data_dir=work / "data")
        elif name == "manual":
            packed = MANUAL.with_name(MANUAL.name + ".gz")
            if MANUAL.exists():
                path = MANUAL  # read where Debian put it: no copy of its text in the repository
            elif packed.exists():  # unpacked into the run's temporary folder, gone with it
                path = work / MANUAL.name
                path.write_bytes(gzip.decompress(packed.read_bytes()))
            else:
                raise SystemExit(f"{MANUAL} is missing: apt-get install nodejs-doc")
        elif name == "zh":
            path = work / "zh"
            path.mkdir(exist_ok=True)
            for part in ("chinese", "tang300", "song100"):
                text = (FORTUNES / part).read_text(encoding="utf-8", errors="replace")
                (path / f"{part}.txt").write_text(text, encoding="utf-8")
        else:
            raise SystemExit(f"unknown corpus {name}")
        out[name] = path
    return out


def run_pair(work: Path, corpus: Path, runs: dict, budget: str, threads: int, logs: Path = None) -> dict:
    """Train the runs at the same time, or one after another when their threads would not fit the cores
    side by side (two 2-thread runs on 2 cores fight over them and both crawl)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    together = threads * len(runs) <= (os.cpu_count() or 1)
    procs, errs = {}, {}
    for name, flags in runs.items():
        out = work / name
        procs[name] = subprocess.Popen([sys.executable, "-m", "charlm", "train", str(corpus), "--max-time", budget,
                                        "--no-preview", "--full-final-eval", "--out", str(out), "--force", *flags], cwd=work, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not together:
            errs[name] = procs[name].communicate()[1]
    results = {}
    for name, p in procs.items():
        err = errs[name] if name in errs else p.communicate()[1]
        if logs:
            (logs / f"{corpus.stem}-{budget}-{name}.log").write_text(err)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{err[-2000:]}")
        best = re.search(r"best: val loss ([\d.]+) nats/char", err)
        chosen = re.search(r"repeat with\s+(.*?)\n(?:\S)", err + "\nx", re.S)
        steps = re.search(r"at step (\d+)", err)
        results[name] = (float(best.group(1)), " ".join(chosen.group(1).split()) if chosen else "",
                         int(steps.group(1)) if steps else 0)
    return results


def grid_flags(entry: str, emb: list) -> list:
    """`2x256` is a 2 x 256 GRU at 32 x 64, dropout 0.1; `2x256@64x128` the same model at 64 x 128;
    `2x256e32` the same model with a 32-wide embedding in place of the vocabulary's default input."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:e(\d+))?(?:@(\d+)x(\d+))?", entry)
    if not m:
        raise SystemExit(f"grid entry {entry!r}: use LAYERSxHIDDEN[eEMBEDDING][@STREAMSxCHUNK]")
    layers, hidden, batch, seq = m.group(1), m.group(2), m.group(4) or "32", m.group(5) or "64"
    if m.group(3):
        emb = ["--embedding", m.group(3)]
    return ["--hidden", hidden, "--layers", layers, *emb, "--dropout", "0.1", "--batch-size", batch,
            "--seq-len", seq]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["25k", "250k", "manual", "1m", "4m", "zh"])
    parser.add_argument("--budgets", nargs="+", default=["1m", "3m"])
    parser.add_argument("--threads", type=int, default=1, help="threads per run (two runs at a time when they fit "
                        "the cores, else one after another)")
    parser.add_argument("--logs", type=Path, help="keep each run's progress log (stderr) in this folder")
    parser.add_argument("--grid", nargs="*", default=["2x128", "2x256", "2x256e32"],
                        help="grid models beside fixed")
    parser.add_argument("--against", metavar="FLAGS", help="in place of the sweep: auto beside auto with these "
                        "flags added (a rule change against the old rule's choice given as flags, e.g. "
                        "'--embedding 0'), side by side in each cell, --rounds times")
    parser.add_argument("--rounds", type=int, default=1, help="pairs per cell with --against")
    parser.add_argument("--no-fixed", action="store_true", help="leave out the old fixed defaults: auto runs "
                        "beside the first grid model (at 10 minutes the witness costs a third of the sweep)")
    args = parser.parse_args()
    if args.no_fixed and not args.grid:
        parser.error("--no-fixed needs a grid model to run beside auto")
    if args.logs:
        for r in range(1, args.rounds + 1):
            (args.logs / f"round{r}" if args.against else args.logs).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpora = make_corpora(work, args.corpora)
        if args.against:
            return compare(work, corpora, args)
        print("| corpus | budget | auto | fixed (old defaults) | " + "".join(f"{g} | " for g in args.grid)
              + "grid best | auto - best | auto chose |")
        print("| --- | --- | ---: | ---: | " + "---: | " * len(args.grid) + "---: | ---: | --- |")
        for name, corpus in corpora.items():
            from charlm.corpus import load_corpus

            vocab = load_corpus(corpus).vocab.size
            emb = ["--embedding", "64" if vocab > 256 else "0"]
            grid = {g: grid_flags(g, emb) for g in args.grid}
            for budget in args.budgets:
                first = {"auto": []} | ({} if args.no_fixed else {"fixed": FIXED})
                rest = list(args.grid)
                if args.no_fixed:
                    beside = rest.pop(0)
                    first[beside] = grid[beside]
                res = run_pair(work, corpus, first, budget, args.threads, args.logs)
                for i in range(0, len(rest), 2):  # two at a time, side by side
                    pair = rest[i:i + 2]
                    res.update(run_pair(work, corpus, {k: grid[k] for k in pair}, budget, args.threads, args.logs))
                best = min([k for k in res if k != "auto"], key=lambda k: res[k][0])
                gap = res["auto"][0] - res[best][0]
                fixed = f"{res['fixed'][0]:.4f}" if "fixed" in res else "-"
                print(f"| {name} (V={vocab}) | {budget} | {res['auto'][0]:.4f} | {fixed} | "
                      + "".join(f"{res[k][0]:.4f} | " for k in args.grid) + f"{res[best][0]:.4f} ({best}) | {gap:+.4f} | "
                      f"`{res['auto'][1]}`, {res['auto'][2]} steps |", flush=True)


def compare(work: Path, corpora: dict, args) -> None:
    """auto and auto with the --against flags in the same pair: the one fair way to tell two rules apart on a
    machine whose speed moves between pairs."""
    print(f"| corpus | budget | round | auto | auto {args.against} | with the flags minus auto | auto chose | steps |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for name, corpus in corpora.items():
        for budget in args.budgets:
            for r in range(1, args.rounds + 1):
                res = run_pair(work, corpus, {"auto": [], "against": args.against.split()}, budget, args.threads,
                               args.logs and args.logs / f"round{r}")
                print(f"| {name} | {budget} | {r} | {res['auto'][0]:.4f} | {res['against'][0]:.4f} | "
                      f"{res['against'][0] - res['auto'][0]:+.4f} | `{res['auto'][1]}` | "
                      f"{res['auto'][2]} / {res['against'][2]} |", flush=True)


if __name__ == "__main__":
    main()
