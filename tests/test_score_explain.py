"""charlm score / explain and the neuron ranking: the numbers users read must be the model's own."""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import selectors
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from charlm import checkpoint as ckpt
from charlm.runs import model_from_payload
from charlm.model import CharRNN, ModelConfig
from charlm.neurons import rank_units, text_features, unit_values
from charlm.score import ScoreChunk, default_context_id, score_ids, score_stream, score_text
from charlm.vocab import Vocabulary
from typer.testing import CliRunner

from conftest import invoke, word_text

ANSI = re.compile(r"\x1b\[[0-9;]*m")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_vocab(trained_run):
    model, vocab = model_from_payload(ckpt.load(trained_run))
    return model.eval(), vocab


def _lines(output: str) -> list:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


# ============================================================================================== score
def test_eval_scores_what_score_does_after_the_first_character(runner, trained_run, tmp_path):
    """Both start where sampling does, after one line break: score predicts the text's first character from
    there, eval starts its state there and scores from the second character on. So eval's total is score's
    total less the first character's nats, to the last digit the two passes share."""
    text = word_text(60, seed=3)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    s = invoke(runner, "score", tmp_path / "t.txt", "-c", trained_run, "--streams", "1")
    e = invoke(runner, "eval", tmp_path / "t.txt", "-c", trained_run, "--streams", "1", "--json")
    assert s.exit_code == 0 and e.exit_code == 0, s.stderr + e.stderr
    rows, report = _lines(s.stdout), json.loads(e.stdout)
    assert len(rows) == len(text) and report["chars"] == len(text) - 1
    after_first = -sum(r["logprob"] for r in rows[1:])
    assert report["loss"] == pytest.approx(after_first / (len(text) - 1), abs=1e-4)
    # a trained model knows this text: far below the uniform guess over its vocabulary
    assert report["loss"] < 0.5 * math.log(len(ckpt.load(trained_run)["vocab"]))


def test_json_lines_describe_every_character(runner, trained_run, tmp_path):
    text = "the quick fox\nruns into the dark forest\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = invoke(runner, "score", tmp_path / "t.txt", "-c", trained_run)
    assert result.exit_code == 0, result.stderr
    rows = _lines(result.stdout)
    assert [r["i"] for r in rows] == list(range(len(text)))
    assert "".join(r["char"] for r in rows) == text
    for r in rows:
        probs = [p for _, p in r["top"]]
        assert len(r["top"]) == 5 and probs == sorted(probs, reverse=True) and r["logprob"] <= 0
        tops = [c for c, _ in r["top"]]
        assert (r["rank"] == 0) == (tops[0] == r["char"])
        if r["char"] in tops:  # the listed probability is the scored one, and the rank its place
            assert math.log(r["top"][tops.index(r["char"])][1]) == pytest.approx(r["logprob"], abs=1e-4)
            assert tops.index(r["char"]) == r["rank"]
        else:
            assert r["rank"] >= 5 and math.exp(r["logprob"]) <= probs[-1] + 1e-6
    summary = json.loads(invoke(runner, "score", tmp_path / "t.txt", "-c", trained_run, "--summary",
                                "--json").stdout)
    assert summary["nats"] == pytest.approx(-sum(r["logprob"] for r in rows), rel=1e-5)
    worst = max(range(len(rows)), key=lambda i: -rows[i]["logprob"])
    assert any(s["start"] <= worst < s["start"] + 24 for s in summary["surprising_spans"])


def _first_line(pipe, within_s: float) -> tuple:
    """The first line from pipe and whatever came after it, or a failure once within_s pass without one (a
    score that waits for the end of its input would otherwise hang the suite, stdin being held open)."""
    sel, got, deadline = selectors.DefaultSelector(), b"", time.monotonic() + within_s
    sel.register(pipe, selectors.EVENT_READ)
    while b"\n" not in got:
        left = deadline - time.monotonic()
        assert left > 0 and sel.select(left), f"no line from `score -` within {within_s:.0f} s of input"
        chunk = os.read(pipe.fileno(), 65536)
        assert chunk, "score closed its output before printing a line"
        got += chunk
    line, _, more = got.partition(b"\n")
    return line, more


