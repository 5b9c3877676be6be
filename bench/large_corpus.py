"""Large corpora: time and peak memory to load and encode a ~100 MB UTF-8 file, cold and from the cache.

Writes two synthetic corpora to a temporary directory (pure ASCII, and ASCII with ~3% accented letters,
Korean and emoji), then, each in a fresh subprocess, runs `charlm.corpus.load_corpus(path, cache_dir=...)`:
first with an empty cache (decode and encode), then again (the cached .npy). Peak memory is the child's
maximum resident set minus that of a child that only imports charlm, as a multiple of the file size.
Targets: under 10 s, under 3x the file size.

    .venv/bin/python bench/large_corpus.py
    .venv/bin/python bench/large_corpus.py --mb 20
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from charlm.corpus import load_corpus
start = time.perf_counter()
if sys.argv[1] != "-":
    corpus = load_corpus(sys.argv[1], cache_dir=sys.argv[2])
    n = corpus.chars
else:
    n = 0
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, n)
"""


def make_corpus(path: Path, megabytes: int, exotic: bool) -> None:
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "with", "as", "was", "on"]
    if exotic:
        words += ["café", "naïve", "Zürich", "안녕하세요", "😀", "façade"]
    line = " ".join(rng.choice(words) for _ in range(2000)) + "\n"
    block = "".join(" ".join(rng.sample(words, len(words))) + "\n" for _ in range(200)) + line
    data = block.encode("utf-8")
    with open(path, "wb") as f:
        written = 0
        while written < megabytes * 1_000_000:
            f.write(data)
            written += len(data)


def child(path, cache) -> tuple:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(cache)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, base_rss, _ = child("-", "-")
        print(f"baseline (python + torch + charlm imported): {base_rss / 1e6:.0f} MB resident")
        print(f"{'corpus':<22} {'size MB':>8} {'chars':>12} {'cold s':>7} {'cold mem':>9} {'cached s':>9} "
              f"{'cached mem':>10} {'cold/cached':>11}")
        for name, exotic in (("ascii", False), ("utf-8 mixed", True)):
            path = tmp / f"{name.replace(' ', '_')}.txt"
            make_corpus(path, args.mb, exotic)
            size = path.stat().st_size
            cache = tmp / f"cache-{name.replace(' ', '_')}"
            cold_s, cold_rss, chars = child(path, cache)
            warm_s, warm_rss, _ = child(path, cache)
            print(f"{name:<22} {size / 1e6:8.1f} {chars:12,d} {cold_s:7.2f} {(cold_rss - base_rss) / size:8.2f}x "
                  f"{warm_s:9.2f} {(warm_rss - base_rss) / size:9.2f}x {cold_s / warm_s:10.1f}x", flush=True)
    print("mem = peak resident set above the baseline, as a multiple of the file size")


if __name__ == "__main__":
    main()
