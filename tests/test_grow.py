"""`train --init-from` on a text with characters the model never saw: the model grows (every old character keeps
its weights, the predictions over the old characters start unchanged), trains and samples the new characters,
resumes exactly; --no-grow-vocab refuses as before, --unknown skip drops them."""

from __future__ import annotations

import json
import random

import pytest
import torch

from charlm import grow
from charlm.model import CharRNN, ModelConfig
from charlm.runs import load_model
from charlm.vocab import Vocabulary

from conftest import TINY, WORDS, invoke, word_text

OLD = Vocabulary("".join(sorted(set(" \n" + "".join(WORDS)))))
NEW = "C—é"  # "C" sorts between " " and "a": every letter's id moves up by one
NEW_WORDS = WORDS + ["Café", "résumé", "—"]


def accented_text(lines: int = 800, seed: int = 3) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(NEW_WORDS) for _ in range(8)) for _ in range(lines)) + "\n"


def old_model(cell: str, embedding: int) -> CharRNN:
    """A model over OLD with logits far from uniform, as a trained one has (random init gives near-zero ones)."""
    torch.manual_seed(7)
    model = CharRNN(ModelConfig(vocab_size=OLD.size, cell=cell, hidden=40, layers=2, embedding=embedding))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
        model.decoder.bias.copy_(torch.randn(OLD.size) * 3)
    return model.eval()


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("embedding", [0, 6])
def test_growth_keeps_the_old_predictions(cell, embedding):
    model = old_model(cell, embedding)
    bigger = OLD.with_chars(NEW)
    grown = grow.grow_model(model, OLD, bigger).eval()
    assert bigger.size == OLD.size + 3 and grown.config.vocab_size == bigger.size
    text = word_text(20, seed=1)[:600]
    with torch.no_grad():
        before, _ = model(torch.tensor(OLD.encode(text))[None], model.init_state(1))
        after, _ = grown(torch.tensor(bigger.encode(text))[None], grown.init_state(1))
    at = torch.tensor([bigger.chars.index(c) for c in OLD.chars])  # each old character, by character
    old_logits = after[0][:, at]
    torch.testing.assert_close(old_logits, before[0], atol=1e-6, rtol=0)  # the same logit for every old char
    torch.testing.assert_close(old_logits.softmax(-1), before[0].softmax(-1), atol=1e-6, rtol=0)
    new_mass = after[0].softmax(-1)[:, [bigger.chars.index(c) for c in NEW]].sum(-1)
    assert float(new_mass.max()) <= grow.NEW_MASS  # the bound new_logit promises, in every context here
    assert float(new_mass.min()) > 0  # and the new characters can be predicted at all


def test_growth_moves_each_old_characters_weights_and_adds_neutral_inputs():
    for embedding in (0, 6):
        model = old_model("gru", embedding)
        bigger = OLD.with_chars(NEW)
        sd = model.state_dict()
        state = grow.grow_state_dict(sd, embedding, OLD, bigger)
        inputs = (lambda s: s["embed.weight"]) if embedding else (lambda s: s["rnn.weight_ih_l0"].t())
        assert sum(bigger.chars.index(c) != i for i, c in enumerate(OLD.chars)) == 26  # the letters moved
        for i, ch in enumerate(OLD.chars):
            j = bigger.chars.index(ch)
            assert torch.equal(inputs(state)[j], inputs(sd)[i]), ch
            assert torch.equal(state["decoder.weight"][j], sd["decoder.weight"][i]), ch
            assert state["decoder.bias"][j] == sd["decoder.bias"][i], ch
        for ch in NEW:  # a new character adds nothing to the first layer beyond its biases
            assert not inputs(state)[bigger.chars.index(ch)].any(), ch
        untouched = [k for k in sd if k not in ("embed.weight", "rnn.weight_ih_l0", "decoder.weight", "decoder.bias")]
        assert untouched and all(state[k] is sd[k] for k in untouched)