def test_stdin_streams_results_before_the_input_ends(trained_run, tmp_path):
    """`-` reads stdin piece by piece: a line comes out while the writer is still holding the pipe open."""
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "score", "-", "-c", str(trained_run), "--device",
                             "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        proc.stdin.write(b"the fox runs\n")
        proc.stdin.flush()
        line, more = _first_line(proc.stdout, within_s=120)  # stdin is still open: a deadline, not a hang
        first = json.loads(line)
        assert first == {**first, "i": 0, "char": "t"}
        proc.stdin.write(b"over the dog\n")
        proc.stdin.close()
        rest = [json.loads(line) for line in (more + proc.stdout.read()).splitlines()]
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    rows = [first] + rest
    assert "".join(r["char"] for r in rows) == "the fox runs\nover the dog\n"
    (tmp_path / "t.txt").write_text("the fox runs\nover the dog\n", encoding="utf-8")
    from_file = _lines(invoke(CliRunner(), "score", tmp_path / "t.txt", "-c", trained_run).stdout)
    assert [r["logprob"] for r in rows] == pytest.approx([r["logprob"] for r in from_file], abs=1e-5)


def test_unknown_characters_error_names_them_or_are_skipped(runner, trained_run, tmp_path):
    (tmp_path / "t.txt").write_text("the fox Ωruns §\n", encoding="utf-8")
    bad = invoke(runner, "score", tmp_path / "t.txt", "-c", trained_run)
    assert bad.exit_code != 0 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Ω" in bad.stderr and "§" in bad.stderr
    assert "--unknown skip" in bad.stderr
    ok = invoke(runner, "score", tmp_path / "t.txt", "-c", trained_run, "--unknown", "skip")
    assert "".join(r["char"] for r in _lines(ok.stdout)) == "the fox runs \n"


def test_parallel_streams_match_one_stream_and_keep_order(model_vocab):
    model, vocab = model_vocab
    ids = vocab.encode(word_text(300, seed=5))
    one = ScoreChunk.concat(list(score_stream(model, [ids], "cpu", vocab=vocab, chunk=999)))
    pieces = [ids[a : a + 1234] for a in range(0, len(ids), 1234)]
    chunks = list(score_ids(model, pieces, "cpu", vocab=vocab, streams=4, row_chars=1000, burn_in=256))
    par = ScoreChunk.concat(chunks)
    assert [c.start for c in chunks] == list(np.cumsum([0] + [len(c) for c in chunks[:-1]]))
    assert np.array_equal(par.ids, ids) and len(chunks) > 4
    # warmed rows approximate the unbroken pass (eval's own approximation): per character, not just on average
    assert np.abs(par.logprob - one.logprob).max() < 2e-3
    assert abs(par.logprob.mean() - one.logprob.mean()) < 1e-4
    # and the contract's small-text entry point is the same one-stream pass
    small = score_text(model, vocab, "the fox", "cpu")
    assert np.allclose(small.logprob, ScoreChunk.concat(list(score_stream(
        model, [vocab.encode("the fox")], "cpu", context_id=default_context_id(vocab)))).logprob, atol=1e-6)


# ============================================================================================== explain
def test_explain_terminal_colours_by_surprisal_within_80_columns(runner, trained_run, tmp_path):
    text = "the quick brown fox runs into the dark green forest and over a lazy dog " * 3 + "zzq\n"
    rows = _lines(invoke(runner, "score", "-", "-c", trained_run, input=text).stdout)
    worst = max(rows, key=lambda r: -r["logprob"])
    bits = -worst["logprob"] / math.log(2)
    colour = ["#c8ecd0", "#eef3a6", "#ffe08a", "#ffb070", "#ff7070"][sum(bits >= b for b in (1, 2, 4, 8))]
    rgb = ";".join(str(int(colour[k : k + 2], 16)) for k in (1, 3, 5))
    terminal = {"FORCE_COLOR": "1", "COLORTERM": "truecolor", "COLUMNS": "200"}  # a wide true-colour terminal
    result = invoke(runner, "explain", text, "-c", trained_run, env=terminal)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"48;2;{rgb}m{worst['char']}" in out  # the most surprising character wears its bin's colour
    plain = ANSI.sub("", out)
    assert "surprisal (bits)" in plain and "bits/char" in plain
    assert max(len(line) for line in plain.splitlines()) <= 80
    piped = invoke(runner, "explain", text, "-c", trained_run)  # not a terminal: no escape codes at all
    assert "\x1b[" not in piped.stdout and piped.stdout.startswith(text.rstrip("\n"))


def test_explain_html_is_self_contained_and_carries_the_scores(runner, trained_run, tmp_path):
    text = "the fox runs into the forest\nand over a dog\n" * 4
    page_path = tmp_path / "page.html"
    result = invoke(runner, "explain", text, "-c", trained_run, "--html", page_path, "--neurons")
    assert result.exit_code == 0, result.stderr
    page = page_path.read_text(encoding="utf-8")
    assert not re.search(r"https?://|<link|src=|@import|url\(", page)  # nothing to fetch
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    ids = np.frombuffer(base64.b64decode(data["ids"]), dtype="<u2")
    assert "".join(data["vocab"][i] for i in ids) == text
    lp = np.frombuffer(base64.b64decode(data["lp"]), dtype="<f4")
    rows = _lines(invoke(runner, "score", "-", "-c", trained_run, input=text).stdout)
    assert lp == pytest.approx([r["logprob"] for r in rows], abs=1e-5)
    assert {f for u in data["units"] for f in u["corr"]} >= {"position in line", "inside a word"}


