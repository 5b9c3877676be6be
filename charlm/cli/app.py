"""The `charlm` command: every subcommand's options and help, each handing a request to its command body
(charlm/cli/<command>.py), and the error boundary (a CharlmError or a bad command line is one line on stderr
and a non-zero exit, never a traceback).

Generated text goes to stdout; progress, summaries, warnings and errors go to stderr, so
`charlm sample > out.txt` holds only text.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from charlm import __version__
from charlm.cli.options import (DATA, MODEL, OUTPUT, RUN, SAMPLING, TRAIN, CheckpointOpt, DeviceOpt, JsonOpt,
                                ReadCrlfOpt, ReadEncodingOpt, SeedOpt, TagOpt, UnknownOpt)
from charlm.errors import CharlmError

app = typer.Typer(
    name="charlm",
    help="Character-level recurrent language models: train on any text file, sample from it.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

def version_callback(value: bool):
    if value:
        typer.echo(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                    help="Show the version and exit.")] = None,
):
    """Character-level recurrent language models: train on any text file, sample from it.

    [bold]Example[/bold]: charlm train --corpus python-stdlib --max-time 2m && charlm sample --prime "def "
    """


def reports_errors(command):
    """A CharlmError inside a command becomes one line on stderr and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CharlmError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code)

    return wrapper


