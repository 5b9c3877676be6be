"""Lists of things: recognising a list, training on items, sampling new items."""

from __future__ import annotations

import builtins
import json
import random

import numpy as np
import pytest
import torch

from charlm.items import Items, epoch_order, looks_like_items, sample_items, split_items
from charlm.model import CharRNN, ModelConfig
from charlm.vocab import Vocabulary
from conftest import run_cli

TINY = ["--hidden", "48", "--layers", "1", "--batch-size", "8", "--seq-len", "16", "--no-preview"]


def names(n=400, seed=0):
    rng = random.Random(seed)
    syllables = ["ka", "ri", "na", "mo", "le", "sa", "ti", "ro", "da", "ne", "vi", "lo", "ma", "ja", "ke", "lu"]
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).capitalize())
    return sorted(out)


def python_source():
    import inspect

    return inspect.getsource(json)


@pytest.mark.parametrize("text,expected", [
    ("\n".join(names()) + "\n", True),  # a names list
    ("\n".join(sorted(dir(builtins))) + "\n", True),  # a word list: Python's built-in names
    ("\n\n".join("\n".join(f"the rose and the {w} of line {i}" for i in range(4))
                 for w in ["moon", "sun", "sea"] * 6) + "\n", False),  # a poem with stanzas
    (python_source(), False),  # Python source
    ("\n".join(f"{n},{i},{i * 3}" for i, n in enumerate(names(100))) + "\n", False),  # a CSV
    ("\n".join(names(20)) + "\n", False),  # too few lines to call a list
    ("\n".join(" ".join(names(8, seed=i)) for i in range(80)) + "\n", False),  # sentences of 8 words
])
def test_list_detection_at_its_corners(text, expected):
    found, reason = looks_like_items(text)
    assert found is expected, reason


def test_items_split_at_random_and_reorder_every_epoch():
    vocab = Vocabulary("".join(sorted(set("\n".join(names()) + "\n"))))
    ids = vocab.encode("\n".join(names()) + "\n")
    items = Items.from_ids(ids, vocab.chars.index("\n"))
    assert len(items) == 400 and items.strings(vocab.decode)[:2] == names()[:2]
    train, val = split_items(items, 0.1, seed=3)
    assert len(val) == 40 and len(train) == 360
    held = set(val.strings(vocab.decode))
    assert not held <= set(names()[-60:])  # not the tail of the sorted list: spread through it
    assert set(train.strings(vocab.decode)) | held == set(names())
    orders = [epoch_order(len(train), 3, e) for e in range(3)]
    assert all(sorted(o.tolist()) == list(range(len(train))) for o in orders)  # permutations
    assert not np.array_equal(orders[0], orders[1]) and np.array_equal(orders[1], epoch_order(len(train), 3, 1))
    text = vocab.decode(train.text_ids(orders[1]))
    assert text.split("\n")[:-1] == [train.strings(vocab.decode)[k] for k in orders[1]]


def test_items_reshuffle_and_a_resumed_run_equals_an_unbroken_one(tmp_path):
    from charlm import checkpoint as ckpt
    from charlm.train import TrainConfig, Trainer

    text = "\n".join(names()) + "\n"
    vocab = Vocabulary("".join(sorted(set(text))))
    train, val = split_items(Items.from_ids(vocab.encode(text).astype(np.uint8), vocab.chars.index("\n")), 0.1, 3)

    def reshuffle(epoch):
        return train.text_ids(epoch_order(len(train), 3, epoch))

    assert not np.array_equal(reshuffle(0), reshuffle(1))
    config = TrainConfig(batch_size=8, seq_len=16, max_steps=40, eval_every=10, seed=3)
    meta = {"model_config": {}, "vocab": vocab.chars, "corpus": {}}

    def trainer(out, resume=None, callback=None):
        torch.manual_seed(3)
        model = CharRNN(ModelConfig(vocab_size=vocab.size, hidden=32, layers=1, dropout=0.2))
        return Trainer(model, None, val.text_ids(), config, out, torch.device("cpu"), meta, callback=callback,
                       resume=resume, reshuffle=reshuffle)

    whole = trainer(tmp_path / "whole")
    assert whole.n_chunks < 23  # an epoch is shorter than the run: the items are reordered on the way
    done = whole.run()
    cut = trainer(tmp_path / "split")
    cut.callback = lambda event, data: cut.request_stop() if event == "step" and data["step"] == 23 else None
    assert cut.run().stopped_by == "interrupt"
    rest = trainer(tmp_path / "split", resume=ckpt.load(tmp_path / "split", prefer=ckpt.LAST))
    assert rest.epoch >= 1  # resumed inside a later epoch, whose order must be rebuilt from (seed, epoch)
    again = rest.run()
    assert [m["val_loss"] for m in done.metrics] == [m["val_loss"] for m in again.metrics]
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), rest.model.state_dict().values()))