def test_explain_unit_and_input_errors(runner, trained_run, tmp_path):
    bad = invoke(runner, "explain", "the fox", "-c", trained_run, "--unit", "48")
    assert bad.exit_code == 2 and "units 0..47" in bad.stderr
    both = invoke(runner, "explain", "the fox", "--file", tmp_path / "x.txt", "-c", trained_run)
    assert both.exit_code == 2 and "one of them" in both.stderr
    one = invoke(runner, "explain", "the fox runs", "-c", trained_run, "--unit", "5")
    assert one.exit_code == 0 and "layer 1 unit 5" in one.stdout and "inside a word r=" in one.stdout


# ============================================================================================== neurons
def _quoted_text(spans: int, seed: int) -> str:
    """Words in plain runs and in quoted runs; inside quotes words are joined by _ instead of a space, so
    only a model that remembers whether a quote is open can predict what follows a word."""
    rng = random.Random(seed)
    words = "the fox runs over a dog and into green forest".split()
    parts = []
    for _ in range(spans):
        ws = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        parts.append('"' + "_".join(ws) + '"' if rng.random() < 0.5 else " ".join(ws))
    return " ".join(parts)


def test_text_features_follow_the_text():
    f = text_features('a "b (c" d\n  e')
    assert f["inside quotes"].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert f["bracket depth"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert f["position in line"].tolist()[-4:] == [10, 0, 1, 2]
    assert f["indentation"].tolist()[-3:] == [1, 2, 2] and f["after a newline"].tolist()[-3:] == [1, 0, 0]


def test_ranking_finds_the_quote_unit_of_a_trained_model():
    text = _quoted_text(600, seed=0)
    vocab = Vocabulary("".join(sorted(set(text))))
    ids = vocab.encode(text)
    probe, feats = ids[:3000], text_features(text[:3000])
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab.size, cell="lstm", hidden=24, layers=1, dropout=0.0))
    before = rank_units(model, probe, feats, "cpu", 0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    data = torch.from_numpy(ids)
    for _ in range(300):  # random 48-character windows: enough to learn that quotes change the joiner
        starts = torch.randint(0, len(ids) - 49, (16,))
        batch = torch.stack([data[s : s + 49] for s in starts])
        logits, _ = model(batch[:, :-1], model.init_state(16))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab.size), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = rank_units(model, probe, feats, "cpu", 0)
    k = after.features.index("inside quotes")
    trained = float(np.abs(after.corr[k]).max())
    untrained = float(np.abs(before.corr[before.features.index("inside quotes")]).max())
    assert trained > 0.75 and trained > untrained + 0.25, (trained, untrained)
    best = after.best("inside quotes", 1)[0]
    assert abs(after.corr[k, best]) == pytest.approx(trained)
    # the reported r is the correlation of the unit's actual values with the feature
    values = unit_values(model, probe, [best], "cpu", 0)[:, 0]
    assert np.corrcoef(values, feats["inside quotes"])[0, 1] == pytest.approx(after.corr[k, best], abs=1e-4)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_activations_are_the_states_sampling_walks_through(cell):
    """Every recorded value is the hidden (and LSTM cell) state the model's own step reaches at that character,
    layer by layer: the per-layer replay and the cell-state recurrence add nothing of their own."""
    from charlm.neurons import activations, unit_name

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(20, cell=cell, hidden=16, layers=2)).eval()
    ids = np.random.RandomState(0).randint(0, 20, size=150)
    got = np.concatenate([a for _, a in activations(model, ids, "cpu", context_id=3, chunk=64)])
    _, state = model.step(torch.tensor([3]), model.init_state(1))
    expected = []
    for i in ids:
        _, state = model.step(torch.tensor([int(i)]), state)
        parts = state if cell == "lstm" else (state,)
        expected.append(torch.cat([p.reshape(-1) for p in parts]).numpy())
    assert got.shape == (150, 64 if cell == "lstm" else 32)
    assert np.abs(got - np.array(expected)).max() < 1e-5
    assert unit_name(model, 17) == "layer 2 unit 1"
    if cell == "lstm":
        assert unit_name(model, 33) == "layer 1 cell 1"


