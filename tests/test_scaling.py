"""Beyond one process: torchrun + DDP on the CPU (gloo), and CUDA when present."""

import json

import pytest
import torch

from charlm.errors import CharlmError
from charlm.runtime import resolve_precision, setup_distributed
from conftest import run_cli, torchrun


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp32"), ((6, 1), "fp32"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_does_it_natively(monkeypatch, capability, expected):
    """torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (a T4, GTX 16xx, RTX 20xx: compute
    capability 7.5), which runs slower than fp32; --precision auto takes bf16 from 8.0 (Ampere) on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"  # asked for by name: the user's choice


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_processes_than_gpus_is_one_clear_error(monkeypatch, device):
    """torchrun --nproc_per_node=2 on a machine with one GPU: every process says the same line (they all see the
    same counts) before joining the process group, instead of rank 1 failing on cuda:1 with a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    messages = []
    for rank in (0, 1):
        for key, value in {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": "2"}.items():
            monkeypatch.setenv(key, str(value))
        with pytest.raises(CharlmError) as caught:
            setup_distributed(device)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "2 processes" in messages[0] and "1 CUDA device" in messages[0]
    assert "--nproc_per_node=1" in messages[0] and "--device cpu" in messages[0]


def val_losses(run_dir):
    return [json.loads(line)["val_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Plain SGD, no clipping, no dropout: the update is lr x the gradient itself, so a gradient averaged with the
# wrong scale across processes (or masks drawn differently) shows in the loss, where AdamW's normalisation and
# a clip would hide it. --device cpu: gloo runs on the CPU compared with a single CPU process (conftest.on_cpu).
EXACT = ["--hidden", "48", "--layers", "1", "--batch-size", "16", "--seq-len", "32", "--no-preview",
         "--precision", "fp32", "--eval-every", "10", "--seed", "5", "--optimizer", "sgd", "--lr", "0.5",
         "--clip", "1e9", "--dropout", "0", "--warmup", "0", "--device", "cpu"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, words_file):
    two = torchrun("train", words_file, "--max-steps", "20", "--out", tmp_path / "two", *EXACT, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes" in two.stderr
    assert two.stderr.count("stopped:") == 1  # only rank 0 prints
    one = run_cli("train", words_file, "--max-steps", "20", "--out", tmp_path / "one", *EXACT, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    a, b = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert len(a) == len(b) == 2 and a[-1] < a[0] - 0.02  # it learned, so a wrong scale would show
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    # a DDP checkpoint is a plain one: no `module.` prefixes, loads and samples in a single process
    state = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)
    sample = run_cli("sample", "-c", tmp_path / "two", "--prime", "the ", "-n", "20", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("the ")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_cuda_training_learns_and_resumes_on_the_cpu(tmp_path, words_file, cell):
    """bf16 on a GPU learns the words (well below the unigram entropy), and its checkpoint, carried state
    included, resumes in fp32 on the CPU and samples there."""
    import numpy as np

    run = tmp_path / "gpu"
    flags = ["--hidden", "128", "--layers", "2", "--batch-size", "32", "--seq-len", "64", "--no-preview",
             "--eval-every", "100", "--lr", "1e-2", "--cell", cell, "--out", run]
    trained = run_cli("train", words_file, "--max-steps", "300", "--device", "cuda", "--precision", "bf16", *flags,
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "cuda" in trained.stderr and "bf16" in trained.stderr
    text = words_file.read_text()
    counts = np.array([text.count(c) for c in set(text)], dtype=float)
    unigram = float(-(counts / counts.sum() * np.log(counts / counts.sum())).sum())
    report = run_cli("eval", words_file, "-c", run, "--device", "cpu", "--json", cwd=tmp_path)
    assert json.loads(report.stdout)["loss"] < 0.6 * unigram, (report.stdout, unigram)
    payload = torch.load(run / "last.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in payload["carried_state"])
    resumed = run_cli("train", words_file, "--max-steps", "320", "--device", "cpu", "--precision", "fp32", "--resume",
                      *flags, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 320
    sample = run_cli("sample", "-c", run, "--device", "cpu", "--prime", "the", "-n", "20", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("the")


@pytest.mark.parametrize("env, expected", [
    ({"LOCAL_WORLD_SIZE": "2"}, 8),  # two processes on 16 cores share them
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 8),  # torchrun's own 1 for K > 1 would idle 14 cores
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 3),  # the user's number
    ({"LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}, 1),  # one process a "machine", two rehearsed on one box
    ({"OMP_NUM_THREADS": "many"}, 4),  # not a number: as if unset (world 4, no LOCAL_WORLD_SIZE)
])
def test_a_torchrun_process_on_the_cpu_shares_the_cores_unless_told_its_threads(env, expected):
    from charlm.runtime import cpu_threads

    assert cpu_threads(env, cores=16, world=4) == expected  # LOCAL_WORLD_SIZE, where set, wins over world
