"""What a user sees and keeps: summaries, previews, metrics, run directories, named corpora, fine-tuning."""

import hashlib
import json
import re
import urllib.error
import urllib.request

import pytest
import torch

from charlm import datasets
from charlm.errors import CharlmError
from charlm.model import CharRNN, ModelConfig
from charlm.sample import Sampler
from charlm.vocab import Vocabulary

from conftest import TINY, invoke, word_text

METRIC_KEYS = {"step", "epoch", "chars", "train_loss", "val_loss", "bpc", "lr", "chars_per_s", "elapsed_s"}


def test_metrics_jsonl_has_one_object_per_evaluation(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150]
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_summaries_and_preview(runner, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(word_text(200), encoding="utf-8")  # ~9k characters: warned as very little text
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", "--max-steps", "20", "--eval-every", "10",
                    "--hidden", "256", "--batch-size", "8", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "vocabulary" in err and "parameters" in err and "streams" in err
    assert "very little text" in err and "rule of thumb" in err  # 200k+ parameters for ~8k characters
    assert "T=0.5:" in err and "T=1.0:" in err  # the preview samples, on by default
    assert "best: val loss" in err and "charlm sample -c" in err and "bpc" in err
    assert any(ch in err for ch in "▁▂▃▄▅▆▇█")  # the sparkline of the validation curve
    assert "━" not in err  # no progress-bar animation when stderr is not a terminal
    assert result.stdout == ""
    quiet = invoke(runner, "train", corpus, "--out", tmp_path / "quiet", "--max-steps", "10", "--eval-every", "10",
                   *TINY)
    assert "T=0.5:" not in quiet.stderr


def test_default_run_dirs_do_not_clobber_and_resume_finds_the_newest(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "notes.txt"
    corpus.write_text(word_text(300), encoding="utf-8")
    for _ in range(2):
        assert invoke(runner, "train", corpus, "--max-steps", "10", "--eval-every", "5", *TINY).exit_code == 0
    assert (tmp_path / "checkpoints/notes/best.pt").is_file() and (tmp_path / "checkpoints/notes-2/best.pt").is_file()
    cached = [f for f in (tmp_path / "checkpoints/.charlm-cache").iterdir() if not f.name.startswith(".")]
    assert len({f.stem for f in cached}) == 1  # one cache entry (ids and their description), shared by both runs
    resumed = invoke(runner, "train", corpus, "--max-steps", "15", "--eval-every", "5", "--resume", *TINY)
    assert resumed.exit_code == 0 and "checkpoints/notes-2" in resumed.stderr
    assert torch.load(tmp_path / "checkpoints/notes-2/last.pt", weights_only=True)["step"] == 15


def test_feeding_in_pieces_equals_feeding_at_once():
    torch.manual_seed(0)
    vocab = Vocabulary("abcd")
    model = CharRNN(ModelConfig(vocab_size=4, cell="lstm", hidden=16, layers=2))
    whole, parts = Sampler(model, vocab), Sampler(model, vocab)
    whole.feed(vocab.encode("abcabd"))
    parts.feed(vocab.encode("abc"))
    parts.feed(vocab.encode("abd"))
    assert torch.allclose(whole.logits, parts.logits, atol=1e-6)


def test_interactive_session_carries_state_between_turns(runner, trained_run):
    """Each turn continues from everything said so far: the session's output equals greedy one-shot samples
    primed with the whole conversation, and at least one turn differs from a sample primed with its line
    alone (so the comparison can tell a carried state from a reset one)."""
    def greedy(prime):
        result = invoke(runner, "sample", "-c", trained_run, "--greedy", "-n", "15", "--prime", prime)
        assert result.exit_code == 0 and result.stdout.startswith(prime)
        return result.stdout[len(prime):-1]

    session = invoke(runner, "sample", "-c", trained_run, "--interactive", "--greedy", "-n", "15", "--prime", "the",
                     input="fox\nd\n\n")
    assert session.exit_code == 0, session.output
    said, expected, differs = "", "", False
    for typed in ("the", "fox", "d", ""):  # the prime, two typed lines, then an empty line: the model goes on
        said += typed
        continuation = greedy(said)
        expected += typed + continuation + "\n"
        said += continuation
        differs |= bool(typed) and continuation != greedy(typed)
    assert session.stdout == expected
    assert differs


def test_novelty_reports_the_longest_copied_run(runner, trained_run):
    result = invoke(runner, "sample", "-c", trained_run, "--prime", "the ", "-n", "80", "--seed", "1", "--novelty")
    assert result.exit_code == 0
    line = next(x for x in result.stderr.splitlines() if x.startswith("novelty:"))
    found = re.search(r": (\d+) of 80 characters", line)
    assert found, line
    generated = result.stdout[len("the "):len("the ") + 80]
    corpus = word_text()  # what trained_run was trained on
    longest = max(n for n in range(81) if any(generated[i:i + n] in corpus for i in range(81 - n)))
    assert int(found.group(1)) == longest  # the longest run of the sample found verbatim in the corpus


def test_python_stdlib_corpus_is_built_offline(tmp_path):
    path = datasets.build_python_stdlib(tmp_path / "py.txt", limit=60_000)
    text = path.read_bytes()
    assert 10_000 < len(text) <= 60_000 and text.isascii() and b"def " in text


def test_shakespeare_download_offline_says_so(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(CharlmError, match="offline"):
        datasets.corpus_path("tinyshakespeare", data_dir=tmp_path)
    assert not list(tmp_path.iterdir())


class FakeResponse:
    def __init__(self, data):
        self.data, self.headers = data, {"Content-Length": str(len(data))}

    def read(self, n):
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_shakespeare_download_is_checksummed(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"not shakespeare"))
    with pytest.raises(CharlmError, match="SHA-256"):
        datasets.corpus_path("tinyshakespeare", data_dir=tmp_path)
    assert not (tmp_path / "tinyshakespeare.txt").exists()
    real = b"First Citizen:\n"
    monkeypatch.setattr(datasets, "SHAKESPEARE_SHA256", hashlib.sha256(real).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(real))
    seen = []
    path = datasets.download_shakespeare(tmp_path / "ts.txt", progress=lambda done, total: seen.append(done))
    assert path.read_bytes() == real and seen[-1] == len(real)


def test_unknown_named_corpus(runner):
    result = invoke(runner, "train", "--corpus", "nonesuch")
    assert result.exit_code == 1 and "python-stdlib" in result.stderr


def test_init_from_fine_tunes_with_the_old_vocabulary(runner, trained_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text(word_text(400, seed=9), encoding="utf-8")
    result = invoke(runner, "train", new, "--init-from", trained_run, "--out", tmp_path / "ft", "--max-steps", "10",
                    "--eval-every", "10", "--no-preview")
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "ft/metrics.jsonl").read_text().splitlines()[0])
    assert first["val_loss"] < 1.8  # it starts from a model that already knows the words
    tuned = torch.load(tmp_path / "ft/best.pt", weights_only=True)
    original = torch.load(trained_run / "best.pt", weights_only=True)
    assert tuned["vocab"] == original["vocab"] and tuned["model_config"] == original["model_config"]


# ============================================================================================== terminal widths
def _terminal(width: int):
    """A console like the CLI's stderr one (no wrapping of its own) on a terminal `width` columns wide."""
    import io

    from rich.console import Console

    return Console(width=width, file=io.StringIO(), force_terminal=True, soft_wrap=True, highlight=False)


def _screen_lines(console) -> list:
    """What the terminal shows: escape codes gone, tabs at 8-column stops, one entry per line."""
    import re

    return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).expandtabs(8) for line in console.file.getvalue().split("\n")]


