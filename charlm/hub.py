"""A model as a folder that other tools load: the Hugging Face convention of `model.safetensors` (the weights),
`config.json` (how to build the model, plus here its vocabulary and what sampling and evaluation need to
know about its training text) and `README.md` (a model card for people).

Reading such a folder runs no code: safetensors is a JSON header and raw tensor bytes, config.json is JSON.
Every file is checked against the others before a model is built from it (the tensor names and shapes
against the model config.json describes, the weights' bytes against the SHA-256 the export recorded), so a
folder mixed from two exports, or damaged, is refused in one line instead of loading wrong weights.

Library code: it returns values and raises CharlmError. `safetensors` is the optional `hub` extra, imported
only when a folder is written or read.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from pathlib import Path

import torch

from charlm import __version__
from charlm.errors import CharlmError
from charlm.files import replacing, write_atomic

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
MODEL_TYPE = "charlm"  # config.json's model_type: what a reader checks before trusting the rest
FOLDER_FORMAT = 1  # config.json's charlm_folder_format; a newer one is refused with an upgrade hint
INSTALL = "pip install 'charlm[hub]'"
# the checkpoint entries a folder keeps: what commands other than `train --resume` read (no optimizer state,
# carried state or random generator states: a folder is for using and sharing a model, a run for training it)
KEPT = ("model_config", "vocab", "corpus", "train_config", "step", "epoch", "best_val_loss", "best_step",
        "metrics", "chars_seen")


def is_folder(path) -> bool:
    """True for a directory that holds an exported folder's config.json or its weights (either: a folder
    missing the other is one to refuse by name, not to take for an empty run directory)."""
    p = Path(path)
    return p.is_dir() and ((p / CONFIG).is_file() or (p / WEIGHTS).is_file())


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CharlmError(f"safetensors folders need the safetensors package: {INSTALL}")
    return safetensors.torch


def _plain(value):
    """JSON without NaN or Infinity (not JSON; strict readers refuse them): a non-finite float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def training_command(payload: dict) -> str:
    """A `charlm train` command that repeats the run's model and training options on its corpus."""
    m, t = payload["model_config"], payload.get("train_config", {})
    corpus = payload.get("corpus", {})
    files = corpus.get("files") or [corpus.get("path", "CORPUS")]
    args = ["charlm", "train", *files, "--cell", m["cell"], "--hidden", m["hidden"], "--layers", m["layers"],
            "--embedding", m["embedding"], "--dropout", m["dropout"]]
    if m["cell"] == "rnn":
        args += ["--nonlinearity", m["nonlinearity"]]
    flags = [("batch_size", "--batch-size"), ("seq_len", "--seq-len"), ("lr", "--lr"), ("optimizer", "--optimizer"),
             ("weight_decay", "--weight-decay"), ("warmup_steps", "--warmup"), ("clip", "--clip"),
             ("val_frac", "--val-frac"), ("seed", "--seed"), ("eval_chars", "--eval-chars"),
             ("max_steps", "--max-steps"), ("epochs", "--epochs")]
    args += [x for key, flag in flags if t.get(key) is not None for x in (flag, t[key])]
    if t.get("max_time"):
        args += ["--max-time", f"{t['max_time']:g}s"]
    if "items" in corpus:
        args.append("--items" if corpus["items"] else "--no-items")
    return " ".join(shlex.quote(str(a)) for a in args)


def model_card(payload: dict, config: dict, command: str) -> str:
    """README.md: what the model is, what it was trained on, how well it does, how it was made and loaded."""
    corpus, m = payload.get("corpus", {}), payload["model_config"]
    name = Path(str(corpus.get("path") or "the corpus")).name
    best = config.get("best_val_loss")
    loss = (f"{best:.4f} nats/char ({best / math.log(2):.3f} bits/char) on the held-out "
            f"{payload.get('train_config', {}).get('val_frac', 0.1):.0%} of the text, at step "
            f"{config.get('best_step'):,}" if isinstance(best, float) else "not measured")
    parameters = sum(t.numel() for t in payload["model"].values())
    return "\n".join([
        "---", "library_name: charlm", "tags:", "- character-level", "- rnn", "---", "",
        f"# charlm {m['layers']} x {m['hidden']} {m['cell'].upper()}: {name}", "",
        f"A character-level language model trained by charlm {payload.get('charlm_version', __version__)}.", "",
        f"- **Corpus**: {name}, {corpus.get('chars', 0):,} characters, SHA-256 {corpus.get('sha256', '?')}",
        f"- **Vocabulary**: {len(payload['vocab'])} characters",
        f"- **Model**: {m['layers']} x {m['hidden']} {m['cell']}, "
        f"{'one-hot input' if not m['embedding'] else str(m['embedding']) + '-dim embedding'}, "
        f"{parameters:,} parameters",
        f"- **Validation loss**: {loss}",
        f"- **Trained**: {payload.get('step', 0):,} steps", "",
        "## How it was made", "", "```", training_command(payload), command, "```", "",
        "## Loading it", "",
        "Every charlm command that takes `-c` loads this folder: `charlm sample -c THIS_FOLDER`. Elsewhere,",
        "`safetensors.torch.load_file(\"model.safetensors\")` gives the tensors by the names of PyTorch's",
        "`nn.GRU` / `nn.LSTM` / `nn.RNN` (`rnn.*`), `nn.Embedding` (`embed.*`) and `nn.Linear` (`decoder.*`);",
        "`config.json` has the sizes (`model_config`) and the characters in id order (`vocab`).", "",
    ])


