"""torchrun specifics of the training loop: per-process dropout that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from charlm.train import _step_seed
from conftest import torchrun, word_text


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


@pytest.mark.slow
def test_ddp_run_that_stops_improving_cools_down_and_ends_on_every_process(tmp_path, words_file):
    # an update of 1e-30 leaves the weights as they are: no new best after the first evaluation. Once unbroken
    # (the best in memory), once resumed before the stall (the best read from best.pt by rank 0 and sent out)
    args = ["--hidden", "24", "--layers", "1", "--embedding", "0", "--dropout", "0", "--batch-size", "8",
            "--seq-len", "16", "--no-preview", "--device", "cpu", "--precision", "fp32", "--eval-every", "5",
            "--lr", "1e-30", "--patience", "2"]

    def steps(run):
        return [json.loads(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    whole = torchrun("train", words_file, "--max-steps", "100", "--out", tmp_path / "whole", *args, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "cooled down from the best over 10 steps, ending at step 25" in whole.stderr
    first = torchrun("train", words_file, "--max-steps", "12", "--out", tmp_path / "split", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    rest = torchrun("train", words_file, "--max-steps", "100", "--out", tmp_path / "split", "--resume", *args,
                    cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    # the first session's last evaluations (10 and its final one at 12) completed the stall: the resumed
    # session cools down at once, from step 12, not at its next evaluation
    assert "back to step 5" in rest.stderr and "ending at step 22" in rest.stderr
    # every 5 steps, and each quarter of the 10-step cooldown (2, 5 and 7 steps into it)
    assert steps("whole") == [5, 10, 15, 17, 20, 22, 25]
    assert steps("split") == [5, 10, 12, 14, 15, 17, 19, 20, 22]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(*args, roots, timeout=240):
    """One torchrun per "machine" on loopback (--nnodes 2, c10d rendezvous), each in its own working directory
    with its own copy of the corpus and its own checkpoints/: what two machines without a shared disk see."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=charlm-test", "-m", "charlm", *map(str, args)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, root in enumerate(roots)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang is a failure, never a stuck suite
            for p in procs:
                p.kill()
            pytest.fail(f"a node did not finish within {timeout} s: {' '.join(map(str, args))}")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def reports_its_whole_tail(tmp_path, text: str, nproc: int, hidden: int, seq_len: int) -> None:
    """Train NPROC processes on a small text; every evaluation must score each character of its validation tail
    (the last 10%), and the loss they report together must be the tail's as one process scores it unbroken."""
    corpus = tmp_path / "small.txt"
    corpus.write_text(text, encoding="utf-8")
    args = ["--hidden", hidden, "--layers", "1", "--embedding", "0", "--dropout", "0", "--batch-size", "4",
            "--seq-len", seq_len, "--no-preview", "--device", "cpu", "--precision", "fp32", "--eval-every", "3",
            "--max-steps", "6", "--no-items", "--patience", "0"]
    run = torchrun("train", corpus, "--out", tmp_path / "run", *args, cwd=tmp_path, nproc=nproc)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "best: val loss" in run.stderr
    tail = text[-round(len(text) * 0.1):]
    (tmp_path / "tail.txt").write_text(tail, encoding="utf-8")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_chars"] for r in records] == [len(tail) - 1] * 2  # every character of it, at both evaluations
    alone = subprocess.run([sys.executable, "-m", "charlm", "eval", "tail.txt", "-c", "run", "--streams", "1",
                            "--json", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    best = min(records, key=lambda r: r["val_loss"])
    assert abs(json.loads(alone.stdout)["loss"] - best["val_loss"]) < 1e-3


@pytest.mark.slow
def test_ddp_run_on_a_small_text_reports_the_loss_of_its_whole_validation_tail(tmp_path):
    # a 400-character tail is scored in fewer streams than 32, each warmed on 256 characters: one per process
    reports_its_whole_tail(tmp_path, word_text(100, seed=4), nproc=2, hidden=24, seq_len=16)


@pytest.mark.slow
def test_more_processes_than_validation_characters_still_score_the_tail(tmp_path):
    # a 39-character text leaves 4 in its tail, 3 to predict: one of four processes scores none of them
    reports_its_whole_tail(tmp_path, "the cat sat on the mat and the dog ran\n", nproc=4, hidden=16, seq_len=4)


@pytest.mark.slow
def test_two_machines_on_loopback_train_resume_and_finish_without_a_shared_disk(tmp_path, words_file):
    roots = [tmp_path / "node0", tmp_path / "node1"]
    for root in roots:
        root.mkdir()
        (root / "words.txt").write_bytes(words_file.read_bytes())
    args = ["words.txt", "--hidden", "32", "--layers", "1", "--batch-size", "8", "--seq-len", "32", "--no-preview",
            "--device", "cpu", "--no-items", "--eval-every", "10", "--warmup", "5", "--eval-chars", "2000"]
    first = two_nodes("train", *args, "--max-steps", "20", roots=roots)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-1500:] + first[1].stderr[-1500:]
    run = roots[0] / "checkpoints" / "words"
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    assert not (roots[1] / "checkpoints" / "words").exists()  # only the global rank 0 writes the run
    # Resume for longer: node 1 has no last.pt or best.pt on its disk; rank 0 reads them and sends them.
    longer = two_nodes("train", *args, "--max-steps", "40", "--resume", roots=roots)
    assert [r.returncode for r in longer] == [0, 0], longer[0].stderr[-1500:] + longer[1].stderr[-1500:]
    assert "best:" in longer[0].stderr and "Traceback" not in longer[0].stderr + longer[1].stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [10, 20, 30, 40]
    assert not (roots[1] / "checkpoints" / "words").exists()
    # A refusal on rank 0 (another seed) stops both machines with the same line, neither hangs.
    refused = two_nodes("train", *args, "--max-steps", "50", "--resume", "--seed", "9", roots=roots)
    assert all(r.returncode != 0 for r in refused)
    assert "--seed 9 differs" in refused[0].stderr and "--seed 9 differs" in refused[1].stderr


@pytest.mark.slow
def test_two_machines_interrupted_on_one_stop_together_and_resume_to_the_end(tmp_path, words_file):
    """Ctrl-C on the first machine's torchrun: every process stops at the same step (the stop is agreed),
    the run is saved on the first machine's disk only, nobody hangs; the same command plus --resume and a
    limit then finishes the run on both."""
    import torch

    roots = [tmp_path / "node0", tmp_path / "node1"]
    for root in roots:
        root.mkdir()
        (root / "words.txt").write_bytes(words_file.read_bytes())
    args = ["train", "words.txt", "--hidden", "32", "--layers", "1", "--batch-size", "8", "--seq-len", "32",
            "--no-preview", "--device", "cpu", "--no-items", "--eval-every", "10", "--warmup", "5",
            "--eval-chars", "2000"]
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=charlm-interrupt", "-m", "charlm", *args, "--max-steps", "100000"],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, root in enumerate(roots)]
    try:
        deadline = time.monotonic() + 180
        for line in procs[0].stderr:  # the first evaluation line: training is under way on both machines
            if line.lstrip().startswith("step") and " val " in line:
                break
            assert time.monotonic() < deadline, "no evaluation within 180 s"
        procs[0].send_signal(signal.SIGINT)
        for proc in procs:
            proc.communicate(timeout=60)  # a hang raises TimeoutExpired: a failure, not a stuck suite
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode != 0 for proc in procs)  # interrupted, not finished
    run = roots[0] / "checkpoints" / "words"
    stopped = torch.load(run / "last.pt", weights_only=True)["step"]
    assert 10 <= stopped < 100000 and not (roots[1] / "checkpoints" / "words").exists()
    finish = two_nodes(*args, "--max-steps", str(stopped + 20), "--resume", roots=roots)
    assert [r.returncode for r in finish] == [0, 0], finish[0].stderr[-1500:] + finish[1].stderr[-1500:]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == stopped + 20
    assert "best:" in finish[0].stderr and "Traceback" not in finish[0].stderr + finish[1].stderr
