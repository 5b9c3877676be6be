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


def invoke(runner: CliRunner, *args, **kwargs):
    """Run the CLI in-process; stdout and stderr kept apart."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


def run_cli(*args, cwd=None, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m charlm ARGS` as a real subprocess (the entry point users get)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


TINY = ["--hidden", "48", "--layers", "1", "--batch-size", "16", "--seq-len", "32", "--no-preview"]


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