# ---------------------------------------------------------------------------------------------- train
@app.command()
@reports_errors
def train(
    corpus: Annotated[Optional[List[Path]], typer.Argument(
        help="Text to learn from: a file, several files, a folder (every file under it) or a glob; files are "
             "read in sorted order and joined with a blank line.", show_default=False)] = None,
    named: Annotated[Optional[str], typer.Option("--corpus", help="A named corpus instead of a file: python-stdlib "
                                                 "(offline) or tinyshakespeare (downloaded).", rich_help_panel=DATA)] = None,
    encoding: Annotated[Optional[str], typer.Option(help="Text encoding of the files \\[default: utf-8].",
                                                    rich_help_panel=DATA, show_default=False)] = None,
    keep_crlf: Annotated[Optional[bool], typer.Option(
        "--keep-crlf/--no-keep-crlf", help="Keep CRLF line ends \\[default: they become LF].", rich_help_panel=DATA,
        show_default=False)] = None,
    val_frac: Annotated[Optional[float], typer.Option(
        help="Fraction of the text, from its end, held out for validation \\[default: 0.1].", rich_help_panel=DATA,
        show_default=False)] = None,
    items: Annotated[Optional[bool], typer.Option(
        "--items/--no-items", help="Train on one item per line (names, words, titles): items reshuffled every "
        "epoch, a random sample of them validates \\[default: recognised from the text].", rich_help_panel=DATA,
        show_default=False)] = None,
    tag_by: Annotated[Optional[str], typer.Option(
        help="Tag each part of the text, one model for many voices: folder (each sub-folder of the input is a "
             "tag), file (each file's name) or field (TAG<TAB>TEXT lines); then sample --tag NAME.",
        rich_help_panel=DATA, show_default=False)] = None,
    cell: Annotated[Optional[str], typer.Option(help="Recurrent cell: rnn, gru or lstm \\[default: gru].",
                                                rich_help_panel=MODEL, show_default=False)] = None,
    nonlinearity: Annotated[Optional[str], typer.Option(help="rnn cell only: tanh or relu \\[default: tanh].",
                                                        rich_help_panel=MODEL, show_default=False)] = None,
    hidden: Annotated[Optional[int], typer.Option(help="Units per layer \\[default: auto].", rich_help_panel=MODEL,
                                                  show_default=False)] = None,
    layers: Annotated[Optional[int], typer.Option(help="Recurrent layers \\[default: auto].", rich_help_panel=MODEL,
                                                  show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout between layers and before the decoder "
                                                     "\\[default: auto].", rich_help_panel=MODEL,
                                                     show_default=False)] = None,
    embedding: Annotated[Optional[int], typer.Option(help="0 = one-hot input; N = a learned N-dim embedding "
                                                     "\\[default: auto].", rich_help_panel=MODEL,
                                                     show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams per step, all processes together "
                                                      "(B) \\[default: auto].", rich_help_panel=TRAIN,
                                                      show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Characters per truncated-BPTT chunk (T) \\[default: auto].",
                                                   rich_help_panel=TRAIN, show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate \\[default: 0.005].", rich_help_panel=TRAIN,
                                                show_default=False)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, adam, rmsprop or sgd \\[default: adamw].",
                                                     rich_help_panel=TRAIN, show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help="AdamW weight decay \\[default: auto: 0.01 for a run that reads its text up to twice, "
             "0.1 up to five times, 0.3 for more].",
        rich_help_panel=TRAIN, show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps \\[default: 50].", rich_help_panel=TRAIN,
                                                  show_default=False)] = None,
    clip: Annotated[Optional[float], typer.Option(help="Gradient clipping by global norm \\[default: 1.0].",
                                                  rich_help_panel=TRAIN, show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Stop after this many passes over the text.",
                                                    rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.",
                                                     rich_help_panel=TRAIN)] = None,
    max_time: Annotated[Optional[str], typer.Option(help="Stop after this much training time: 90s, 10m, 1.5h "
                                                    "\\[default: 10m when no limit is given].",
                                                    rich_help_panel=TRAIN, show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        help="Steps between validation passes and checkpoints \\[default: by time: the first after 15 s or 10% "
             "of the budget, whichever is later, then every 10%].", rich_help_panel=TRAIN, show_default=False)] = None,
    eval_chars: Annotated[Optional[int], typer.Option(
        help="Validation characters each periodic evaluation scores: a fixed sample spread over the held-out "
             "text (0 = all of it). The final report always scores all of it \\[default: sized to the budget, "
             "16,384 to 65,536; 65,536 when the model and layout are all given].", rich_help_panel=TRAIN,
        show_default=False)] = None,
    full_final_eval: Annotated[Optional[bool], typer.Option(
        "--full-final-eval/--no-full-final-eval",
        help="At the end, score the best model in float32 on the whole validation text whatever it costs, "
             "and the last beside it when a sample of the text picked the best (the lower is kept) "
             "(--no-...: skip it) \\[default: the whole text when that fits in 5% of the budget (at least 2 s), "
             "else an even sample that does, with its standard error].", rich_help_panel=TRAIN,
        show_default=False)] = None,
    patience: Annotated[int, typer.Option(help="After this many evaluations without a new best, go back to the "
                                          "best weights, cool the learning rate down from there and stop "
                                          "(0 = never end early).", rich_help_panel=TRAIN)] = 3,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed and flags give the same run "
                                                "\\[default: 1337].", rich_help_panel=RUN, show_default=False)] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16 (autocast). auto = bf16 where the hardware "
                                           "does bf16 natively.", rich_help_panel=RUN)] = "auto",
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model. Only the input layer and the decoder compile "
                                                "(Dynamo stops at the recurrent kernel); on a 2-core CPU it cost 9-36 s "
                                                "of compiling, counted in --max-time, and no measurable speed-up "
                                                "(BENCHMARKS.md). Untried on GPUs.",
                                                rich_help_panel=RUN)] = False,
    out: Annotated[Optional[Path], typer.Option(help="Run directory \\[default: checkpoints/<corpus name>].",
                                                rich_help_panel=OUTPUT, show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out (or the newest run of this corpus) "
                                         "exactly where it stopped, with its own options; a larger limit trains "
                                         "it longer.", rich_help_panel=OUTPUT)] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune an existing checkpoint on this corpus "
                                                      "(keeps its architecture and every character it knows; "
                                                      "characters it never saw are added: --grow-vocab).",
                                                      rich_help_panel=OUTPUT)] = None,
    grow_vocab: Annotated[bool, typer.Option(
        "--grow-vocab/--no-grow-vocab", help="--init-from on a text with characters the model never saw: add "
        "them (the old characters' predictions start unchanged; --no-...: refuse the text, naming them).",
        rich_help_panel=DATA)] = True,
    unknown: Annotated[Optional[str], typer.Option(
        help="--init-from: characters the model never saw: error (refuse) or skip (drop them from the text) "
             "\\[default: add them, see --grow-vocab].", rich_help_panel=DATA, show_default=False)] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run in --out; resume on a changed corpus.",
                                        rich_help_panel=OUTPUT)] = False,
    preview: Annotated[bool, typer.Option(help="Show a short sample at every evaluation.",
                                          rich_help_panel=OUTPUT)] = True,
    log: Annotated[Optional[str], typer.Option(help="tensorboard: also write TensorBoard event files into "
                                               "RUN/tensorboard/ (needs pip install 'charlm\\[tensorboard]'); "
                                               "`tensorboard --logdir checkpoints` shows every run.",
                                               rich_help_panel=OUTPUT, show_default=False)] = None,
):
    """Train a model on a text file; checkpoints go to checkpoints/<name>/{best.pt,last.pt,metrics.jsonl}.

    Model size, input, layout and dropout default to [bold]auto[/bold]: chosen from the text, the budget and a
    second-long speed probe of the device (the start summary says what and why, and the flags that repeat it).

    [bold]Examples[/bold]:
      charlm train corpus.txt
      charlm train --corpus python-stdlib --max-time 2m
      charlm train corpus.txt --cell lstm --hidden 256 --max-time 30m
      charlm train corpus.txt --resume          (after Ctrl-C: the same command plus --resume)
      charlm train poems/ --tag-by folder       (poems/dickinson/*.txt, poems/whitman/*.txt: two voices)
      torchrun --standalone --nproc_per_node=2 -m charlm train corpus.txt
    """
    from charlm.cli.train import TrainRequest, run_train

    request = TrainRequest(**{k: v for k, v in locals().items() if k in TrainRequest.__dataclass_fields__})
    run_train(request, err)


