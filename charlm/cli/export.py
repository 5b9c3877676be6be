"""`charlm export`: one step of a model as a file other runtimes load (ONNX, or a torch.export program),
optionally checked against the model in onnxruntime (the `export` extra, imported only here); or the whole
model as a safetensors folder that other tools and every charlm command load (the `hub` extra, hub.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape

from charlm.cli.common import check
from charlm.errors import CharlmError
from charlm.runs import load_model

FORMATS = ("onnx", "pt2", "safetensors")


def run_export(run: Optional[Path], output: Optional[Path], verify: bool, steps: int, device_name: str,
               console: Console, fmt: Optional[str] = None) -> None:
    from charlm import export

    check(steps >= 1, f"--steps must be at least 1, got {steps}")
    check(fmt is None or fmt in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "safetensors":
        return _export_folder(run, output if output is not None else Path("model"), verify, console)
    output = output if output is not None else Path(f"model.{fmt or 'onnx'}")
    suffix = output.suffix.lower()
    check(suffix in export.FORMATS, f"-o must end in {' or '.join(export.FORMATS)} (the format follows the "
                                     f"suffix), or pass --format safetensors for a folder; got {output.name!r}")
    check(fmt is None or suffix == "." + fmt, f"--format {fmt} writes a .{fmt} file, but -o ends in {suffix}")
    if not output.parent.is_dir():
        raise CharlmError(f"{output.parent} is not a directory; create it or choose another -o")
    payload, model, vocab, _ = load_model(run, "cpu")  # exported files are device-independent
    model = model.float().eval()
    try:
        if suffix == ".onnx":
            export.export_onnx(model, vocab, output, payload)
        else:
            export.export_program(model, vocab, output)
    except ImportError as exc:
        raise CharlmError(f"writing ONNX needs the onnx package ({exc.name} is missing): "
                          "pip install 'charlm[export]'")
    except OSError as exc:
        raise CharlmError(f"cannot write {output} ({exc.strerror or exc})")
    size = output.stat().st_size
    console.print(f"wrote {escape(str(output))} ({size / 1e6:.2f} MB): one step of {escape(str(payload['path']))}, "
                  "state as explicit inputs and outputs")
    if not verify:
        return
    try:
        diff = export.check(output, model, vocab, steps=steps)
    except ImportError as exc:
        raise CharlmError(f"--check runs the file in onnxruntime ({exc.name} is missing): "
                          "pip install 'charlm[export]'")
    ok = diff <= export.TOLERANCE
    console.print(f"check: {steps} sampled steps, max abs logit difference {diff:.2e} against CharRNN.step "
                  f"({'within' if ok else 'OVER'} {export.TOLERANCE:g})")
    if not ok:
        raise CharlmError(f"{output} disagrees with the model by {diff:.2e} (more than {export.TOLERANCE:g})")


def _export_folder(run: Optional[Path], output: Path, verify: bool, console: Console) -> None:
    """model.safetensors + config.json + README.md in a folder (hub.py); --check reads the folder back and
    compares every tensor with the checkpoint's, bit for bit."""
    import shlex
    import sys

    import torch

    from charlm import hub

    check(not output.suffix or output.is_dir(), f"--format safetensors writes a folder; -o {output.name!r} looks "
                                                "like a file name (drop the suffix)")
    if not output.parent.is_dir():
        raise CharlmError(f"{output.parent} is not a directory; create it or choose another -o")
    payload, _, _, _ = load_model(run, "cpu")  # built once: a checkpoint that cannot make a model is refused
    command = " ".join(["charlm"] + [shlex.quote(a) for a in sys.argv[1:]]) if sys.argv[1:2] == ["export"] \
        else f"charlm export {shlex.quote(str(payload['path']))} -o {shlex.quote(str(output))} --format safetensors"
    written = hub.write_folder(payload, output, command)
    size = sum(f.stat().st_size for f in written)
    console.print(f"wrote {escape(str(output))}/ ({size / 1e6:.2f} MB: {', '.join(f.name for f in written)}) from "
                  f"{escape(str(payload['path']))}; load it with -c {escape(str(output))}")
    if not verify:
        return
    back = hub.read_folder(output)["model"]
    same = back.keys() == payload["model"].keys() and all(torch.equal(back[k], payload["model"][k].cpu())
                                                        for k in back)
    console.print(f"check: {len(back)} tensors read back from {hub.WEIGHTS}: "
                  f"{'identical to' if same else 'DIFFERENT from'} the checkpoint's")
    if not same:
        raise CharlmError(f"{output / hub.WEIGHTS} does not hold the checkpoint's weights")