def test_nothing_new_leaves_the_model_as_it_was():
    model = old_model("lstm", 0)
    sd = model.state_dict()
    same = grow.grow_state_dict(sd, 0, OLD, OLD)
    assert same.keys() == sd.keys() and all(same[k] is sd[k] for k in sd)
    plan = grow.decide(OLD, Vocabulary("\n abc"), "new.txt")
    assert plan.vocab == OLD and not plan.added and plan.summary(OLD.size) is None


# ---------------------------------------------------------------------------------------------- the command
FLAGS = [*TINY, "--no-items", "--lr", "1e-2"]


@pytest.fixture
def accented(tmp_path):
    path = tmp_path / "accented.txt"
    path.write_text(accented_text(), encoding="utf-8")
    return path


def test_a_grown_model_trains_and_samples_the_new_characters(runner, trained_run, accented, tmp_path):
    out = tmp_path / "ft"
    result = invoke(runner, "train", accented, "--init-from", trained_run, "--out", out, "--max-steps", "120",
                    "--eval-every", "40", *FLAGS)
    assert result.exit_code == 0, result.stderr
    source = torch.load(trained_run / "best.pt", weights_only=True)
    old = len(source["vocab"])
    assert f"vocabulary {old} + 3 new: C é — ({old + 3} in all)" in " ".join(result.stderr.split())
    tuned = torch.load(out / "best.pt", weights_only=True)
    assert tuned["vocab"] == "".join(sorted(source["vocab"] + NEW))
    assert tuned["model_config"] == {**source["model_config"], "vocab_size": old + 3}
    assert tuned["corpus"]["added_chars"] == "".join(sorted(NEW))
    shown = invoke(runner, "info", out)
    assert "grown: 3 character(s) added on --init-from: C é —" in " ".join(shown.stdout.split())
    sampled = invoke(runner, "sample", "-c", out, "--length", "3000", "--temperature", "1", "--seed", "1")
    assert sampled.exit_code == 0, sampled.stderr
    for ch in NEW:
        assert ch in sampled.stdout, ch
    # The accented words are learnt as words: after "résum" the grown model started with at most 1/1000 on all
    # the new characters together; now "é" is the likeliest next character.
    _, model, vocab, device = load_model(out, "cpu")
    with torch.no_grad():
        logits, _ = model(torch.tensor(vocab.encode("the résum"))[None], model.init_state(1))
    assert vocab.decode([int(logits[0, -1].argmax())]) == "é"


def test_the_fine_tuning_run_starts_from_the_old_models_predictions(runner, trained_run, accented, tmp_path):
    out = tmp_path / "ft"  # one step at a rate of 1e-9: the checkpoint holds the model the run started from
    result = invoke(runner, "train", accented, "--init-from", trained_run, "--out", out, "--max-steps", "1",
                    "--eval-every", "1", "--lr", "1e-9", *TINY, "--no-items")
    assert result.exit_code == 0, result.stderr
    _, before, old, _ = load_model(trained_run / "best.pt", "cpu")
    _, after, new, _ = load_model(out / "last.pt", "cpu")
    text = word_text(10, seed=2)
    with torch.no_grad():
        lo, _ = before(torch.tensor(old.encode(text))[None], before.init_state(1))
        ln, _ = after(torch.tensor(new.encode(text))[None], after.init_state(1))
    at = [new.chars.index(c) for c in old.chars]
    torch.testing.assert_close(ln[0][:, at], lo[0], atol=1e-5, rtol=0)
    assert float(ln[0].softmax(-1)[:, [new.chars.index(c) for c in NEW]].sum(-1).max()) <= grow.NEW_MASS


def test_a_grown_run_resumes_exactly(runner, trained_run, accented, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--init-from", trained_run, "--eval-every", "5", *FLAGS]
    assert invoke(runner, "train", accented, "--out", whole, "--max-steps", "10", *common).exit_code == 0
    assert invoke(runner, "train", accented, "--out", parts, "--max-steps", "5", *common).exit_code == 0
    resumed = invoke(runner, "train", accented, "--out", parts, "--max-steps", "10", "--resume", "--eval-every", "5",
                     *TINY)
    assert resumed.exit_code == 0, resumed.stderr
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (whole, parts))
    assert a["vocab"] == b["vocab"] and len(a["vocab"]) == len(torch.load(trained_run / "best.pt")["vocab"]) + 3
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.stderr
    return lines[0]