# ---------------------------------------------------------------------------------------------- sample
@app.command()
@reports_errors
def sample(
    checkpoint: CheckpointOpt = None,
    prime: Annotated[Optional[str], typer.Option("--prime", "-p", help="Text to start from (printed first).",
                                                 rich_help_panel=SAMPLING)] = None,
    prime_file: Annotated[Optional[Path], typer.Option(help="Read the prime from a file.",
                                                       rich_help_panel=SAMPLING)] = None,
    length: Annotated[int, typer.Option("--length", "-n", help="New characters to generate per sample.",
                                        rich_help_panel=SAMPLING)] = 500,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="< 1: safer text, > 1: wilder.",
                                               rich_help_panel=SAMPLING)] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely characters (0 = all).",
                                       rich_help_panel=SAMPLING)] = 0,
    top_p: Annotated[float, typer.Option(help="Sample among the most likely characters whose probabilities "
                                         "reach p (1 = all).", rich_help_panel=SAMPLING)] = 1.0,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely character.",
                                         rich_help_panel=SAMPLING)] = False,
    num_samples: Annotated[Optional[int], typer.Option(
        help="Samples generated together as one batch \\[default: 1; 10 items for a model of a list].",
        rich_help_panel=SAMPLING, show_default=False)] = None,
    stop: Annotated[Optional[str], typer.Option(help="End a sample once it produces this text.",
                                                rich_help_panel=SAMPLING)] = None,
    unknown: UnknownOpt = "error",
    seed: SeedOpt = None,
    novelty: Annotated[bool, typer.Option(help="Report the longest part of each sample found verbatim in the "
                                          "training corpus.", rich_help_panel=OUTPUT)] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="A prompt loop that keeps the model's "
                                              "state between turns.", rich_help_panel=SAMPLING)] = False,
    separator: Annotated[str, typer.Option(help="Printed between samples when --num-samples > 1.",
                                           rich_help_panel=OUTPUT)] = "\n---\n",
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    allow_copies: Annotated[bool, typer.Option(help="Model of a list: also print items already in the list.",
                                               rich_help_panel=SAMPLING)] = False,
    min_length: Annotated[int, typer.Option(help="Model of a list: the shortest item to keep.",
                                            rich_help_panel=SAMPLING)] = 1,
    max_length: Annotated[Optional[int], typer.Option(
        help="Model of a list: the longest item to keep \\[default: half again the length of 99% of the list's "
             "items, at least 64].", rich_help_panel=SAMPLING)] = None,
    tag: TagOpt = None,
):
    """Generate text: warm the model on the prime, then sample one character at a time.

    A model trained on a list (one item per line) answers with new items, one per line: the prime is the
    start of each item, and items already in the list are left out unless --allow-copies.

    [bold]Examples[/bold]:
      charlm sample --prime "ROMEO:" --length 300
      charlm sample -c checkpoints/corpus --temperature 0.5 --num-samples 4 --seed 1
      charlm sample --prime "def " --stop "\\n\\n" > snippet.py
      charlm sample --interactive
      charlm sample -c checkpoints/names --prime ka --num-samples 20 --json
      charlm sample -c checkpoints/poems --tag whitman --tag dickinson --num-samples 2
    """
    from charlm.cli.sample import SampleRequest, run_sample

    request = SampleRequest(**{k: v for k, v in locals().items() if k in SampleRequest.__dataclass_fields__})
    run_sample(request, err)


