"""Bad input gets one clear line on stderr, a non-zero exit, no traceback, and nothing written or lost."""

import os

import pytest
import torch

from charlm import checkpoint as ckpt

from conftest import TINY, invoke, run_cli, word_text


def one_line_error(result, code=None, *fragments, after_progress=False):
    """The run fails with exactly one `error:` line; with after_progress, it comes last, after the summary
    and progress lines of a run that had started."""
    assert result.exit_code != 0 if code is None else result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    if after_progress:
        assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(word_text(300), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ corpora
@pytest.mark.parametrize("content,fragments", [
    (b"", ["is empty"]),
    (b"x", ["only 1 character", "at least 4"]),
    (b"some\x00binary", ["looks binary", "offset 4"]),
    (b"caf\xc3\xa9 ok \xff\xfe", ["not valid utf-8 at byte offset 9"]),
])
def test_bad_corpus_files(runner, tmp_path, content, fragments):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    result = invoke(runner, "train", path, "--out", tmp_path / "run", *TINY)
    one_line_error(result, 1, *fragments)
    assert not (tmp_path / "run").exists()  # bad input leaves no run directory behind


def test_missing_corpus_and_directory(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(invoke(runner, "train", tmp_path / "nope.txt"), 1, "no such file")
    one_line_error(invoke(runner, "train", tmp_path), 1, "is a folder with no files in it")
    one_line_error(invoke(runner, "train"), 2, "--corpus")
    assert not (tmp_path / "checkpoints").exists()


def without_file_privileges():
    """For a subprocess of root: drop the capabilities that let root read any file (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from the bounding set, so the program it runs meets file permissions as a user does."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_corpus(corpus, tmp_path):
    """A real permission error, as root too (CI runs as root): the read fails in the kernel, not in a stub."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    corpus.chmod(0)
    try:
        result = run_cli("train", corpus, "--out", tmp_path / "run", "--max-steps", "1", *TINY, cwd=tmp_path,
                         preexec_fn=without_file_privileges if root else None)
    finally:
        corpus.chmod(0o644)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(corpus.name) in lines[0], result.stderr
    assert "permission denied" in lines[0] or "not readable" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_tiny_corpus_adapts_the_layout(runner, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hello world\n" * 8, encoding="utf-8")  # 96 characters: less than one 128-chunk
    result = invoke(runner, "train", path, "--out", tmp_path / "run", "--max-steps", "5", "--eval-every", "5",
                    "--hidden", "16", "--layers", "1", "--batch-size", "64", "--seq-len", "128", "--no-preview")
    assert result.exit_code == 0, result.output
    assert "the corpus is small: using" in result.stderr
    assert (tmp_path / "run" / "best.pt").is_file()


def test_huge_single_line_and_mixed_line_ends(runner, tmp_path):
    path = tmp_path / "line.txt"
    path.write_bytes((word_text(2000).replace("\n", " ") + "\r\nend\nagain\r\n").encode())
    result = invoke(runner, "train", path, "--out", tmp_path / "run", "--max-steps", "5", "--eval-every", "5",
                    *TINY)
    assert result.exit_code == 0, result.output
    assert "CRLF -> LF" in result.stderr
    assert "\r" not in torch.load(tmp_path / "run" / "best.pt", weights_only=True)["vocab"]


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args,fragment", [
    (["--hidden", "0"], "--hidden"), (["--layers", "0"], "--layers"), (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"), (["--eval-every", "0"], "--eval-every"),
    (["--lr", "0"], "--lr must be a positive"), (["--lr", "-1"], "--lr must be a positive"),
    (["--clip", "0"], "--clip must be positive"), (["--max-steps", "0"], "--max-steps must be positive"),
    (["--epochs", "0"], "--epochs must be positive"), (["--dropout", "1"], "--dropout"),
    (["--val-frac", "0"], "--val-frac"), (["--val-frac", "1"], "--val-frac"), (["--val-frac", "1.5"], "--val-frac"),
    (["--max-time", "abc"], "cannot read the duration"), (["--max-time", "10x"], "cannot read the duration"),
    (["--max-time", "-5m"], "cannot read the duration"), (["--max-time", "0s"], "more than zero"),
    (["--cell", "foo"], "--cell must be one of"), (["--optimizer", "foo"], "--optimizer must be one of"),
    (["--nonlinearity", "sigmoid"], "--nonlinearity"), (["--precision", "fp8"], "--precision"),
    (["--encoding", "nonesuch"], "unknown --encoding"),
])
def test_bad_training_options(runner, corpus, tmp_path, args, fragment):
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", *args)
    one_line_error(result, None, fragment)
    assert not (tmp_path / "run" / "best.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(runner, corpus):
    one_line_error(invoke(runner, "train", corpus, "--device", "cuda"), 1, "no CUDA device")


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_paths_for_sample_eval_info(runner, tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    one_line_error(invoke(runner, "sample", "-c", tmp_path / "missing.pt"), 1, "no such checkpoint")
    one_line_error(invoke(runner, "sample", "-c", tmp_path / "empty"), 1, "holds no checkpoint")
    (tmp_path / "junk.pt").write_bytes(os.urandom(2000))
    one_line_error(invoke(runner, "eval", corpus, "-c", tmp_path / "junk.pt"), 1, "junk.pt")
    torch.save({"format": 7, "model": {}}, tmp_path / "future.pt")
    one_line_error(invoke(runner, "info", tmp_path / "future.pt"), 1, "format 7", "upgrade")


def test_truncated_checkpoint_via_cli(runner, trained_run, tmp_path):
    data = (trained_run / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    one_line_error(invoke(runner, "sample", "-c", tmp_path / "cut.pt"), 1, "cut.pt")


def test_code_running_checkpoint_via_cli(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"format": 1, "model": Exploit(), "model_config": {}, "vocab": "ab"}, tmp_path / "evil.pt")
    one_line_error(invoke(runner, "sample", "-c", tmp_path / "evil.pt"), 1, "run code")
    assert not (tmp_path / "PWNED").exists()


def test_resume_without_a_run(runner, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(invoke(runner, "train", corpus, "--resume"), 1, "no previous run")
    one_line_error(invoke(runner, "train", corpus, "--resume", "--out", tmp_path / "x"), 1, "no last.pt")


def test_resume_on_another_corpus_needs_force(runner, corpus, tmp_path):
    run = tmp_path / "run"
    assert invoke(runner, "train", corpus, "--out", run, "--max-steps", "5", "--eval-every", "5", *TINY).exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text(word_text(300, seed=4), encoding="utf-8")
    before = (run / "last.pt").read_bytes()
    one_line_error(invoke(runner, "train", other, "--out", run, "--resume", "--max-steps", "8", *TINY), 1, "SHA-256")
    assert (run / "last.pt").read_bytes() == before
    forced = invoke(runner, "train", other, "--out", run, "--resume", "--force", "--max-steps", "8", "--eval-every",
                    "5", *TINY)
    assert forced.exit_code == 0 and torch.load(run / "last.pt", weights_only=True)["step"] == 8


def test_init_from_with_new_characters_names_them(runner, trained_run, tmp_path):
    other = tmp_path / "caps.txt"
    other.write_text("THE QUICK FOX\n" * 50, encoding="utf-8")
    one_line_error(invoke(runner, "train", other, "--init-from", trained_run, "--out", tmp_path / "ft",
                          "--no-grow-vocab", "--max-steps", "1"), 1, "not in the model's vocabulary", "Q")


def test_existing_run_is_not_overwritten(runner, corpus, tmp_path):
    run = tmp_path / "run"
    assert invoke(runner, "train", corpus, "--out", run, "--max-steps", "5", "--eval-every", "5", *TINY).exit_code == 0
    before = (run / "best.pt").read_bytes()
    one_line_error(invoke(runner, "train", corpus, "--out", run, *TINY), 1, "already holds a run", "--resume")
    assert (run / "best.pt").read_bytes() == before


def test_unwritable_out(runner, corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(invoke(runner, "train", corpus, "--out", blocker / "run", *TINY), 1, "cannot write")


def test_full_disk_keeps_previous_checkpoints(runner, corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert invoke(runner, "train", corpus, "--out", run, "--max-steps", "5", "--eval-every", "5", *TINY).exit_code == 0
    best, last = (run / "best.pt").read_bytes(), (run / "last.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    result = invoke(runner, "train", corpus, "--out", run, "--resume", "--max-steps", "10", "--eval-every", "5", *TINY)
    one_line_error(result, 1, "No space left", "untouched", after_progress=True)
    assert (run / "best.pt").read_bytes() == best and (run / "last.pt").read_bytes() == last
    assert ckpt.load(run)["step"] == 5
    assert not [f for f in os.listdir(run) if ".tmp" in f]


# ------------------------------------------------------------------------------------------ numerics
def test_absurd_learning_rate_stops_the_run_and_keeps_best(runner, corpus, tmp_path):
    """A real divergence, no stub: a relu RNN fine-tuned with lr 1e6 overflows to inf within a few steps; the
    run stops with one line saying so, a non-zero exit, and the model it started from untouched. (A resumed
    run cannot change --lr: test_resume.py; the Trainer's own test resumes into a divergence and keeps
    best.pt: test_model_train.py.)"""
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    args = ["train", corpus, "--eval-every", "5", "--precision", "fp32", *TINY]
    assert invoke(runner, *args, "--out", run, "--cell", "rnn", "--nonlinearity", "relu", "--max-steps", "10",
                  "--lr", "1e-2").exit_code == 0
    best = (run / "best.pt").read_bytes()
    result = invoke(runner, *args, "--out", tuned, "--init-from", run, "--max-steps", "40", "--lr", "1e6",
                    "--clip", "1e9", "--warmup", "0")
    one_line_error(result, 1, "NaN or infinite", "lower --lr", after_progress=True)
    assert (run / "best.pt").read_bytes() == best
    for name in ("best.pt", "last.pt"):  # whatever the fine-tuning run wrote before it diverged is finite
        if (tuned / name).is_file():
            assert all(torch.isfinite(t).all() for t in ckpt.load(tuned / name)["model"].values())


def test_stop_string_and_length_bound_sampling(runner, trained_run):
    result = invoke(runner, "sample", "-c", trained_run, "--prime", "the", "-n", "2000", "--stop", " ", "--seed", "1")
    assert result.exit_code == 0 and result.stdout.rstrip("\n").endswith(" ") and len(result.stdout) < 2000
