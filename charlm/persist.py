"""What a training run keeps in its directory, beside checkpoint.py (which writes and reads one file safely):
the payload of a checkpoint (the weights, the optimizer, where the run stands, every stream's carried state,
the random generators), reading one back to resume exactly where it stopped, and metrics.jsonl (one JSON
line per evaluation). The Trainer decides when to save; this module knows what a save holds.
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
    restart = trainer.schedule.restart
    return {**trainer.meta, "train_config": trainer.config.to_dict(),
            "model": ckpt.clean_state_dict(trainer.model.state_dict()),
            "optimizer": trainer.optimizer.state_dict(), "step": trainer.step, "epoch": trainer.epoch,
            "cursor": trainer.cursor, "carried_state": carried,
            "rng": rng, "elapsed_s": trainer.elapsed, "best_val_loss": trainer.best_val, "best_step": trainer.best_step,
            "bad_evals": trainer.bad_evals, "chars_seen": trainer.chars_seen, "metrics": list(trainer.metrics),
            "schedule_restart": restart.to_dict() if restart else None}


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
    restart = payload.get("schedule_restart")
    return Resumed(model=payload["model"], optimizer=payload["optimizer"], step=int(payload["step"]),
                   epoch=int(payload["epoch"]), cursor=int(payload["cursor"]),
                   elapsed=float(payload.get("elapsed_s", 0.0)),
                   best_val=float(payload.get("best_val_loss", math.inf)),
                   best_step=int(payload.get("best_step", 0)), bad_evals=int(payload.get("bad_evals", 0)),
                   chars_seen=int(payload.get("chars_seen", 0)), metrics=list(payload.get("metrics", [])),
                   carried=payload["carried_state"], rng=payload.get("rng", {}), config=old,
                   restart=schedule.Restart(**restart) if restart else None)


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
