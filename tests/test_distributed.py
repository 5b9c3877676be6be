"""torchrun specifics of the training loop: per-process dropout that resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from charlm.train import _step_seed


def torchrun(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "charlm",
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_dropout_seeds_differ_by_process_and_step_and_repeat():
    seeds = {_step_seed(7, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200  # every (process, step) draws its own masks
    assert _step_seed(7, 1, 12) == _step_seed(7, 1, 12)  # ...and the same ones again after a resume


@pytest.mark.slow
def test_ddp_run_with_dropout_resumes_exactly(tmp_path, words_file):
    flags = ["--dropout", "0.3", "--layers", "2", "--precision", "fp32", "--eval-every", "10", "--seed", "3"]
    args = ["--hidden", "48", "--batch-size", "16", "--seq-len", "32", "--no-preview", "--device", "cpu"]  # gloo
    whole = torchrun("train", words_file, "--max-steps", "30", "--out", tmp_path / "whole", *args, *flags,
                     cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = torchrun("train", words_file, "--max-steps", "10", "--out", tmp_path / "split", *args, *flags,
                     cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    rest = torchrun("train", words_file, "--max-steps", "30", "--out", tmp_path / "split", "--resume", *args,
                    *flags, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]

    def losses(run):
        return [json.loads(line)["val_loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("whole") == losses("split") and len(losses("whole")) == 3