# ---------------------------------------------------------------------------------------------- eval / info / plot
@app.command(name="eval")
@reports_errors
def evaluate(
    corpus: Annotated[Path, typer.Argument(help="A text file to score (a folder with --by-tag).",
                                           show_default=False)],
    checkpoint: CheckpointOpt = None,
    encoding: ReadEncodingOpt = None,
    keep_crlf: ReadCrlfOpt = None,
    unknown: UnknownOpt = "error",
    streams: Annotated[int, typer.Option(help="Parallel streams (each warmed on the text before it).",
                                         rich_help_panel=RUN)] = 8,
    max_chars: Annotated[Optional[int], typer.Option(
        help="Score an even sample of this many characters (64+ segments spread over the text) and report its "
             "standard error \\[default: every character].", rich_help_panel=DATA, show_default=False)] = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    tag: TagOpt = None,
    by_tag: Annotated[bool, typer.Option(
        "--by-tag", help="A tagged model: read the text's tags as the model's training text's were (its "
        "--tag-by) and report the loss of each tag's part given its tag, beside the untagged loss.",
        rich_help_panel=OUTPUT)] = False,
):
    """Score a text file with a trained model: loss (nats/char), bits per character, perplexity.

    [bold]Examples[/bold]:
      charlm eval held_out.txt --checkpoint checkpoints/corpus --json
      charlm eval held_out_poems/ -c checkpoints/poems --by-tag
    """
    from charlm.cli.eval import EvalRequest, run_eval

    run_eval(EvalRequest(**{k: v for k, v in locals().items() if k in EvalRequest.__dataclass_fields__}), err)


@app.command()
@reports_errors
def info(
    path: Annotated[Optional[Path], typer.Argument(help="A checkpoint file or run directory \\[default: the newest "
                                                   "run].", show_default=False)] = None,
    as_json: JsonOpt = False,
):
    """Summarise a model: layers and parameter counts, vocabulary, training configuration and progress.

    [bold]Example[/bold]: charlm info checkpoints/corpus
    """
    from charlm.cli.info import run_info

    run_info(path, as_json, err)


@app.command()
@reports_errors
def plot(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run directory \\[default: the newest run].",
                                                      show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write a PNG (needs matplotlib: "
                                                   "pip install 'charlm\\[plot]'); without it, draw in the "
                                                   "terminal.")] = None,
):
    """Plot training and validation loss against step.

    [bold]Examples[/bold]: charlm plot checkpoints/corpus    charlm plot checkpoints/corpus -o curve.png
    """
    from charlm.cli.info import run_plot

    run_plot(run_dir, output, err)


@app.command()
def corpora():
    """List the named corpora that `charlm train --corpus NAME` can make or fetch.

    [bold]Example[/bold]: charlm corpora
    """
    from charlm.datasets import NAMES

    for name, text in NAMES.items():
        typer.echo(f"{name:<16} {text}")


