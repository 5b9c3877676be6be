"""A training run's directory, beside checkpoint.py (which writes and reads one file safely): which directory a
run trains into, what a checkpoint of the run holds (the weights, the optimizer, where the run stands, every
stream's carried state, the random generators), reading one back to resume exactly where it stopped, and
metrics.jsonl (one JSON line per evaluation). The Trainer decides when to save; this module knows what a
save holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from charlm import checkpoint as ckpt
from charlm import schedule
from charlm.errors import CharlmError
from charlm.files import write_atomic

METRICS = "metrics.jsonl"


def payload(trainer, carried: list) -> dict:
    """A checkpoint of `trainer` as it stands, with `carried`: every stream's state, in stream order (under
    torchrun each process holds only its own; the Trainer gathers them)."""
    rng = {"torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    restart, cooldown = trainer.schedule.restart, trainer.schedule.cooldown
    return {**trainer.meta, "train_config": trainer.config.to_dict(),
            "model": ckpt.clean_state_dict(trainer.model.state_dict()),
            "optimizer": trainer.optimizer.state_dict(), "step": trainer.step, "epoch": trainer.epoch,
            "cursor": trainer.cursor, "carried_state": carried,
            "rng": rng, "elapsed_s": trainer.elapsed, "best_val_loss": trainer.best_val, "best_step": trainer.best_step,
            "bad_evals": trainer.bad_evals, "chars_seen": trainer.chars_seen, "metrics": list(trainer.metrics),
            "schedule_restart": restart.to_dict() if restart else None,
            "schedule_cooldown": cooldown.to_dict() if cooldown else None}


@dataclass
class Resumed:
    """A checkpoint read back for resuming: what the Trainer restores, with the defaults of older checkpoints."""

    model: dict
    optimizer: dict
    step: int
    epoch: int
    cursor: int  # the next chunk of the epoch
    elapsed: float
    best_val: float
    best_step: int
    bad_evals: int
    chars_seen: int
    metrics: list
    carried: list  # every stream's state, in stream order (state.to_list)
    rng: dict
    config: object  # the TrainConfig the run was saved under (the current one for a checkpoint without it)
    restart: Optional[schedule.Restart]  # where a longer budget had already taken over its schedule
    cooldown: Optional[schedule.Cooldown] = None  # where validation had stopped improving: the run's end


def resumed(payload: dict, config) -> Resumed:
    """Read `payload` for resuming under `config` (a TrainConfig). The stream layout must be the run's: another
    --batch-size or --seq-len would cut the text into other streams, and the carried states would not fit."""
    saved = payload.get("train_config", {})
    for key in ("batch_size", "seq_len"):
        if key in saved and saved[key] != getattr(config, key):
            flag = "--" + key.replace("_", "-")
            raise CharlmError(f"{flag} {getattr(config, key)} differs from the run's {saved[key]}; "
                              f"resume with {flag} {saved[key]}")
    known = {f.name for f in fields(config)}  # a newer charlm's fields are left out, an older one's take defaults
    old = type(config)(**{k: v for k, v in saved.items() if k in known}) if saved else config
    restart, cooldown = payload.get("schedule_restart"), payload.get("schedule_cooldown")
    return Resumed(model=payload["model"], optimizer=payload["optimizer"], step=int(payload["step"]),
                   epoch=int(payload["epoch"]), cursor=int(payload["cursor"]),
                   elapsed=float(payload.get("elapsed_s", 0.0)),
                   best_val=float(payload.get("best_val_loss", math.inf)),
                   best_step=int(payload.get("best_step", 0)), bad_evals=int(payload.get("bad_evals", 0)),
                   chars_seen=int(payload.get("chars_seen", 0)), metrics=list(payload.get("metrics", [])),
                   carried=payload["carried_state"], rng=payload.get("rng", {}), config=old,
                   restart=schedule.Restart(**restart) if restart else None,
                   cooldown=schedule.Cooldown(**cooldown) if cooldown else None)


def restore_rng(rng: dict, device: torch.device) -> None:
    """The random generators as they were when the checkpoint was written."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def append_metric(out_dir: Path, record: dict) -> None:
    """One evaluation's line, flushed at once: `charlm plot` and a tracker may read the file during the run."""
    try:
        with open(out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as exc:
        raise CharlmError(f"could not append to {out_dir / METRICS} ({exc.strerror or exc})")


def rewrite_metrics(out_dir: Path, records: list) -> None:
    """metrics.jsonl holding exactly `records`: on resume, the evaluations the resumed state has seen."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / METRICS, "".join(json.dumps(m) + "\n" for m in records))


def run_name(inputs: list) -> str:
    """The run's name: the file's stem, the folder's name, or the folder several files share."""
    first = Path(inputs[0])
    if len(inputs) == 1:
        return (first.name if first.is_dir() else first.stem) or "corpus"
    parents = {Path(p).resolve().parent for p in inputs}
    return (parents.pop().name if len(parents) == 1 else "") or first.stem or "corpus"


def runs_of(root: Path, stem: str) -> list:
    """The run directories of `stem` under `root` that hold a checkpoint: root/stem, root/stem-2, ..."""
    dirs = [root / stem] + sorted(root.glob(f"{stem}-*"))
    return [d for d in dirs if (d / ckpt.LAST).is_file() or (d / ckpt.BEST).is_file()]


def run_dir(stem: str, out: Optional[Path], resume: bool, force: bool, root: Path = Path("checkpoints")) -> Path:
    """The directory a run of `stem` trains into: --out if given (refusing to start over a run in it without
    --force), else a new root/stem-N, or with --resume the latest run of stem there."""
    if resume:
        if out is not None:
            if not (out / ckpt.LAST).is_file():
                raise CharlmError(f"--resume: {out} holds no last.pt to resume; train without --resume first")
            return out
        runs = [d for d in runs_of(root, stem) if (d / ckpt.LAST).is_file()]
        if not runs:
            raise CharlmError(f"--resume: no previous run of {stem!r} under {root}/; train without --resume first "
                              "(or pass --out RUN_DIR)")
        return max(runs, key=lambda d: (d / ckpt.LAST).stat().st_mtime)
    if out is not None:
        if ((out / ckpt.LAST).is_file() or (out / ckpt.BEST).is_file()) and not force:
            raise CharlmError(f"{out} already holds a run; add --resume to continue it, --force to start over "
                              "in it, or choose another --out")
        return out
    taken = {d.name for d in runs_of(root, stem)}
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return root / name


def prepare_run_dir(out: Path, fresh: bool) -> None:
    """Make `out` and check it takes a file; `fresh` (a new run, not resumed): remove an old run's files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".charlm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CharlmError(f"cannot write to {out} ({exc.strerror or exc}); choose a writable --out")
    if fresh:
        for name in (ckpt.BEST, ckpt.LAST, METRICS):
            (out / name).unlink(missing_ok=True)
