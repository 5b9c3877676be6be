"""Tags: where a corpus's tags come from (folder, file, field), how a tagged corpus is split, that the tag
conditions what the model writes and reads (two voices with different alphabets), the commands that take a
tag (sample, score, eval --by-tag, classify, info), and a tagged run that resumes as an unbroken one."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch

from charlm import checkpoint as ckpt
from charlm.errors import CharlmError
from charlm.model import CharRNN, ModelConfig
from charlm.tags import load_tagged, split_by_tag

from conftest import invoke, refused

LOW, UP = "abcdefg", "HIJKLMN"
FAST = ["--hidden", "64", "--layers", "1", "--batch-size", "16", "--seq-len", "32", "--no-preview", "--lr", "1e-2",
        "--no-items"]


def voice(letters: str, lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(8)) + "\n"
                   for _ in range(lines))


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """voices/low/*.txt written in lower-case letters, voices/up/*.txt in upper-case ones."""
    root = tmp_path_factory.mktemp("voices")
    for k in range(2):
        (root / "voices" / "low").mkdir(parents=True, exist_ok=True)
        (root / "voices" / "up").mkdir(parents=True, exist_ok=True)
        (root / "voices" / "low" / f"{k}.txt").write_text(voice(LOW, 250, k), encoding="utf-8")
        (root / "voices" / "up" / f"{k}.txt").write_text(voice(UP, 250, 10 + k), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tagged_run(voices):
    from typer.testing import CliRunner

    out = voices / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and leaves a core to the rest
    try:
        result = invoke(CliRunner(), "train", voices / "voices", "--tag-by", "folder", "--out", out,
                        "--max-steps", "150", *FAST)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr
    assert "2 by folder: low 50%, up 50%" in result.stderr
    return out


# ---------------------------------------------------------------------------------------------- the rules
def test_folder_file_and_field_rules(tmp_path):
    (tmp_path / "poems" / "dickinson").mkdir(parents=True)
    (tmp_path / "poems" / "whitman").mkdir()
    (tmp_path / "poems" / "dickinson" / "a.txt").write_text("hope is\n", encoding="utf-8")
    (tmp_path / "poems" / "dickinson" / "b.txt").write_text("the thing\n", encoding="utf-8")
    (tmp_path / "poems" / "whitman" / "c.txt").write_text("we sing\n", encoding="utf-8")
    by_folder = load_tagged([tmp_path / "poems"], "folder")
    assert by_folder.tags.names == ("dickinson", "whitman")
    text = by_folder.corpus.vocab.decode(by_folder.corpus.ids)
    assert text == "hope is\n\n\nthe thing\n\n\nwe sing\n"
    # every character carries its file's tag; the blank line after a file is that file's
    where = {ch: set() for ch in "pwg"}
    for ch, tag in zip(text, by_folder.track.tolist()):
        if ch in where:
            where[ch].add(tag)
    assert where == {"p": {0}, "w": {1}, "g": {0, 1}}  # "g": thinG (dickinson) and sinG (whitman)
    assert list(by_folder.track[-len("we sing\n"):]) == [1] * 8 and by_folder.tags.chars == (22, 8)

    by_file = load_tagged([tmp_path / "poems"], "file")
    assert by_file.tags.names == ("a", "b", "c")

    listed = tmp_path / "names.tsv"
    listed.write_text("fr\tamélie\njp\thiro\n\nfr\tzoé\n", encoding="utf-8")
    by_field = load_tagged([listed], "field")
    assert by_field.corpus.vocab.decode(by_field.corpus.ids) == "amélie\nhiro\nzoé\n"
    assert by_field.tags.names == ("fr", "jp")
    assert by_field.track.tolist() == [0] * 7 + [1] * 5 + [0] * 4


def test_bad_tagging_is_refused_in_one_line(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("abc\n", encoding="utf-8")
    (tmp_path / "flat" / "b.txt").write_text("def\n", encoding="utf-8")
    with pytest.raises(CharlmError, match="not in a sub-folder"):
        load_tagged([tmp_path / "flat"], "folder")
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "a.txt").write_text("abc\n", encoding="utf-8")
    with pytest.raises(CharlmError, match="only one tag"):
        load_tagged([tmp_path / "one"], "folder")
    listed = tmp_path / "bad.tsv"
    listed.write_text("fr\tami\nno tab here\n", encoding="utf-8")
    with pytest.raises(CharlmError, match="line 2, has no tab"):
        load_tagged([listed], "field")


def test_each_tag_keeps_its_own_validation_tail():
    # tag 0: ten "a"s then tag 1: ten "b"s, then tag 0 again (a second file of the first folder)
    ids = np.array([1] * 10 + [2] * 10 + [3] * 10, dtype=np.uint8)
    tags = np.array([0] * 10 + [1] * 10 + [0] * 10, dtype=np.uint8)
    train, train_tags, val, val_tags = split_by_tag(ids, tags, 2, 0.2)
    # tag 0 has 20 characters: its last 4 (all from its later part) validate; tag 1's last 2
    assert val.tolist() == [2, 2, 3, 3, 3, 3] and val_tags.tolist() == [1, 1, 0, 0, 0, 0]
    assert train.tolist() == [1] * 10 + [2] * 8 + [3] * 6 and train_tags.tolist() == [0] * 10 + [1] * 8 + [0] * 6


def test_tagged_step_matches_the_chunk_pass_and_the_tag_changes_the_prediction():
    for cell in ("rnn", "gru", "lstm"):
        for embedding in (0, 8):
            torch.manual_seed(0)
            model = CharRNN(ModelConfig(vocab_size=10, cell=cell, hidden=16, layers=2, embedding=embedding,
                                        tags=3, dropout=0.0)).eval()
            assert not model.tag_embed.weight.any()  # the tags start as the untagged model
            with torch.no_grad():
                model.tag_embed.weight.normal_()  # as if trained
            ids, tags = torch.randint(0, 10, (5, 7)), torch.tensor([0, 1, 2, 3, 1])  # 3 = untagged
            chunk, _ = model(ids, model.init_state(5), tags)
            state = model.init_state(5)
            for t in range(7):
                logits, state = model.step(ids[:, t], state, tags)
            assert torch.allclose(logits, chunk[:, -1], atol=1e-5)
            assert not torch.allclose(chunk[0], chunk[1])  # rows 0 and 1 differ only by their tag... and ids
            same = ids[:1].expand(2, -1)
            two, _ = model(same, model.init_state(2), torch.tensor([0, 1]))
            assert (two[0] - two[1]).abs().max() > 1e-4
            untagged, _ = model(same[:1], model.init_state(1))
            explicit, _ = model(same[:1], model.init_state(1), torch.tensor([3]))
            assert torch.equal(untagged, explicit)  # no tag given = the untagged row


def test_an_untagged_model_has_no_tag_weights_and_a_tagged_one_the_same_layers():
    plain = CharRNN(ModelConfig(vocab_size=10, hidden=16, layers=1))
    assert not any("tag" in k for k in plain.state_dict())
    tagged = CharRNN(ModelConfig(vocab_size=10, hidden=16, layers=1, tags=2))
    assert {k: v.shape for k, v in tagged.state_dict().items() if "tag" not in k} == \
        {k: v.shape for k, v in plain.state_dict().items()}  # the tag vectors add to the input, not to it


# ---------------------------------------------------------------------------------------------- commands
def test_each_tag_samples_in_its_own_alphabet(runner, tagged_run, one_thread):
    result = invoke(runner, "sample", "-c", tagged_run, "--tag", "low", "--tag", "up", "--num-samples", "3",
                    "--length", "200", "--seed", "1", "--json")
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["tags"] == ["low"] * 3 + ["up"] * 3
    for tag, text in zip(answer["tags"], answer["samples"]):
        letters = set(text) - {" ", "\n"}
        mine, other = (set(LOW), set(UP)) if tag == "low" else (set(UP), set(LOW))
        assert len(letters & mine) >= 5, text
        # a sample in one voice uses the other voice's letters at most as a slip
        assert sum(c in other for c in text) <= 0.02 * len(text), (tag, text)
    one = invoke(runner, "sample", "-c", tagged_run, "--tag", "up", "--length", "80", "--seed", "1")
    assert one.exit_code == 0 and sum(c in LOW for c in one.stdout) <= 2, one.stdout


def test_an_unknown_tag_and_a_tag_on_an_untagged_model_are_refused(runner, tagged_run, trained_run):
    refused(invoke(runner, "sample", "-c", tagged_run, "--tag", "mid", "--length", "5"), "unknown tag 'mid'",
            "low, up")
    refused(invoke(runner, "sample", "-c", trained_run, "--tag", "low", "--length", "5"), "trained without tags")
    refused(invoke(runner, "classify", str(tagged_run / "metrics.jsonl"), "-c", trained_run), "without tags")


def test_score_eval_and_classify_read_in_the_tags_voice(runner, tagged_run, voices, tmp_path, one_thread):
    held = tmp_path / "held_up.txt"
    held.write_text(voice(UP, 20, 99), encoding="utf-8")
    given = {}
    for tag in ("up", "low"):
        result = invoke(runner, "score", str(held), "-c", tagged_run, "--tag", tag, "--summary", "--json")
        assert result.exit_code == 0, result.stderr
        given[tag] = json.loads(result.stdout)["nats_per_char"]
    assert given["up"] < given["low"]  # the text's own voice finds it more likely

    result = invoke(runner, "classify", str(held), "-c", tagged_run, "--json")
    assert result.exit_code == 0, result.stderr
    ranked = json.loads(result.stdout)
    assert ranked["tag"] == "up" and [r["tag"] for r in ranked["ranking"]] == ["up", "low"]
    assert ranked["ranking"][0]["nats_per_char"] == pytest.approx(given["up"], abs=0.01)

    mixed = tmp_path / "mixed.txt"
    mixed.write_text(voice(LOW, 3, 5) + "\n" + voice(UP, 3, 6) + "\n" + voice(LOW, 3, 7), encoding="utf-8")
    result = invoke(runner, "classify", str(mixed), "-c", tagged_run, "--each", "paragraph", "--json")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(x)["tag"] for x in result.stdout.splitlines()] == ["low", "up", "low"]

    result = invoke(runner, "eval", voices / "voices", "-c", tagged_run, "--by-tag", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [x["tag"] for x in report["by_tag"]] == ["low", "up"]
    assert all(x["chars"] > 10_000 and x["loss"] <= x["untagged_loss"] + 0.01 for x in report["by_tag"])


def test_info_lists_the_tags_with_their_share(runner, tagged_run):
    result = invoke(runner, "info", tagged_run)
    assert result.exit_code == 0, result.stderr
    assert "tags: 2 by folder" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("low ", "up "))]
    assert [r[0] for r in rows] == ["low", "up"] and all(r[2].endswith("%") for r in rows)
    summary = json.loads(invoke(runner, "info", tagged_run, "--json").stdout)
    assert summary["corpus"]["tags"]["names"] == ["low", "up"]


def test_a_resumed_tagged_run_must_keep_its_tags(runner, tagged_run, voices):
    refused(invoke(runner, "train", voices / "voices", "--tag-by", "file", "--out", tagged_run, "--resume",
                   "--max-steps", "160", *FAST), "--tag-by file differs from --tag-by folder")


def test_tagged_items_follow_their_tags(runner, tmp_path, one_thread):
    """Names by country in a TAG<TAB>NAME list: each tag's new items are in its own alphabet."""
    rng = random.Random(3)
    rows = [f"{tag}\t{''.join(rng.choice(letters) for _ in range(rng.randint(4, 8)))}"
            for _ in range(600) for tag, letters in (("lo", LOW), ("up", UP))]
    listed = tmp_path / "names.tsv"
    listed.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "names"
    result = invoke(runner, "train", listed, "--tag-by", "field", "--items", "--out", out, "--max-steps", "150",
                    *[f for f in FAST if f != "--no-items"])
    assert result.exit_code == 0, result.stderr
    result = invoke(runner, "sample", "-c", out, "--tag", "lo", "--tag", "up", "--num-samples", "8", "--seed", "2")
    assert result.exit_code == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [t for t, _ in lines] == ["lo"] * 8 + ["up"] * 8
    for tag, name in lines:
        assert set(name) <= set(LOW if tag == "lo" else UP), (tag, name)
    if importlib.util.find_spec("starlette") and importlib.util.find_spec("uvicorn"):  # the serve extra
        from test_serve import Served

        served = Served(out, tmp_path)
        try:
            status, _, body = served.post("/v1/items", {"tag": "up", "count": 5, "seed": 2})
            assert status == 200, body
            cli = invoke(runner, "sample", "-c", out, "--tag", "up", "--num-samples", "5", "--seed", "2", "--json")
            assert body["items"] == [{k: v for k, v in i.items() if k != "tag"}
                                     for i in json.loads(cli.stdout)["items"]]
            assert all(set(i["text"]) <= set(UP) for i in body["items"])
        finally:
            served.proc.kill()
            served.proc.wait()


# ---------------------------------------------------------------------------------------------- resuming
@pytest.mark.parametrize("items", [False, True])
def test_a_resumed_tagged_run_equals_an_unbroken_one(tmp_path, one_thread, items):
    from charlm.items import Items, epoch_order, split_items
    from charlm.train import TrainConfig, Trainer
    from charlm.vocab import Vocabulary

    text = voice(LOW, 120, 1) + voice(UP, 120, 2)
    vocab = Vocabulary("".join(sorted(set(text))))
    ids = vocab.encode(text).astype(np.uint8)
    track = np.array([0] * len(voice(LOW, 120, 1)) + [1] * len(voice(UP, 120, 2)), dtype=np.uint8)
    reshuffle = None
    if items:
        spans = Items.from_ids(ids, vocab.chars.index("\n"))
        train, val = split_items(spans, 0.1, 3)
        train_t, val_t = split_items(Items(track, spans.start, spans.length), 0.1, 3)

        def reordered(epoch):
            order = epoch_order(len(train), 3, epoch)
            return train.text_ids(order), train_t.text_ids(order)

        reshuffle = reordered

        train_ids, train_tags, val_ids, val_tags = None, None, val.text_ids(), val_t.text_ids()
    else:
        train_ids, train_tags, val_ids, val_tags = split_by_tag(ids, track, 2, 0.1)
    config = TrainConfig(batch_size=8, seq_len=16, max_steps=40, eval_every=10, seed=3)
    meta = {"model_config": {}, "vocab": vocab.chars, "corpus": {}}

    def trainer(out, resume=None):
        torch.manual_seed(3)
        model = CharRNN(ModelConfig(vocab_size=vocab.size, hidden=32, layers=1, dropout=0.2, tags=2))
        return Trainer(model, train_ids, val_ids, config, out, torch.device("cpu"), meta, resume=resume,
                       reshuffle=reshuffle, train_tags=train_tags, val_tags=val_tags)

    whole = trainer(tmp_path / "whole")
    done = whole.run()
    cut = trainer(tmp_path / "split")
    cut.callback = lambda event, data: cut.request_stop() if event == "step" and data["step"] == 23 else None
    assert cut.run().stopped_by == "interrupt"
    rest = trainer(tmp_path / "split", resume=ckpt.load(tmp_path / "split", prefer=ckpt.LAST))
    again = rest.run()
    assert [m["val_loss"] for m in done.metrics] == [m["val_loss"] for m in again.metrics]
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), rest.model.state_dict().values()))
    assert whole.model.tag_embed.weight.grad is not None  # the tags were trained, not left out


# ---------------------------------------------------------------------------------------------- export
def test_a_tagged_model_exports_with_a_tag_input(runner, tagged_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the exported file is run in onnxruntime: pip install 'charlm[export]'")
    pytest.importorskip("onnx", reason="writing ONNX needs the export extra")
    from charlm.export import TOLERANCE, load_runner
    from charlm.runs import load_model

    out = tmp_path / "voices.onnx"
    result = invoke(runner, "export", tagged_run, "-o", out, "--check")
    assert result.exit_code == 0, result.stderr
    run, meta = load_runner(out)
    assert json.loads(meta["tags"]) == ["low", "up"]
    _, model, _, _ = load_model(tagged_run, "cpu")
    ids, tags = torch.tensor([3, 3, 3]), torch.tensor([0, 1, 2])  # low, up, no tag: same character
    state = torch.zeros(1, 3, model.config.hidden)
    logits, _ = run(ids.numpy(), tags.numpy(), state.numpy())
    want, _ = model.step(ids, state, tags)
    assert np.abs(logits - want.numpy()).max() <= TOLERANCE
    assert np.abs(logits[0] - logits[1]).max() > 0.1  # the tag input changes the prediction


# ---------------------------------------------------------------------------------------------- fine-tuning
def test_growing_tags_keeps_every_prediction_at_the_first_step():
    from charlm.grow import grow_tags

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (4, 12))
    plain = CharRNN(ModelConfig(vocab_size=10, hidden=16, layers=2, dropout=0.0)).eval()
    tagged = CharRNN(ModelConfig(vocab_size=10, hidden=16, layers=2, dropout=0.0, tags=2)).eval()
    tagged.load_state_dict(grow_tags(plain.state_dict(), 10, 0, 2))
    before, _ = plain(ids, plain.init_state(4))
    for tag in (0, 1, None):  # an untagged model given tags: each tag starts as the model was
        after, _ = tagged(ids, tagged.init_state(4), tag)
        assert (after - before).abs().max() < 1e-6
    with torch.no_grad():
        tagged.tag_embed.weight.normal_()  # as if trained: the tags now differ
    more = CharRNN(ModelConfig(vocab_size=10, hidden=16, layers=2, dropout=0.0, tags=3)).eval()
    more.load_state_dict(grow_tags(tagged.state_dict(), 10, 2, 3))
    for old, new in ((0, 0), (1, 1), (None, None), (None, 2)):  # old tags kept; the new one starts untagged
        a, _ = tagged(ids, tagged.init_state(4), old)
        b, _ = more(ids, more.init_state(4), new)
        assert (a - b).abs().max() < 1e-6, (old, new)


def test_init_from_adds_the_new_texts_tags(runner, tagged_run, voices, tmp_path, one_thread):
    import shutil

    folder = tmp_path / "more"
    shutil.copytree(voices / "voices", folder)
    (folder / "mixed").mkdir()
    (folder / "mixed" / "0.txt").write_text(voice(LOW[:3] + UP[:3], 200, 4), encoding="utf-8")
    out = tmp_path / "more-run"
    result = invoke(runner, "train", folder, "--tag-by", "folder", "--init-from", tagged_run, "--out", out,
                    "--max-steps", "5", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "3 by folder: low " in result.stderr
    summary = json.loads(invoke(runner, "info", out, "--json").stdout)
    assert summary["corpus"]["tags"]["names"] == ["low", "up", "mixed"]  # the model's ids kept, the new one after
    assert invoke(runner, "sample", "-c", out, "--tag", "mixed", "--length", "20").exit_code == 0


# ---------------------------------------------------------------------------------------------- serving
def test_the_server_takes_a_tag_and_batches_tags_together(runner, tagged_run, tmp_path):
    pytest.importorskip("starlette", reason="charlm serve needs the serve extra: pip install 'charlm[serve]'")
    pytest.importorskip("uvicorn", reason="charlm serve needs the serve extra: pip install 'charlm[serve]'")
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Served

    served = Served(tagged_run, tmp_path)
    try:
        status, _, body = served.post("/v1/sample", {"tag": "up", "seed": 3, "length": 120, "num_samples": 2})
        assert status == 200, body
        cli = invoke(runner, "sample", "-c", tagged_run, "--tag", "up", "--seed", "3", "--length", "120",
                     "--num-samples", "2", "--json")
        assert body["samples"] == json.loads(cli.stdout)["samples"] and body["tag"] == "up"
        # two voices at once: their rows share the engine's steps, each in its own tag
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: (t, served.post("/v1/sample", {"tag": t, "length": 300})),
                                    ["low", "up", "low", "up"]))
        for tag, (status, _, body) in answers:
            assert status == 200, body
            other = set(UP if tag == "low" else LOW)
            assert sum(c in other for c in body["samples"][0]) <= 6, (tag, body["samples"][0])
        held = voice(UP, 5, 42)
        scores = {t: served.post("/v1/score", {"text": held, "tag": t})[2]["nats_per_char"] for t in ("up", "low")}
        assert scores["up"] < scores["low"] - 1.0
        status, _, body = served.post("/v1/sample", {"tag": "mid"})
        assert status == 422 and body["field"] == "tag" and "low, up" in body["error"]
        status, _, body = served.post("/v1/sample", {"tag": 3})
        assert status == 400 and body["field"] == "tag"
    finally:
        served.proc.kill()
        served.proc.wait()


def test_the_page_offers_the_models_tags(tagged_run, tmp_path):
    pytest.importorskip("starlette", reason="charlm serve needs the serve extra: pip install 'charlm[serve]'")
    pytest.importorskip("uvicorn", reason="charlm serve needs the serve extra: pip install 'charlm[serve]'")
    import shutil

    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it) to load the page in")
    from test_browser import Browser
    from test_serve import Served, _text, _until

    served = Served(tagged_run, tmp_path)
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=f"http://127.0.0.1:{served.port}/?tag=up&seed=4&length=80&go")
        _until(browser, "status", "characters in")
        assert browser.js("[...document.getElementById('tag').options].map(o => o.value).join(',')") == ",low,up"
        _, _, want = served.post("/v1/sample", {"tag": "up", "length": 80, "seed": 4})
        assert _text(browser, "out") == want["samples"][0] and not set(want["samples"][0]) & set(LOW)
        assert browser.problems() == []
    finally:
        browser.close()
        served.proc.kill()
        served.proc.wait()
