"""Large corpora: whole `charlm train` processes on a mixed UTF-8 corpus of 100 MB and 1 GB.

Writes a corpus of the given sizes to a scratch folder: Tiny Shakespeare (read from ../shared/data), this
Python's standard-library sources and generated Korean text (1,900 distinct syllables) in turn, about 2,000
distinct characters in all. Then, for each size, runs as separate processes and measures wall time and peak
resident memory (the child's ru_maxrss):

    import   python -c "import charlm.cli"                      the baseline every figure is set beside
    build    load_corpus(path, cache_dir) alone, with an empty cache: the streaming build's own peak
    cold     charlm train big.txt --hidden 32 --layers 1 --max-steps 1 --no-preview (the default final report,
             sized to 5% of the run's time, at least 2 s) with an empty cache: hash, decode, encode into the
             memory-mapped cache, one step, evaluation, the final report
    cached   the same command again: the cache is mapped, nothing is decoded
    no-final cached, with --no-full-final-eval (beside the default, not the target)
    LIMIT    (--timed 60s) cached, `charlm train big.txt --max-time 60s --no-preview`: a user's run, start to exit
    ddp      (--ddp) torchrun --nproc_per_node=2 of the cached command: peak RSS of each rank

    .venv/bin/python bench/large_corpus.py --sizes 100 --timed 60s
    .venv/bin/python bench/large_corpus.py --sizes 100 1000 --ddp
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TRAIN = ["--hidden", "32", "--layers", "1", "--max-steps", "1", "--no-preview"]


def make_corpus(path: Path, megabytes: int) -> None:
    rng = random.Random(0)
    syllables = [chr(0xAC00 + i * 5) for i in range(1900)]  # 1,900 distinct Hangul syllables
    korean = "\n".join(" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                                for _ in range(rng.randint(4, 12))) for _ in range(20_000)).encode("utf-8")
    shakespeare = SHAKESPEARE.read_bytes() if SHAKESPEARE.is_file() else b""
    stdlib = b"".join(p.read_bytes() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200])
    blocks = [b for b in (shakespeare, stdlib, korean) if b]
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < megabytes * 1_000_000:
            block = blocks[i % len(blocks)]
            f.write(block + b"\n")
            written += len(block) + 1
            i += 1


def measure(cmd, cwd, env=None) -> tuple:
    """(seconds, peak RSS in bytes of the largest child process, stderr) of a command run to completion."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
               "p.returncode); sys.stderr.write(p.stderr)")
    out = subprocess.run([sys.executable, "-c", wrapper, *map(str, cmd)], cwd=cwd, capture_output=True, text=True,
                         env=env)
    seconds, rss, code = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    return float(seconds), int(rss), out.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100], help="corpus sizes in MB")
    parser.add_argument("--ddp", action="store_true", help="also a 2-process torchrun run on each size")
    parser.add_argument("--scratch", default="/tmp/charlm-large-corpus")
    parser.add_argument("--timed", metavar="LIMIT", help="also `charlm train big.txt --max-time LIMIT`, cached")
    args = parser.parse_args()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    charlm = [sys.executable, "-m", "charlm", "train"]
    _, base, _ = measure([sys.executable, "-c", "import charlm.cli, charlm.train, charlm.corpus"], scratch)
    print(f"import-only process: {base / 1e6:.0f} MB resident")
    print(f"{'corpus':>8} {'chars':>12} {'vocab':>6} {'run':>7} {'seconds':>8} {'peak MB':>8} {'above import':>12} "
          f"{'x file':>7}")
    for mb in args.sizes:
        path = scratch / f"mixed-{mb}mb.txt"
        if not path.is_file():
            make_corpus(path, mb)
        size = path.stat().st_size
        shutil.rmtree(scratch / "checkpoints", ignore_errors=True)
        build = ("from charlm.corpus import load_corpus; import sys; "
                 "load_corpus(sys.argv[1], cache_dir='checkpoints/build-only')")
        runs = [("build", [sys.executable, "-c", build, path]),
                ("cold", [*charlm, path, *TRAIN, "--out", "checkpoints/a"]),
                ("cached", [*charlm, path, *TRAIN, "--out", "checkpoints/b"]),
                ("no-final", [*charlm, path, *TRAIN, "--no-full-final-eval", "--out", "checkpoints/c"])]
        if args.timed:  # what a user runs: the corpus and a limit, nothing else (cached)
            runs.append((f"{args.timed}", [*charlm, path, "--max-time", args.timed, "--no-preview", "--out",
                                            "checkpoints/t"]))
        for name, cmd in runs:
            seconds, rss, err = measure(cmd, scratch)
            chars = re.search(r": ([\d,]+) characters", err)
            vocab = re.search(r"vocabulary\s+(\d+) characters", err)
            print(f"{mb:>6}MB {chars.group(1) if chars else '?':>12} {vocab.group(1) if vocab else '?':>6} "
                  f"{name:>7} {seconds:8.2f} {rss / 1e6:8.0f} {(rss - base) / 1e6:10.0f}MB "
                  f"{rss / size:6.2f}x", flush=True)
        if args.ddp:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "charlm", "train", str(path), *TRAIN, "--no-full-final-eval", "--batch-size", "8",
                   "--out", "checkpoints/d"]
            seconds, rss, _ = measure(cmd, scratch, env)  # the agent waits for its ranks: the largest rank
            print(f"{mb:>6}MB {'':>12} {'':>6} {'ddp x2':>7} {seconds:8.2f} {rss / 1e6:8.0f} "
                  f"{(rss - base) / 1e6:10.0f}MB {rss / size:6.2f}x  (largest rank)", flush=True)
    print("peak MB: the largest resident set of the process; above import: minus the import-only process")


if __name__ == "__main__":
    main()