def test_no_grow_vocab_refuses_naming_the_characters(runner, trained_run, accented, tmp_path):
    out = tmp_path / "ft"
    line = one_error_line(invoke(runner, "train", accented, "--init-from", trained_run, "--out", out,
                                 "--no-grow-vocab", "--max-steps", "1", *FLAGS))
    assert "3 character(s) not in the model's vocabulary: C é —" in line and str(accented) in line
    assert "--unknown skip" in line and "--no-grow-vocab" in line
    assert not out.exists()
    line = one_error_line(invoke(runner, "train", accented, "--init-from", trained_run, "--out", out,
                                 "--unknown", "error", "--max-steps", "1", *FLAGS))
    assert "not in the model's vocabulary" in line and not out.exists()


def test_unknown_skip_drops_the_new_characters_and_resumes(runner, trained_run, accented, tmp_path):
    out = tmp_path / "ft"
    result = invoke(runner, "train", accented, "--init-from", trained_run, "--out", out, "--unknown", "skip",
                    "--max-steps", "5", "--eval-every", "5", *FLAGS)
    assert result.exit_code == 0, result.stderr
    assert "3 dropped from the text (--unknown skip): C é —" in " ".join(result.stderr.split())
    source = torch.load(trained_run / "best.pt", weights_only=True)
    tuned = torch.load(out / "last.pt", weights_only=True)
    assert tuned["vocab"] == source["vocab"] and tuned["model_config"] == source["model_config"]
    text = accented.read_text(encoding="utf-8")
    assert tuned["corpus"]["chars"] == sum(c not in NEW for c in text)
    resumed = invoke(runner, "train", accented, "--out", out, "--resume", "--max-steps", "8", "--eval-every", "4",
                     *TINY)
    assert resumed.exit_code == 0, resumed.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 8
    # --novelty reads the training text back as the run read it: without the new characters
    sampled = invoke(runner, "sample", "-c", out, "--length", "40", "--novelty", "--seed", "1")
    assert sampled.exit_code == 0, sampled.stderr


def test_a_text_with_nothing_new_fine_tunes_the_model_unchanged(runner, trained_run, tmp_path):
    new = tmp_path / "same.txt"
    new.write_text(word_text(300, seed=4), encoding="utf-8")
    out = tmp_path / "ft"
    result = invoke(runner, "train", new, "--init-from", trained_run, "--out", out, "--max-steps", "5",
                    "--eval-every", "5", *FLAGS)
    assert result.exit_code == 0, result.stderr
    assert " new:" not in result.stderr and "dropped" not in result.stderr
    tuned = torch.load(out / "last.pt", weights_only=True)
    source = torch.load(trained_run / "best.pt", weights_only=True)
    assert tuned["vocab"] == source["vocab"] and "added_chars" not in tuned["corpus"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_loss"] < 2.0


def test_a_text_model_fine_tunes_onto_a_folder_of_items(runner, trained_run, tmp_path):
    """A folder trained one item per file joins its files by ITEM_END, a character a model of running text has
    never seen: it is added like any other new character (it was a traceback)."""
    from charlm.items import ITEM_END

    folder = tmp_path / "notes"
    folder.mkdir()
    words = word_text(3000, seed=5).split()
    for i in range(40):
        (folder / f"note{i:02d}.txt").write_text(" ".join(words[i * 20: i * 20 + 20]) + "\n", encoding="utf-8")
    out = tmp_path / "ft"
    result = invoke(runner, "train", folder, "--init-from", trained_run, "--out", out, "--max-steps", "20",
                    *TINY, "--items")
    assert result.exit_code == 0, result.stderr
    tuned = torch.load(out / "best.pt", weights_only=True)
    assert ITEM_END in tuned["vocab"] and tuned["corpus"]["item_end"] == ITEM_END
    assert ITEM_END not in torch.load(trained_run / "best.pt", weights_only=True)["vocab"]
    scored = invoke(runner, "eval", folder, "-c", out, "--json")  # each file scored as one item, its end too
    assert scored.exit_code == 0, scored.stderr
    assert json.loads(scored.stdout)["items"]["count"] == 40