def write_folder(payload: dict, out_dir, command: str) -> list:
    """Write model.safetensors, config.json and README.md into out_dir (created if missing), each through
    files.replacing. config.json, which records the weights' SHA-256, goes last: a folder interrupted halfway
    holds weights its config does not vouch for, and is refused when read. Returns the paths written."""
    st = _safetensors()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CharlmError(f"{out} is a file; --format safetensors writes a folder: choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in payload["model"].items()}
        with replacing(out / WEIGHTS) as tmp:
            st.save_file(tensors, str(tmp), metadata={"format": "pt"})  # "pt": transformers' marker for torch
        digest = sha256_of(out / WEIGHTS)
        config = _plain({
            "model_type": MODEL_TYPE, "architectures": ["CharRNN"], "charlm_folder_format": FOLDER_FORMAT,
            "charlm_version": payload.get("charlm_version", __version__),
            "vocab_size": payload["model_config"]["vocab_size"], "weights_sha256": digest,
            **{k: payload[k] for k in KEPT if k in payload},
        })
        write_atomic(out / CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_atomic(out / CARD, model_card(payload, config, command))
    except OSError as exc:
        raise CharlmError(f"cannot write {out} ({exc.strerror or exc})")
    return [out / WEIGHTS, out / CONFIG, out / CARD]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_folder(path) -> dict:
    """A checkpoint-shaped payload (model_config, vocab, model state_dict, corpus, ...) from an exported
    folder; a CharlmError naming the file for anything missing, unreadable or inconsistent."""
    folder = Path(path)
    again = "export it again (charlm export RUN -o DIR --format safetensors)"
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CharlmError(f"{folder} has no {name}: a charlm safetensors folder needs {CONFIG} and {WEIGHTS}; "
                              f"{again}")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CharlmError(f"{folder / CONFIG} is not readable JSON ({type(exc).__name__}); {again}")
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        raise CharlmError(f"{folder / CONFIG} does not describe a charlm model (model_type is not "
                          f"{MODEL_TYPE!r}); charlm loads only folders it exported")
    version = config.get("charlm_folder_format")
    if not isinstance(version, int) or version > FOLDER_FORMAT:
        raise CharlmError(f"{folder} has folder format {version!r}, written by a newer charlm "
                          f"({config.get('charlm_version', '?')}); upgrade charlm (pip install -U charlm)")
    for key in ("model_config", "vocab"):
        if key not in config:
            raise CharlmError(f"{folder / CONFIG} is not a complete charlm config (no {key}); {again}")
    recorded = config.get("weights_sha256")
    if recorded is not None and sha256_of(folder / WEIGHTS) != recorded:
        raise CharlmError(f"{folder / WEIGHTS} is not the file {CONFIG} was written with (its SHA-256 differs): "
                          f"the folder is damaged or mixed from two exports; {again}")
    st = _safetensors()
    try:
        tensors = st.load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError (a bad header, truncated data)
        raise CharlmError(f"{folder / WEIGHTS} is not a readable safetensors file "
                          f"({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}); {again}")
    _check_shapes(folder, config, tensors)
    payload = {k: config[k] for k in KEPT if k in config}
    if payload.get("best_val_loss") is None:
        payload["best_val_loss"] = math.inf  # written as null: not measured
    payload.update({"format": version, "charlm_version": config.get("charlm_version"), "model": tensors,
                    "path": str(folder / WEIGHTS)})  # beside its folder, as best.pt is inside its run
    return payload


def _check_shapes(folder: Path, config: dict, tensors: dict) -> None:
    """The weights must be the ones the model config.json describes would have: names, shapes, dtypes."""
    from charlm.model import CharRNN, ModelConfig

    try:
        model_config = ModelConfig(**config["model_config"])
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            wanted = CharRNN(model_config).state_dict()
    except (TypeError, ValueError) as exc:
        raise CharlmError(f"{folder / CONFIG} has a model_config this charlm cannot build ({exc})")
    if not isinstance(config["vocab"], str) or len(config["vocab"]) != model_config.vocab_size:
        raise CharlmError(f"{folder / CONFIG}'s vocab does not have the {model_config.vocab_size} characters its "
                          "model_config says")
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which"
        raise CharlmError(f"{folder / WEIGHTS} does not match {CONFIG}: it {what}"
                          f"{'' if missing else ' the model it describes has not'}")
    for name, want in wanted.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise CharlmError(f"{folder / WEIGHTS} does not match {CONFIG}: {name} is {got.dtype} "
                              f"{tuple(got.shape)}, the model it describes has {want.dtype} {tuple(want.shape)}")