@pytest.mark.parametrize("width", [60, 100])
def test_previews_show_tabs_as_symbols_within_the_terminal(width):
    from rich.cells import cell_len

    from charlm.cli.train_report import preview_fn
    from charlm.cli.display import TrainDisplay

    vocab = Vocabulary("\t\n\x0b ab")  # an untrained model over tab-heavy text: its samples are full of tabs
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab.size, hidden=8, layers=1))
    console = _terminal(width)
    display = TrainDisplay(console, preview_fn(vocab, "cpu"))
    display("eval", {"step": 1200, "train_loss": 1.234, "val_loss": 1.301, "val_chars": 16384, "bpc": 1.877,
                     "lr": 3e-3, "chars_per_s": 123456, "elapsed_s": 754, "best": True, "model": model})
    lines = _screen_lines(console)
    previews = [line for line in lines if line.lstrip().startswith("T=")]
    assert len(previews) == 2 and all("→" in line for line in previews)
    assert "\t" not in console.file.getvalue() and "\x0b" not in console.file.getvalue()
    assert all(cell_len(line) <= width for line in lines), [line for line in lines if cell_len(line) > width]


@pytest.mark.parametrize("width", [60, 100])
def test_end_summary_fits_the_terminal_and_keeps_the_command_whole(width, tmp_path, monkeypatch):
    import shlex
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from rich.cells import cell_len

    from charlm.cli.train_report import end_summary

    corpus = "/home/someone/Documents/manuals/the software manual, second edition (2024)/full text.txt"
    monkeypatch.chdir(tmp_path)
    argv = ["charlm", "train", corpus, "--max-time", "10m", "--hidden", "256", "--out", "checkpoints/manual",
            "--force"]
    monkeypatch.setattr(sys, "argv", argv)
    metrics = [{"val_loss": 3.0 - 0.01 * i} for i in range(150)]  # a long run: more evaluations than columns
    result = SimpleNamespace(stopped_by="max_time", step=12000, epoch=3, elapsed_s=600.0, eval_s=31.0,
                             best_val_loss=1.51, best_step=11800, metrics=metrics,
                             full_val={"loss": 1.52, "chars": 25000, "of": 250000, "se": 0.004, "step": 11800})
    console = _terminal(width)
    end_summary(console, result, Path("checkpoints/manual"), SimpleNamespace(patience=10), [])
    lines = [line for line in _screen_lines(console) if line]
    # nothing is wider than the terminal but a command's word that no line could hold: on a line of its own
    wide = [line for line in lines if cell_len(line) > width]
    assert all(len(shlex.split(line.rstrip("\\"))) == 1 for line in wide), wide
    assert len(wide) == (1 if cell_len(shlex.quote(corpus)) > width - 6 else 0)
    text = "\n".join(lines)
    assert "best:" in text and "train longer:" in text and "▁" in text
    # the command a reader copies: from after its label (or on its own lines) to the end, backslashes joining
    label = next(i for i, line in enumerate(lines) if line.startswith("train longer:"))
    first = next(i for i in range(label, len(lines)) if "charlm train" in lines[i])
    last = first
    while lines[last].endswith("\\"):
        last += 1
    pasted = "\n".join(lines[first : last + 1])
    pasted = pasted[pasted.index("charlm train"):].split(" with a larger")[0]
    # as a shell reads what was pasted: the command less --force (it started the run over in --out; on a resume
    # it would also accept a changed corpus without a word), plus --resume
    assert shlex.split(pasted.replace("\\\n", " ")) == ["charlm", "train", corpus, "--max-time", "10m", "--hidden",
                                                       "256", "--out", "checkpoints/manual", "--resume"]