@app.command()
@reports_errors
def classify(
    path: Annotated[str, typer.Argument(metavar="FILE|-", help="A text to classify, or - for stdin.",
                                        show_default=False)],
    checkpoint: CheckpointOpt = None,
    each: Annotated[str, typer.Option(help="file: the whole text; paragraph or line: classify every "
                                      "(blank-line separated) paragraph or line on its own, one result a line.",
                                      rich_help_panel=OUTPUT)] = "file",
    encoding: ReadEncodingOpt = None,
    keep_crlf: ReadCrlfOpt = None,
    unknown: UnknownOpt = "error",
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
):
    """Which tag of a tagged model (train --tag-by) finds this text most likely: every tag's loss, ranked,
    with its posterior share (equal priors).

    [bold]Examples[/bold]:
      charlm classify unknown_poem.txt -c checkpoints/poems
      charlm classify held_out.txt -c checkpoints/poems --each paragraph --json
    """
    from charlm.cli.classify import ClassifyRequest, run_classify

    run_classify(ClassifyRequest(**{k: v for k, v in locals().items() if k in ClassifyRequest.__dataclass_fields__}),
                 err)


# ---------------------------------------------------------------------------------------------- score / explain
# (commands that read a text with a model: per-character log-probabilities, surprisal colouring, neurons)
@app.command()
@reports_errors
def score(
    path: Annotated[str, typer.Argument(metavar="FILE|-", help="A text file to score, or - for stdin.",
                                        show_default=False)],
    checkpoint: CheckpointOpt = None,
    encoding: ReadEncodingOpt = None,
    keep_crlf: ReadCrlfOpt = None,
    unknown: UnknownOpt = "error",
    summary: Annotated[bool, typer.Option(help="Print totals (nats, bits/char, perplexity) and the most "
                                          "surprising spans instead of one line per character.",
                                          rich_help_panel=OUTPUT)] = False,
    top: Annotated[int, typer.Option(help="Predictions listed per character.", rich_help_panel=OUTPUT)] = 5,
    streams: Annotated[int, typer.Option(help="Parallel streams for a file (each warmed on the text before it, "
                                         "as eval's); stdin always uses one.", rich_help_panel=RUN)] = 8,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    rank: Annotated[bool, typer.Option("--rank", help="Read each line as a candidate item and list them from the "
                                       "most to the least likely (for a model of a list: which of these sounds "
                                       "most like my list?).", rich_help_panel=OUTPUT)] = False,
    tag: Annotated[Optional[str], typer.Option(
        help="A tagged model: score the text in this tag's voice \\[default: untagged].", rich_help_panel=DATA,
        show_default=False)] = None,
):
    """Score every character of a text: JSON lines {"i", "char", "logprob", "rank", "top"} on stdout.

    The first character is predicted after one line break (where sampling starts), the rest from all before.

    Files and stdin of any length are read piece by piece, in constant memory. --summary: totals instead.

    [bold]Examples[/bold]:
      charlm score held_out.txt | head
      cat notes.txt | charlm score - --summary
      charlm score candidates.txt -c checkpoints/names --rank
    """
    from charlm.cli.score import ScoreRequest, run_rank, run_score

    request = ScoreRequest(**{k: v for k, v in locals().items() if k in ScoreRequest.__dataclass_fields__})
    (run_rank if rank else run_score)(request, err)


@app.command()
@reports_errors
def explain(
    text: Annotated[Optional[str], typer.Argument(help="The text to explain (or use --file).",
                                                  show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the text from a file.",
                                                 rich_help_panel=DATA)] = None,
    checkpoint: CheckpointOpt = None,
    encoding: ReadEncodingOpt = None,
    keep_crlf: ReadCrlfOpt = None,
    unknown: UnknownOpt = "error",
    html: Annotated[Optional[Path], typer.Option(help="Write one self-contained HTML page (hover a character for "
                                                 "its predictions) instead of printing.",
                                                 rich_help_panel=OUTPUT)] = None,
    neurons: Annotated[bool, typer.Option("--neurons", help="Find the hidden units that track quotes, line "
                                          "position, brackets, indentation, words, line starts.",
                                          rich_help_panel=OUTPUT)] = False,
    unit: Annotated[Optional[list[int]], typer.Option("--unit", help="Show this unit's activation (repeatable); "
                                                      "units count layer by layer from 0.",
                                                      rich_help_panel=OUTPUT)] = None,
    device: DeviceOpt = "auto",
):
    """Show how surprised the model is by each character (colours and a legend), or what its units track.

    [bold]Examples[/bold]:
      charlm explain "To be, or not to be"
      charlm explain --file scene.txt --html scene.html
      charlm explain --file code.py --neurons
      charlm explain --file code.py --unit 37
    """
    from charlm.cli.explain import ExplainRequest, run_explain

    units = list(unit or [])
    run_explain(ExplainRequest(**{k: v for k, v in locals().items() if k in ExplainRequest.__dataclass_fields__}), err)



