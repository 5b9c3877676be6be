"""Soak test of the torchrun exit: repeat a short two-process CPU training run and count the runs that fail.

A run that trains, prints its summary and then has one process abort at interpreter exit (SIGABRT,
"terminate called without an active exception") makes torchrun report the whole job failed, so CI turns red
by chance. One run here is

    torchrun --standalone --nproc_per_node=2 -m charlm train CORPUS --device cpu --max-steps STEPS ...

on a small generated corpus with a 48-unit model (a few seconds, most of it importing torch). A run fails when
torchrun exits non-zero or a process's stderr says "terminate called"; each failure's stderr is kept in
--keep (default: a fresh temporary directory, named at the end). Every process runs with PYTHONFAULTHANDLER=1
(the Python stack of every thread at a fatal signal) and TORCH_SHOW_CPP_STACKTRACES=1; --cores also lets the
processes write core dumps into the run's directory, kept with the stderr, for `gdb python core` to show the
C++ stack at the abort.

    .venv/bin/python bench/soak.py                  # 100 runs
    .venv/bin/python bench/soak.py --runs 20 --steps 5 --cores --keep /tmp/soak

Progress goes to stderr; the last line on stdout is the count: "failures F/N".
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the quick brown fox jumps over a lazy dog and runs into the dark green forest".split()
FLAGS = ["--device", "cpu", "--hidden", "48", "--layers", "1", "--batch-size", "16", "--seq-len", "32",
         "--no-preview", "--precision", "fp32", "--seed", "5"]


def corpus(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(1500)) + "\n")
    return path


def allow_cores():
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def one_run(text: Path, run_dir: Path, steps: int, cores: bool, timeout: float) -> tuple:
    """(failed, returncode, stderr) of one torchrun job in run_dir."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "TORCH_SHOW_CPP_STACKTRACES": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "charlm",
           "train", str(text), "--out", str(run_dir / "run"), "--max-steps", str(steps),
           "--eval-every", str(max(1, steps // 2)), *FLAGS]
    try:
        done = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=allow_cores if cores else None)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, err = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) \
            else (exc.stderr or "")
    return code != 0 or "terminate called" in err, code, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=4, help="training steps per run (each evaluates twice)")
    ap.add_argument("--keep", type=Path, default=None, help="directory for each failure's stderr (and core)")
    ap.add_argument("--cores", action="store_true", help="let the processes write core dumps, kept on failure")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before one run counts as hung")
    args = ap.parse_args()

    keep = args.keep or Path(tempfile.mkdtemp(prefix="charlm-soak-"))
    keep.mkdir(parents=True, exist_ok=True)
    failures, began = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="charlm-soak-run-") as tmp:
        text = corpus(Path(tmp) / "words.txt")
        for i in range(1, args.runs + 1):
            run_dir = Path(tmp) / f"r{i}"
            run_dir.mkdir()
            failed, code, err = one_run(text, run_dir, args.steps, args.cores, args.timeout)
            if failed:
                failures.append((i, code))
                (keep / f"run{i:03d}.stderr").write_text(f"exit: {code}\n{err}")
                for core in run_dir.glob("core*"):
                    shutil.move(str(core), keep / f"run{i:03d}.{core.name}")
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"run {i}/{args.runs}: {'FAILED (exit ' + str(code) + ')' if failed else 'ok'}"
                  f"  [{len(failures)} failed, {time.monotonic() - began:.0f} s]", file=sys.stderr, flush=True)
    if failures:
        print(f"failed runs (exit code): {', '.join(f'{i} ({c})' for i, c in failures)}; stderr in {keep}/")
    elif args.keep is None:
        shutil.rmtree(keep, ignore_errors=True)
    print(f"failures {len(failures)}/{args.runs}")


if __name__ == "__main__":
    main()
