"""How far a bounded evaluation (--eval-chars N: N validation characters in 32 evenly spread segments) strays
from the full pass over the validation tail, for the models a short run trains. This chose the default.

For each corpus: train a model (`charlm train` with the given budget), then score its best checkpoint on the
validation tail in full and with N = 4k ... 128k characters, the segments laid out exactly as training lays
them out, and print |slice - full| in nats/char and the time each pass took.

    .venv/bin/python bench/eval_slice.py                        # Tiny Shakespeare and python-stdlib, 2 minutes each
    .venv/bin/python bench/eval_slice.py --time 60s --corpora tinyshakespeare
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charlm import checkpoint as ckpt  # noqa: E402
from charlm.runs import model_from_payload  # noqa: E402
from charlm.corpus import load_corpus, split_train_val  # noqa: E402
from charlm.evaluation import EVAL_SEQ_LEN, evaluate  # noqa: E402
from charlm.streams import eval_streams  # noqa: E402
from charlm.train import TrainConfig  # noqa: E402

SIZES = (4096, 8192, 16_384, 32_768, 65_536, 131_072)


def corpus_file(name: str, work: Path) -> Path:
    if name == "tinyshakespeare":
        return ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    from charlm.datasets import corpus_path

    return corpus_path(name, data_dir=work / "data")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", default="2m")
    parser.add_argument("--corpora", nargs="+", default=["tinyshakespeare", "python-stdlib"])
    args = parser.parse_args()
    defaults = TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'corpus':<16} {'val chars':>9} {'full loss':>9} " + " ".join(f"{n // 1024:>6}k" for n in SIZES))
        for name in args.corpora:
            path = corpus_file(name, work)
            out = work / f"run-{name}"
            subprocess.run([sys.executable, "-m", "charlm", "train", str(path), "--max-time", args.time,
                            "--no-preview", "--out", str(out)], cwd=work, check=True, capture_output=True)
            payload = ckpt.load(out)
            model, vocab = model_from_payload(payload)
            corpus = load_corpus(path, vocab)
            _, val = split_train_val(corpus.ids, defaults.val_frac)
            t = time.perf_counter()
            full_total, full_n = evaluate(model, eval_streams(val, defaults.eval_streams, defaults.burn_in),
                                          EVAL_SEQ_LEN, "cpu")
            full_s = time.perf_counter() - t
            full = full_total / full_n
            cells = []
            for n in SIZES:
                t = time.perf_counter()
                total, count = evaluate(model, eval_streams(val, defaults.eval_streams, defaults.burn_in, n),
                                        EVAL_SEQ_LEN, "cpu")
                cells.append(f"{total / count - full:+.4f}" if count < full_n else "  full")
                cells[-1] += f"/{(time.perf_counter() - t) / full_s:.2f}"
            print(f"{name:<16} {full_n:>9,} {full:9.4f} " + " ".join(cells), flush=True)
        print("each cell: slice loss - full loss (nats/char) / slice time as a fraction of the full pass's")


if __name__ == "__main__":
    main()
