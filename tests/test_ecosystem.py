"""Fitting what PyTorch users already use (issue 24): the gradient norm in metrics.jsonl, weights shared as a
safetensors folder any command loads, and TensorBoard event files beside a run's checkpoints."""

from __future__ import annotations

import json
import math

from conftest import TINY, invoke, word_text


def metrics(run) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_report_the_gradient_norm_before_clipping(runner, tmp_path, one_thread):
    corpus = tmp_path / "words.txt"
    corpus.write_text(word_text(300), encoding="utf-8")
    clip = 1e-3  # far below any real gradient's norm: the clipped norm would be exactly this
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", "--max-steps", "30", "--eval-every", "10",
                    "--no-items", "--clip", str(clip), *TINY)
    assert result.exit_code == 0, result.stderr
    norms = [r["grad_norm"] for r in metrics(tmp_path / "run")]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)
    assert all(n > 20 * clip for n in norms)  # the norm clip_grad_norm_ measured, not the one it left
    assert len(set(norms)) == 3  # each evaluation's own latest step, not one value repeated