# ---------------------------------------------------------------------------------------------- serve / export
# (commands that put a trained model to work outside charlm: an HTTP server, portable model files)
@app.command()
@reports_errors
def serve(
    checkpoint: CheckpointOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; the default serves this machine only.",
                                      rich_help_panel=RUN)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port).", rich_help_panel=RUN)] = 8000,
    max_batch: Annotated[int, typer.Option(help="Samples advanced together in one model step; more "
                                           "wait their turn.", rich_help_panel=RUN)] = 64,
    threads: Annotated[int, typer.Option(help="CPU threads for the model's steps \\[default: one per core but "
                                         "one, which is left to the HTTP side].", show_default=False,
                                         rich_help_panel=RUN)] = 0,
    device: DeviceOpt = "auto",
):
    """Serve a model over HTTP: POST /v1/sample (JSON, or server-sent events with "stream": true),
    POST /v1/score, GET /v1/model, GET /healthz, and a page at / to try it. Needs pip install 'charlm\\[serve]'.

    [bold]Examples[/bold]:
      charlm serve -c checkpoints/corpus
      curl -s localhost:8000/v1/sample -d '{"prime": "ROMEO:", "length": 200, "seed": 1}'
    """
    from charlm.cli.serve import run_serve

    run_serve(checkpoint, host, port, device, max_batch, threads, err)


@app.command()
@reports_errors
def export(
    run: Annotated[Optional[Path], typer.Argument(help="A checkpoint file or run directory \\[default: the newest "
                                                  "run].", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The file to write: .onnx (ONNX, needs "
                                                   "pip install 'charlm\\[export]') or .pt2 (torch.export); the "
                                                   "folder for --format safetensors \\[default: model.onnx; model/].",
                                                   rich_help_panel=OUTPUT, show_default=False)] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="onnx, pt2 or safetensors (a folder others load: "
                                               "model.safetensors, config.json, README.md; needs pip install "
                                               "'charlm\\[hub]') \\[default: from the -o suffix].",
                                               rich_help_panel=OUTPUT, show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Run the file (onnxruntime for .onnx) and compare "
                                        "sampled steps with the model's own; a folder: read its weights back "
                                        "and compare them bit for bit.", rich_help_panel=OUTPUT)] = False,
    steps: Annotated[int, typer.Option(help="Sampled steps --check compares.", rich_help_panel=OUTPUT)] = 200,
):
    """Write the model's one-step cell (state as explicit inputs and outputs, vocabulary in the metadata)
    for use without charlm: ONNX for onnxruntime in any language, or a torch.export program. Or share the
    model: --format safetensors writes the weights, config.json and a model card into a folder that every
    command's -c loads.

    [bold]Examples[/bold]:
      charlm export checkpoints/corpus -o model.onnx --check
      charlm export checkpoints/corpus -o model.pt2
      charlm export checkpoints/corpus -o corpus-gru --format safetensors
    """
    from charlm.cli.export import run_export

    run_export(run, output, check, steps, "cpu", err, fmt)


def _usage_errors() -> tuple:
    """The exception types Typer raises for bad command lines (TyperException from 0.2x; click's before)."""
    found = [getattr(typer, "TyperException", None)]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(e for e in found if e is not None)


def main():
    """Entry point: one line on stderr and a non-zero exit for any bad input, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except CharlmError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except _usage_errors() as exc:
        if not exc.format_message():  # bare `charlm`: the help was the answer
            sys.exit(0)
        where = getattr(getattr(exc, "ctx", None), "command_path", "charlm")
        err.print(f"[red]error:[/red] {escape(exc.format_message())} (see: {where} --help)", soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
