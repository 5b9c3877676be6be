"""Hostile input, generated: the CLI, driven in-process through its real entry point (charlm.cli.main, the
one a user's shell reaches) with option values inside and outside their ranges, random bytes as corpora,
primes, score input and checkpoints. For every one: exit 0, or a non-zero exit with exactly one line on
stderr and no traceback; and a refused command leaves every file already in the run directory as it was."""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from charlm.cli import main
from conftest import word_text

# 200 examples in all, each well under a second (tiny models, one step). No shrinking: it can spend minutes
# on one failure, and the failing example is printed as generated.
HOSTILE = settings(max_examples=50, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = ["--max-steps", "1", "--hidden", "8", "--layers", "1", "--embedding", "0", "--batch-size", "4",
        "--seq-len", "8", "--no-preview", "--no-items", "--device", "cpu"]

# Values an option may be handed: in range, out of range, not finite, not a number at all.
ODD = ["nan", "inf", "-inf", "-1", "0", "1e309", "-0", "abc", "", " ", "1e3", "0x10", "1_000", "99999999999999999999",
       "\u0663", "--", "-5.5", "1,5"]


def values(lo: float, hi: float, integer: bool = True, size: bool = False):
    """In range, odd, any integer or float, any short text. A size (of the model or the layout) is never
    generated far above its range: a valid 10^11-unit layer is a request for terabytes, which the run would
    try to allocate (and hang the suite on), not bad input."""
    inside = st.integers(int(lo), int(hi)) if integer else st.floats(lo, hi)
    odd = [v for v in ODD if v != "99999999999999999999"] if size else ODD
    return st.one_of(inside.map(str), st.sampled_from(odd),
                     st.integers(-10**12, 64 if size else 10**12).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.text(max_size=6))


def cli(args, stdin: bytes = b""):
    """(exit code, stdout, stderr) of `charlm ARGS` through main(), with CliRunner's isolated streams."""
    runner = CliRunner()
    argv = sys.argv
    code = None
    with runner.isolation(input=stdin) as streams:
        sys.argv = ["charlm", *[str(a) for a in args]]
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.argv = argv
        out, err = streams[0].getvalue(), streams[1].getvalue()
    code = 0 if code is None else code if isinstance(code, int) else 1
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0] == err.strip(), f"exit {code}, stderr not one line:\n{err}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny trained run (its corpus beside it) that each example copies."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "words.txt").write_text(word_text(60), encoding="utf-8")
    code, _, err = cli(["train", root / "words.txt", "--out", root / "run", *TINY])
    assert code == 0, err
    return root


def _copy(base: Path, where: Path) -> Path:
    shutil.copytree(base, where, dirs_exist_ok=True)
    return where / "run"


TRAIN_OPTIONS = {"--hidden": values(1, 16, size=True), "--layers": values(1, 2, size=True),
                 "--dropout": values(0, 0.9, False), "--embedding": values(0, 8, size=True),
                 "--batch-size": values(1, 8, size=True), "--seq-len": values(1, 16, size=True),
                 "--lr": values(1e-5, 1.0, False), "--weight-decay": values(0, 1, False), "--warmup": values(0, 5),
                 "--clip": values(0, 5, False), "--epochs": values(0.01, 1, False), "--max-steps": values(1, 2),
                 "--max-time": st.one_of(st.sampled_from(["1s", "0.5s", "2m", "0s", "-1s", "nans", "infs", "1x",
                                                          "1e400s", "s", "1.5h"]), values(0, 1, False)),
                 "--eval-chars": values(1, 4096), "--patience": values(0, 5), "--seed": values(0, 2**31),
                 "--cell": st.sampled_from(["rnn", "gru", "lstm", "GRU", "transformer", ""]),
                 "--optimizer": st.sampled_from(["adamw", "sgd", "rmsprop", "lion", ""]),
                 "--precision": st.sampled_from(["fp32", "bf16", "auto", "fp8", ""]),
                 "--encoding": st.sampled_from(["utf-8", "latin-1", "utf-16", "no-such-codec", ""])}


@HOSTILE
@given(options=st.dictionaries(st.sampled_from(sorted(TRAIN_OPTIONS)), st.none(), max_size=3).flatmap(
           lambda keys: st.fixed_dictionaries({k: TRAIN_OPTIONS[k] for k in keys})),
       corpus=st.one_of(st.none(), st.binary(max_size=400)), into=st.sampled_from(["new", "existing", "resume"]))