def test_sampling_items_skips_copies_and_gives_up_saying_why():
    vocab = Vocabulary("\na")  # every item this model can write is a run of a's
    model = CharRNN(ModelConfig(vocab_size=2, hidden=8, layers=1, dropout=0.0))
    known = {"a" * k for k in range(1, 65)}
    result = sample_items(model, vocab, 5, known, max_length=64, seed=1)
    assert not result["complete"] and result["items"] == []
    assert result["copies"] + result["rejected"] == result["drawn"] and result["copies"] > 0
    allowed = sample_items(model, vocab, 5, known, max_length=64, allow_copies=True, seed=1)
    assert allowed["complete"] and all(set(i.text) == {"a"} and not i.new for i in allowed["items"])


@pytest.fixture(scope="module")
def names_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    corpus = root / "names.txt"
    corpus.write_text("\n".join(names(600)) + "\n", encoding="utf-8")
    out = root / "run"
    result = run_cli("train", corpus, "--out", out, "--max-steps", "150", "--eval-every", "50", "--lr", "1e-2",
                     *TINY, cwd=root)
    assert result.returncode == 0, result.stderr
    return root, out


def test_item_model_samples_new_items_that_begin_with_the_prime(names_run):
    root, out = names_run
    result = run_cli("sample", "-c", out, "--prime", "Ka", "--num-samples", "12", "--seed", "1", cwd=root)
    assert result.returncode == 0, result.stderr
    got = result.stdout.splitlines()
    assert len(got) == 12 and len(set(got)) == 12
    assert all(g.startswith("Ka") and len(g) > 2 for g in got)  # the prime begins each item, never alone
    assert not set(got) & set(names(600))  # none is a copy of the list
    assert "already in the list" in result.stderr


def test_item_json_gives_log_probabilities_and_newness(names_run):
    root, out = names_run
    result = run_cli("sample", "-c", out, "--num-samples", "6", "--seed", "2", "--json", "--allow-copies",
                     "--max-length", "12", cwd=root)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    known = set(names(600))
    assert len(data["items"]) == 6
    for item in data["items"]:
        assert item["logprob"] < 0 and item["new"] == (item["text"] not in known)
        assert 1 <= len(item["text"]) <= 12