# ============================================================================================== reading the text
# score, explain and eval read their input with the corpus decoder, as the model's training text was read.
CRLF_TEXT = "ab ba\r\nba ab\r\n" * 20


def _untrained_run(folder, keep_crlf: bool):
    """A checkpoint over a vocabulary with CR, read with or without --keep-crlf: this is about reading the
    text, not about what the model learned."""
    from charlm.model import CharRNN, ModelConfig

    torch.manual_seed(0)
    chars = "\n\r ab"
    config = ModelConfig(len(chars), hidden=8, layers=1)
    folder.mkdir()
    ckpt.save({"model_config": config.to_dict(), "vocab": chars, "model": CharRNN(config).state_dict(),
               "corpus": {"path": "train.txt", "encoding": "utf-8", "keep_crlf": keep_crlf}}, folder / "best.pt")
    return folder


def test_score_and_explain_read_line_ends_as_the_model_was_trained(runner, tmp_path):
    kept, folded = _untrained_run(tmp_path / "kept", True), _untrained_run(tmp_path / "folded", False)
    path = tmp_path / "crlf.txt"
    path.write_bytes(CRLF_TEXT.encode())
    lf_text = CRLF_TEXT.replace("\r\n", "\n")
    for run, want in ((kept, CRLF_TEXT), (folded, lf_text)):
        scored = invoke(runner, "score", path, "-c", run)
        assert scored.exit_code == 0, scored.stderr
        assert "".join(r["char"] for r in _lines(scored.stdout)) == want
        piped = invoke(runner, "score", "-", "-c", run, input=CRLF_TEXT.encode())
        assert "".join(r["char"] for r in _lines(piped.stdout)) == want
        explained = invoke(runner, "explain", "--file", path, "-c", run)  # not a terminal: the text, then figures
        assert explained.exit_code == 0, explained.stderr
        shown = explained.stdout_bytes.decode()  # (Result.stdout would turn CRLF into LF itself)
        assert shown.startswith(want) and f"{len(want):,} characters" in shown
    # the option overrides what the checkpoint says, both ways
    folded_again = invoke(runner, "score", path, "-c", kept, "--no-keep-crlf")
    assert "".join(r["char"] for r in _lines(folded_again.stdout)) == lf_text
    forced = invoke(runner, "score", path, "-c", folded, "--keep-crlf")
    assert "".join(r["char"] for r in _lines(forced.stdout)) == CRLF_TEXT


def test_eval_reads_line_ends_as_the_model_was_trained(runner, tmp_path):
    kept, folded = _untrained_run(tmp_path / "kept", True), _untrained_run(tmp_path / "folded", False)
    path = tmp_path / "crlf.txt"
    path.write_bytes(CRLF_TEXT.encode())
    reports = {}
    for name, run in (("kept", kept), ("folded", folded)):
        result = invoke(runner, "eval", path, "-c", run, "--json", "--streams", "1")
        assert result.exit_code == 0, result.stderr
        reports[name] = json.loads(result.stdout)
    assert reports["kept"]["chars"] == len(CRLF_TEXT) - 1  # every character after the first, CRs included
    assert reports["folded"]["chars"] == len(CRLF_TEXT.replace("\r\n", "\n")) - 1
    assert reports["kept"]["loss"] != pytest.approx(reports["folded"]["loss"])


def test_a_bad_byte_cut_by_a_read_piece_is_named_at_its_offset(runner, trained_run, tmp_path):
    """The three-byte '€' cut after its first byte exactly where the first 1 MiB read ends, and followed
    by a letter: the offset named is the cut byte's, in the whole file."""
    at = (1 << 20) - 1
    raw = (b"the fox runs\n" * (at // 13 + 1))[:at] + b"\xe2" + b"x dog\n"
    path = tmp_path / "cut.txt"
    path.write_bytes(raw)
    result = invoke(runner, "explain", "--file", path, "-c", trained_run)
    assert result.exit_code == 1 and result.stdout == ""
    assert f"cut.txt: not valid utf-8 at byte offset {at} (byte 0xe2)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("cut", range(5))
def test_score_stdin_names_a_bad_byte_wherever_the_pieces_fall(runner, trained_run, monkeypatch, cut):
    import charlm.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "_PIECE_BYTES", 5)  # pieces of 5 bytes: the bad sequence lands on each cut
    raw = b"the fox " + b"r" * cut + "€".encode()[:2] + b"uns\n"
    result = invoke(runner, "score", "-", "-c", trained_run, input=raw)
    assert result.exit_code == 1
    assert f"stdin: not valid utf-8 at byte offset {8 + cut} (byte 0xe2)" in result.stderr
