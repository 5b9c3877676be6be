"""Portable model files: the one-step cell of a CharRNN with its state as explicit inputs and outputs.

    inputs   ids (B,) int64, [tag (B,) int64,] h (layers, B, hidden) float32 [, c (layers, B, hidden) for LSTM]
    outputs  logits (B, V) float32, h_out [, c_out]: the next character's logits and the state after it

A tagged model (tags.py) takes each row's tag id after the ids: its names, in id order, are the metadata's
"tags", and the id after the last means no tag.

A sampler in any language feeds one character id and the state, picks from the logits, and feeds the pick
back with the returned state. The vocabulary (a JSON string of the characters, id order), the model
configuration, the names of the state tensors and the character to warm on without a prime travel in the
file's metadata, so nothing else is needed to sample.

Formats, chosen by the output's suffix: .onnx (onnxruntime, browsers, phones; written with PyTorch's
TorchScript-based ONNX exporter, which needs only the `onnx` package) and .pt2 (torch.export: a PyTorch
program that runs without charlm's code). Library code: returns values, prints nothing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from charlm import __version__
from charlm.files import replacing
from charlm.model import CharRNN
from charlm.sample import SampleConfig, default_context, pick
from charlm.vocab import Vocabulary

FORMATS = (".onnx", ".pt2")
TOLERANCE = 1e-4  # max abs logit difference --check accepts over its sampled steps (fp32 rounding is ~1e-6)
OPSET = 17  # onnxruntime 1.16 (the oldest the `export` extra allows) runs opset 17 and everything here


class StepCell(nn.Module):
    """CharRNN.step with the state spelled out as tensors: (ids, h[, c]) -> (logits, h_out[, c_out])."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model
        self.lstm = model.config.cell == "lstm"

    def forward(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor = None):
        logits, state = self.model.step(ids, (h, c) if self.lstm else h)
        return (logits, *state) if self.lstm else (logits, state)


class TaggedStepCell(StepCell):
    """StepCell of a tagged model: (ids, tag, h[, c]) -> (logits, h_out[, c_out])."""

    def forward(self, ids: torch.Tensor, tag: torch.Tensor, h: torch.Tensor, c: torch.Tensor = None):
        logits, state = self.model.step(ids, (h, c) if self.lstm else h, tag)
        return (logits, *state) if self.lstm else (logits, state)


def _cell(model: CharRNN) -> StepCell:
    return TaggedStepCell(model) if model.config.tags else StepCell(model)


def input_names(model: CharRNN) -> list:
    return ["ids"] + (["tag"] if model.config.tags else []) + state_names(model)


def state_names(model: CharRNN) -> list:
    return ["h", "c"] if model.config.cell == "lstm" else ["h"]


def metadata(model: CharRNN, vocab: Vocabulary, payload: dict = None) -> dict:
    """String -> string pairs stored in the file (ONNX metadata_props; an extra file in a .pt2)."""
    payload = payload or {}
    return {
        "format": "charlm-step-1",
        "vocab": json.dumps(vocab.chars, ensure_ascii=False),
        "model_config": json.dumps(model.config.to_dict()),
        "state": json.dumps(state_names(model)),
        "default_context": default_context(vocab),
        "charlm_version": __version__,
        "trained_steps": str(payload.get("step", "")),
        **({"tags": json.dumps(payload.get("corpus", {}).get("tags", {}).get("names", []), ensure_ascii=False)}
           if model.config.tags else {}),
    }


def _example(model: CharRNN, batch: int = 2):
    ids = torch.zeros(batch, dtype=torch.long)
    tag = (torch.zeros(batch, dtype=torch.long),) if model.config.tags else ()
    state = model.init_state(batch)
    return (ids, *tag, *state) if isinstance(state, tuple) else (ids, *tag, state)