def test_a_list_the_model_cannot_escape_gives_up_with_one_line(tmp_path):
    corpus = tmp_path / "runs.txt"
    corpus.write_text("\n".join("a" * k for k in range(1, 70)) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    trained = run_cli("train", corpus, "--out", out, "--max-steps", "5", *TINY, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = run_cli("sample", "-c", out, "--num-samples", "3", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "found only 0 new item(s) of the 3 asked for" in result.stderr and "Traceback" not in result.stderr


def test_score_rank_puts_names_like_the_list_above_gibberish(names_run):
    root, out = names_run
    candidates = root / "candidates.txt"
    like = [n for n in names(600)[:3]]
    candidates.write_text("Kkkkkkkkk\n" + "\n".join(like) + "\nLllllllll\n", encoding="utf-8")
    result = run_cli("score", candidates, "-c", out, "--rank", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    ranked = [r["item"] for r in json.loads(result.stdout)]
    assert set(ranked[:3]) == set(like)  # the list's own kind of names first, the gibberish last
    values = [r["nats_per_char"] for r in json.loads(result.stdout)]
    assert values == sorted(values)


def test_a_folder_with_items_trains_each_file_as_one_item(tmp_path):
    """A folder of short multi-line files (poems, recipes) with --items: a file is an item. Sampling writes
    whole items (several lines each, never a copy of a file), eval counts the files, a resumed run keeps it;
    a folder of name lists with --items is still a list of names."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    pool = names(400, seed=3)
    files = {f"{pool[2 * k]}\n{pool[2 * k + 1]}\n" for k in range(150)}
    for k, text in enumerate(sorted(files)):
        (folder / f"{k:03d}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    trained = run_cli("train", folder, "--items", "--out", out, "--max-steps", "200", "--lr", "1e-2", *TINY,
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "150 files, one item per file" in trained.stderr
    sampled = run_cli("sample", "-c", out, "--num-samples", "20", "--seed", "1", "--json", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    items = [i["text"] for i in json.loads(sampled.stdout)["items"]]
    assert len(items) == 20 and not set(items) & files  # never a copy of a file
    assert all(text.endswith("\n") and "\x1e" not in text for text in items)  # each a whole file
    assert any("\n" in text[:-1] for text in items)  # items run across line breaks (a list of lines never does)
    plain = run_cli("sample", "-c", out, "--num-samples", "3", "--seed", "1", cwd=tmp_path)
    assert plain.stdout.count("\n---\n") == 2  # whole items, separated as samples are

    scored = run_cli("eval", folder, "-c", out, "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["items"]["count"] == 150
    resumed = run_cli("train", folder, "--out", out, "--resume", "--max-steps", "210", *TINY, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "one item per file" in resumed.stderr

    lists = tmp_path / "lists"
    lists.mkdir()
    for k in range(3):
        (lists / f"{k}.txt").write_text("\n".join(names(200, seed=10 + k)) + "\n", encoding="utf-8")
    as_lines = run_cli("train", lists, "--items", "--out", tmp_path / "lines", "--max-steps", "2", *TINY,
                       cwd=tmp_path)
    assert as_lines.returncode == 0, as_lines.stderr
    assert "one item per line" in as_lines.stderr and "per file" not in as_lines.stderr


def test_a_last_item_without_its_line_break_never_runs_into_the_next():
    vocab = Vocabulary("\nabcd")
    items = Items.from_ids(vocab.encode("ab\ncd\nda"), vocab.chars.index("\n"))  # no final line break
    assert items.strings(vocab.decode) == ["ab", "cd", "da"]
    assert vocab.decode(items.text_ids(np.array([2, 0, 1]))) == "da\nab\ncd\n"


def test_a_folder_trained_as_items_is_read_once_whichever_way_it_is_joined(runner, tmp_path, monkeypatch):
    """--items on a folder: the files are encoded once, joined as they will be trained (by U+001E for one item
    per file, by a blank line for one item per line), so the cache holds one entry per run, none unused."""
    from conftest import TINY, invoke

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / ".charlm-cache"
    entries = lambda: sorted(p.name for p in cache.glob("ids-*.bin"))  # noqa: E731
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pool = names(400, seed=3)
    for k in range(60):
        (pairs / f"{k:03d}.txt").write_text(f"{pool[2 * k]}\n{pool[2 * k + 1]}\n", encoding="utf-8")
    first = invoke(runner, "train", pairs, "--items", "--out", tmp_path / "run", "--max-steps", "2", *TINY)
    assert first.exit_code == 0, first.stderr
    assert "60 files, one item per file" in first.stderr
    assert len(entries()) == 1
    resumed = invoke(runner, "train", pairs, "--out", tmp_path / "run", "--resume", "--max-steps", "3", *TINY)
    assert resumed.exit_code == 0, resumed.stderr
    assert len(entries()) == 2  # its own entry: the vocabulary is fixed now

    lists = tmp_path / "lists"
    lists.mkdir()
    for k in range(3):
        (lists / f"{k}.txt").write_text("\n".join(names(200, seed=10 + k)) + "\n", encoding="utf-8")
    as_lines = invoke(runner, "train", lists, "--items", "--out", tmp_path / "lines", "--max-steps", "2", *TINY)
    assert as_lines.exit_code == 0, as_lines.stderr
    assert "one item per line" in as_lines.stderr
    assert len(entries()) == 3


def test_the_list_rule_reads_a_folder_joined_by_item_ends_as_if_by_blank_lines(tmp_path):
    from charlm.corpus import DOC_SEPARATOR, load_corpus
    from charlm.items import ITEM_END, joined_view

    folder = tmp_path / "f"
    folder.mkdir()
    for k, text in enumerate(["ab\ncd\n", "ef", "gh\n\n"]):
        (folder / f"{k}.txt").write_text(text, encoding="utf-8")
    blank = load_corpus(folder, separator=DOC_SEPARATOR)
    ends = load_corpus(folder, separator=ITEM_END)
    assert joined_view(ends, ITEM_END) == joined_view(blank, DOC_SEPARATOR) == ("ab\ncd\n\n\nef\n\ngh\n\n", True,
                                                                               False)
    (folder / "1.txt").write_text("e\x1ef", encoding="utf-8")  # a file holding the item end itself
    assert joined_view(load_corpus(folder, separator=ITEM_END), ITEM_END) is None
    assert joined_view(load_corpus(folder, separator=DOC_SEPARATOR), DOC_SEPARATOR)[2] is True


def test_a_wrong_guess_of_how_to_join_a_folder_still_trains_it_as_the_rule_says(runner, tmp_path, monkeypatch):
    """The guess made before encoding only saves a read: the list rule decides on the encoded text, so a guess
    the text contradicts reads the files again the right way, and a file holding U+001E is refused."""
    import importlib

    from conftest import TINY, invoke

    from charlm import checkpoint as ckpt

    plan = importlib.import_module("charlm.cli.train_plan")
    monkeypatch.chdir(tmp_path)
    lists = tmp_path / "lists"
    lists.mkdir()
    for k in range(3):
        (lists / f"{k}.txt").write_text("\n".join(names(200, seed=10 + k)) + "\n", encoding="utf-8")
    monkeypatch.setattr(plan, "files_are_items_likely", lambda *a: True)  # guessed: one item per file
    as_lines = invoke(runner, "train", lists, "--items", "--out", tmp_path / "lines", "--max-steps", "2", *TINY)
    assert as_lines.exit_code == 0, as_lines.stderr
    assert "one item per line" in as_lines.stderr and "per file" not in as_lines.stderr
    lines_run = ckpt.load(tmp_path / "lines")
    assert "\x1e" not in lines_run["vocab"] and "separator" not in lines_run["corpus"]  # joined by blank lines
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pool = names(400, seed=3)
    for k in range(60):
        (pairs / f"{k:03d}.txt").write_text(f"{pool[2 * k]}\n{pool[2 * k + 1]}\n", encoding="utf-8")
    monkeypatch.setattr(plan, "files_are_items_likely", lambda *a: False)  # guessed: one item per line
    as_files = invoke(runner, "train", pairs, "--items", "--out", tmp_path / "files", "--max-steps", "2", *TINY)
    assert as_files.exit_code == 0, as_files.stderr
    assert "60 files, one item per file" in as_files.stderr
    assert ckpt.load(tmp_path / "files")["corpus"]["separator"] == "\x1e"
    monkeypatch.setattr(plan, "files_are_items_likely", lambda *a: True)
    (pairs / "007.txt").write_text("ann\x1ebob\n", encoding="utf-8")  # the item end inside a file
    held = invoke(runner, "train", pairs, "--items", "--out", tmp_path / "held", "--max-steps", "2", *TINY)
    assert held.exit_code == 1 and "holds the character U+001E" in held.stderr and "Traceback" not in held.stderr
    assert not (tmp_path / "held").exists()


def test_items_start_after_training_items_as_they_do_in_training(names_run):
    """An item in training starts after other items, never from an empty state: the checkpoint keeps a few
    training items, and scoring and sampling read them before each item (score --rank's numbers equal one
    pass over context + item, a sampled item's log-probability equals its score)."""
    from charlm.items import CONTEXT_ITEMS, item_context, score_items
    from charlm.runs import load_model

    root, out = names_run
    payload, model, vocab, _ = load_model(out, "cpu")
    context = item_context(payload)
    read = context.split("\n")
    assert len(read) == CONTEXT_ITEMS + 1 and read[-1] == "" and set(read[:-1]) <= set(names(600))
    candidates = ["Karina", "Molesa", "Mokeda"]
    ranked = run_cli("score", "-", "-c", out, "--rank", "--json", cwd=root, input="\n".join(candidates) + "\n")
    assert ranked.returncode == 0, ranked.stderr
    got = {r["item"]: r["logprob"] for r in json.loads(ranked.stdout)}
    with torch.no_grad():
        for item in candidates:  # one pass over "\n" + context + item + "\n", the item's characters summed
            ids = torch.tensor(vocab.encode("\n" + context + item + "\n"))[None]
            logits, _ = model(ids[:, :-1], model.init_state(1))
            logp = torch.log_softmax(logits.float(), -1)[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            assert got[item] == pytest.approx(float(logp[-(len(item) + 1):].sum()), abs=1e-3)
    fresh = score_items(model, vocab, candidates)  # from an empty state: what the context changes
    assert not np.allclose(fresh, [got[c] for c in candidates], atol=1e-3)
    sampled = run_cli("sample", "-c", out, "--num-samples", "4", "--seed", "3", "--json", "--allow-copies",
                      cwd=root)
    assert sampled.returncode == 0, sampled.stderr
    items = json.loads(sampled.stdout)["items"]
    scores = score_items(model, vocab, [i["text"] for i in items], context=context)
    assert [i["logprob"] for i in items] == pytest.approx(list(scores), abs=1e-3)
