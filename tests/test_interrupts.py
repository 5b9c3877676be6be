"""Ctrl-C and SIGTERM on a real `charlm train` process: saved, resumable, and the resumed run is exact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from charlm import checkpoint as ckpt

from conftest import TINY

FLAGS = ["--max-steps", "300", "--eval-every", "20", "--seed", "3", *TINY]


def start(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_first_eval(proc):
    """Read stderr until the first evaluation line (one per evaluation when stderr is not a terminal)."""
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("step"):
            return seen
    raise AssertionError("no evaluation line:\n" + "".join(seen))


def interrupted_run(words_file, out, sig, cwd, second_signal=False):
    proc = start("train", words_file, "--out", out, *FLAGS, cwd=cwd)
    wait_for_first_eval(proc)
    proc.send_signal(sig)
    if second_signal:
        time.sleep(0.05)
        proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, rest


@pytest.mark.slow
def test_sigint_saves_and_resume_is_exact(tmp_path, words_file):
    whole = subprocess.run([sys.executable, "-m", "charlm", "train", words_file, "--out", tmp_path / "whole", *FLAGS],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    code, stderr = interrupted_run(words_file, tmp_path / "cut", signal.SIGINT, tmp_path)
    assert code == 130, stderr
    assert "resume:" in stderr and "--resume" in stderr and "Traceback" not in stderr
    cut_at = ckpt.load(tmp_path / "cut", prefer=ckpt.LAST)["step"]
    assert 20 <= cut_at < 300
    resumed = subprocess.run([sys.executable, "-m", "charlm", "train", words_file, "--out", tmp_path / "cut", *FLAGS,
                              "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 300
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit for bit
    losses = [[json.loads(line)["val_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 15


@pytest.mark.slow
def test_sigterm_and_double_sigint(tmp_path, words_file):
    code, stderr = interrupted_run(words_file, tmp_path / "term", signal.SIGTERM, tmp_path)
    assert code == 143 and "--resume" in stderr
    assert ckpt.load(tmp_path / "term", prefer=ckpt.LAST)["step"] >= 20
    code, stderr = interrupted_run(words_file, tmp_path / "twice", signal.SIGINT, tmp_path, second_signal=True)
    assert code == 130, stderr
    payload = ckpt.load(tmp_path / "twice", prefer=ckpt.LAST)  # a second Ctrl-C corrupts nothing
    assert payload["step"] >= 20 and not [f for f in os.listdir(tmp_path / "twice") if ".tmp" in f]
