"""Beyond one process: torchrun + DDP on the CPU (gloo), and CUDA when present."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_cli

FLAGS = ["--hidden", "48", "--layers", "1", "--batch-size", "16", "--seq-len", "32", "--no-preview",
         "--precision", "fp32", "--eval-every", "20", "--seed", "5"]


def torchrun(*args, cwd, nproc=2):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "charlm", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def val_losses(run_dir):
    return [json.loads(line)["val_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, words_file):
    two = torchrun("train", words_file, "--max-steps", "60", "--out", tmp_path / "two", *FLAGS, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes" in two.stderr
    assert two.stderr.count("stopped:") == 1  # only rank 0 prints
    one = run_cli("train", words_file, "--max-steps", "60", "--out", tmp_path / "one", *FLAGS, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    a, b = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.02, (a, b)
    # a DDP checkpoint is a plain one: no `module.` prefixes, loads and samples in a single process
    state = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)
    sample = run_cli("sample", "-c", tmp_path / "two", "--prime", "the ", "-n", "20", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("the ")


@pytest.mark.slow
def test_resume_under_ddp_continues_the_run(tmp_path, words_file):
    first = torchrun("train", words_file, "--max-steps", "40", "--out", tmp_path / "run", *FLAGS, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    more = torchrun("train", words_file, "--max-steps", "60", "--out", tmp_path / "run", "--resume", *FLAGS,
                    cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert payload["step"] == 60 and len(payload["metrics"]) == 3
    one = run_cli("train", words_file, "--max-steps", "60", "--out", tmp_path / "one", *FLAGS, cwd=tmp_path)
    assert one.returncode == 0
    a, b = val_losses(tmp_path / "one"), val_losses(tmp_path / "run")
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.02, (a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_checkpoint_moves_to_cpu(tmp_path, words_file):
    trained = run_cli("train", words_file, "--max-steps", "40", "--out", tmp_path / "gpu", "--device", "cuda",
                      "--precision", "bf16", "--no-preview", "--eval-every", "20", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "cuda" in trained.stderr and "bf16" in trained.stderr
    sample = run_cli("sample", "-c", tmp_path / "gpu", "--device", "cpu", "--prime", "the", "-n", "20", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("the")
    report = run_cli("eval", words_file, "-c", tmp_path / "gpu", "--device", "cpu", "--json", cwd=tmp_path)
    assert json.loads(report.stdout)["loss"] < 3.0