def export_onnx(model: CharRNN, vocab: Vocabulary, path, payload: dict = None) -> None:
    """Write the step cell as ONNX, batch size dynamic, metadata attached; atomically (temp file, rename)."""
    import onnx

    path = Path(path)
    model = model.float().eval()
    names = state_names(model)
    outputs = ["logits"] + [f"{n}_out" for n in names]
    axes = {"ids": {0: "batch"}, "tag": {0: "batch"}, "logits": {0: "batch"},
            **{n: {1: "batch"} for n in names + outputs[1:]}}
    if not model.config.tags:
        del axes["tag"]
    with replacing(path) as tmp:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of the dynamo one, which would add the
            # onnxscript package to the extra; this one writes the same graph for a cell this simple.
            warnings.simplefilter("ignore")
            torch.onnx.export(_cell(model), _example(model), str(tmp), dynamo=False, input_names=input_names(model),
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in metadata(model, vocab, payload).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name, proto.doc_string = "charlm", "one step of a character-level RNN; see metadata"
        onnx.save(proto, str(tmp))


def export_program(model: CharRNN, vocab: Vocabulary, path, payload: dict = None) -> None:
    """Write the step cell as a torch.export program (.pt2); the metadata goes in as charlm.json."""
    path = Path(path)
    model = model.float().eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = _example(model)  # (ids, [tag,] h) or (ids, [tag,] h, c)
    tagged = 1 if model.config.tags else 0
    shapes = ({0: batch},) * (1 + tagged) + ({1: batch},) * (len(example) - 1 - tagged)
    with torch.no_grad():
        program = torch.export.export(_cell(model), example, dynamic_shapes=shapes)
    with replacing(path) as tmp:
        torch.export.save(program, str(tmp), extra_files={"charlm.json": json.dumps(metadata(model, vocab, payload))})


def load_runner(path):
    """(run(ids, *state) -> numpy outputs, metadata dict) for a file written by this module."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        options.intra_op_num_threads = 1  # one step of a small batch: threads only add waiting (and spinning)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = dict(session.get_modelmeta().custom_metadata_map)
        inputs = [i.name for i in session.get_inputs()]
        return (lambda *arrays: session.run(None, dict(zip(inputs, arrays)))), meta
    extra = {"charlm.json": ""}
    program = torch.export.load(str(path), extra_files=extra).module()
    meta = json.loads(extra["charlm.json"])

    def run(ids, *state):
        with torch.no_grad():
            out = program(torch.from_numpy(ids), *(torch.from_numpy(s) for s in state))
        return [t.numpy() for t in out]

    return run, meta


def check(path, model: CharRNN, vocab: Vocabulary, steps: int = 200, batch: int = 3, seed: int = 0) -> float:
    """Max abs logit difference between the file and CharRNN.step over `steps` sampled steps of `batch`
    rows. Each side carries its own state from zeros, so differences that build up along the way count."""
    run, meta = load_runner(path)
    if json.loads(meta["vocab"]) != vocab.chars:
        return float("inf")  # a file of another model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as for onnxruntime: at batch 3 a second thread only waits (30x slower when busy)
    try:
        return _compare(run, model, vocab, steps, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _compare(run, model: CharRNN, vocab: Vocabulary, steps: int, batch: int, seed: int) -> float:
    model = model.float().eval()
    generator = torch.Generator().manual_seed(seed)
    cfg = SampleConfig(temperature=1.0)
    ids = torch.full((batch,), int(vocab.encode(default_context(vocab))[-1]), dtype=torch.long)
    state = model.init_state(batch)
    theirs = [t.numpy().copy() for t in (state if isinstance(state, tuple) else (state,))]
    # a tagged model: the rows cycle through its tags and "no tag", so that every tag's vector is checked
    tags = torch.arange(batch, dtype=torch.long) % (model.config.tags + 1) if model.config.tags else None
    given = (tags.numpy(),) if tags is not None else ()
    worst = 0.0
    for _ in range(steps):
        logits, state = model.step(ids, state, tags)  # (batch, V)
        out = run(ids.numpy(), *given, *theirs)
        worst = max(worst, float(np.abs(out[0] - logits.numpy()).max()))
        theirs = [np.asarray(t) for t in out[1:]]
        ids = pick(logits, cfg, generator)
    return worst
