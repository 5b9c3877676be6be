"""Shared fixtures: small corpora written on the fly, a CLI runner, and trained tiny models."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from charlm.cli import app

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
WORDS = "the quick brown fox jumps over a lazy dog and runs into the dark green forest".split()


def word_text(lines: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(lines)) + "\n"


@pytest.fixture
def words_file(tmp_path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text(word_text(), encoding="utf-8")
    return path


@pytest.fixture
def hello_file(tmp_path) -> Path:
    path = tmp_path / "hello.txt"
    path.write_text("hello\n" * 400, encoding="utf-8")
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# The suite runs on the CPU wherever it runs. Its expected values are CPU semantics (bit-exact resumes, fp32
# losses, gloo under torchrun, the speed probe's timing), and --device auto would pick a GPU (in bf16) or MPS
# on a machine that has one. So invoke() and run_cli() add `--device cpu` to every command that takes
# --device unless the test names a device itself (a test of the auto choice passes `--device auto`), and TINY
# carries it for the tests that start `python -m charlm train` or torchrun themselves. CUDA and MPS tests are
# marked `cuda` / `mps` and skipped where the device is missing (pytest_runtest_setup below).
DEVICE_COMMANDS = {"train", "sample", "eval", "score", "explain", "serve"}


def on_cpu(args) -> list:
    """args as strings, with `--device cpu` added to a command that takes --device and was given none."""
    args = [str(a) for a in args]
    if args and args[0] in DEVICE_COMMANDS and not any(a == "--device" or a.startswith("--device=") for a in args):
        args += ["--device", "cpu"]
    return args


def invoke(runner: CliRunner, *args, **kwargs):
    """Run the CLI in-process; stdout and stderr kept apart. On the CPU unless args name a --device."""
    return runner.invoke(app, on_cpu(args), catch_exceptions=False, **kwargs)


def run_cli(*args, cwd=None, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m charlm ARGS` as a real subprocess (the entry point users get). On the CPU unless args
    name a --device."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "charlm", *on_cpu(args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def torchrun(*args, cwd, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC -m charlm ARGS` as a real subprocess, one thread a process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "charlm", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def refused(result, *fragments) -> str:
    """The one error line of a refused command (exit non-zero, no traceback), holding every fragment."""
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


TINY = ["--hidden", "48", "--layers", "1", "--batch-size", "16", "--seq-len", "32", "--no-preview",
        "--device", "cpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "mps: needs Apple's MPS device; skipped without one")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread per worker, in the worker and in the processes its tests start: the workers already fill
        # the cores, and two OpenMP threads on a busy core make a tiny model many times slower.
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): a worker per core, at most 8 (a torchrun test starts four processes of its
    own, and each worker holds its own torch)."""
    return max(1, min(8, os.cpu_count() or 1))


def pytest_runtest_setup(item):
    import torch

    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    mps = getattr(torch.backends, "mps", None)
    if item.get_closest_marker("mps") and not (mps is not None and mps.is_available()):
        pytest.skip("needs an MPS device")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A small model trained on word_text as running text, shared by the sampling and inspection tests.
    (--no-items keeps the text-model behaviour those tests check, one sample continuing the prime, whatever
    the list-detection rule makes of its short distinct lines.)"""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "words.txt"
    corpus.write_text(word_text(), encoding="utf-8")
    out = root / "run"
    result = run_cli("train", corpus, "--out", out, "--max-steps", "150", "--eval-every", "50", "--lr", "1e-2",
                     "--no-items", *TINY, cwd=root)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, which also leaves the other core to the rest of the suite (two
    OpenMP threads on a busy 2-core machine make a 48-unit model 100x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