@example(options={"--lr": "1927200235"}, corpus=None, into="new")  # a loss too large for its perplexity's float
def test_train_with_generated_options_and_corpora(base, options, corpus, into):
    with tempfile.TemporaryDirectory() as tmp:
        run = _copy(base, Path(tmp))
        source = Path(tmp) / "words.txt"
        if corpus is not None:
            source = Path(tmp) / "random.bin"
            source.write_bytes(corpus)
        out = run if into != "new" else Path(tmp) / "fresh"
        args = ["train", source, "--out", out, *TINY, "--max-time", "3s"]
        for flag, value in options.items():
            args.append(f"{flag}={value}")  # `=`: a value that starts with '-' stays this option's value
        if into == "resume":
            args.append("--resume")
        before = hashes(run)
        code, out_text, err = cli(args)
        check(code, out_text, err)
        if code != 0:
            assert hashes(run) == before, "a refused train changed the run directory"


@HOSTILE
@given(length=values(0, 20, size=True), top_k=values(0, 10), top_p=values(0.01, 1, False), temperature=values(0.1, 2, False),
       num=values(1, 3, size=True), prime=st.one_of(st.none(), st.text(max_size=10)), prime_bytes=st.one_of(
           st.none(), st.binary(max_size=40)), unknown=st.sampled_from(["skip", "error", "ignore"]),
       stop=st.one_of(st.none(), st.text(max_size=3)))
def test_sample_with_generated_options_and_primes(base, length, top_k, top_p, temperature, num, prime, prime_bytes,
                                                  unknown, stop):
    with tempfile.TemporaryDirectory() as tmp:
        run = _copy(base, Path(tmp))
        args = ["sample", "-c", run, f"--length={length}", f"--top-k={top_k}", f"--top-p={top_p}",
                f"--temperature={temperature}", f"--num-samples={num}", "--seed", "1", "--unknown", unknown,
                "--device", "cpu"]
        if prime is not None:
            args.append(f"--prime={prime}")
        if prime_bytes is not None:
            (Path(tmp) / "prime.bin").write_bytes(prime_bytes)
            args += ["--prime-file", Path(tmp) / "prime.bin"]
        if stop is not None:
            args.append(f"--stop={stop}")
        before = hashes(run)
        code, out, err = cli(args)
        check(code, out, err)
        assert hashes(run) == before  # sampling never writes into the run


@HOSTILE
@given(data=st.binary(max_size=300), top=values(0, 8), streams=values(1, 4), how=st.sampled_from(
    ["stdin", "file", "summary", "rank", "eval", "explain"]), unknown=st.sampled_from(["skip", "error"]))
def test_score_eval_and_explain_random_bytes(base, data, top, streams, how, unknown):
    with tempfile.TemporaryDirectory() as tmp:
        run = _copy(base, Path(tmp))
        text = Path(tmp) / "input.bin"
        text.write_bytes(data)
        args = {"stdin": ["score", "-", "-c", run, f"--top={top}"],
                "file": ["score", text, "-c", run, f"--top={top}", f"--streams={streams}"],
                "summary": ["score", text, "-c", run, "--summary", f"--streams={streams}"],
                "rank": ["score", "-", "-c", run, "--rank"],
                "eval": ["eval", text, "-c", run, f"--streams={streams}"],
                "explain": ["explain", "--file", text, "-c", run]}[how]
        before = hashes(run)
        code, out, err = cli([*args, "--unknown", unknown, "--device", "cpu"], stdin=data)
        check(code, out, err)
        assert hashes(run) == before


@HOSTILE
@given(cut=st.floats(0, 1), noise=st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
       command=st.sampled_from(["info", "sample", "score", "eval", "export", "resume"]))
def test_damaged_checkpoints_are_refused_in_one_line(base, cut, noise, command):
    with tempfile.TemporaryDirectory() as tmp:
        run = _copy(base, Path(tmp))
        good = (run / "last.pt").read_bytes()
        damaged = good[: int(len(good) * cut)] if noise is None else noise
        (run / "last.pt").write_bytes(damaged)
        if (run / "best.pt").exists():
            (run / "best.pt").write_bytes(damaged)
        words = Path(tmp) / "words.txt"
        args = {"info": ["info", run / "last.pt"],
                "sample": ["sample", "-c", run / "last.pt", "--length", "5", "--device", "cpu"],
                "score": ["score", words, "-c", run / "last.pt", "--device", "cpu"],
                "eval": ["eval", words, "-c", run / "last.pt", "--device", "cpu"],
                "export": ["export", run / "last.pt", "-o", Path(tmp) / "m.pt2"],
                "resume": ["train", words, "--out", run, "--resume", *TINY]}[command]
        before = hashes(run)
        code, out, err = cli(args)
        check(code, out, err)
        if code != 0:
            assert hashes(run) == before, "a refused command changed the run directory"
