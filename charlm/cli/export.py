"""`charlm export`: one step of a model as a file other runtimes load (ONNX, or a torch.export program),
optionally checked against the model in onnxruntime (the `export` extra, imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape

from charlm.cli.common import check
from charlm.errors import CharlmError
from charlm.runs import load_model


def run_export(run: Optional[Path], output: Path, verify: bool, steps: int, device_name: str,
               console: Console) -> None:
    from charlm import export

    check(steps >= 1, f"--steps must be at least 1, got {steps}")
    suffix = output.suffix.lower()
    check(suffix in export.FORMATS, f"-o must end in {' or '.join(export.FORMATS)} (the format follows the "
                                     f"suffix), got {output.name!r}")
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
