"""The options several commands share, as `Annotated` types, and the help panels they are grouped in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

DATA, MODEL, TRAIN, SAMPLING, OUTPUT, RUN = "Data", "Model", "Training", "Sampling", "Output", "Runtime"

CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", help="A checkpoint file, run directory or exported safetensors folder \\[default: the "
    "newest run under ./checkpoints].",
    rich_help_panel=DATA)]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.", rich_help_panel=RUN)]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same result.",
                                                rich_help_panel=RUN)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout instead of a table.",
                                       rich_help_panel=OUTPUT)]
UnknownOpt = Annotated[str, typer.Option(help="Characters outside the vocabulary: error or skip.",
                                         rich_help_panel=DATA)]
# Commands that read a text for a model read it as the model's training text was read, unless told otherwise.
ReadEncodingOpt = Annotated[Optional[str], typer.Option(
    "--encoding", help="Text encoding of the input \\[default: the model's training text's].", rich_help_panel=DATA,
    show_default=False)]
ReadCrlfOpt = Annotated[Optional[bool], typer.Option(
    "--keep-crlf/--no-keep-crlf", help="Keep CRLF line ends or turn them into LF \\[default: as the model's "
    "training text was read].", rich_help_panel=DATA, show_default=False)]
# A tagged model (train --tag-by): the voice to write or read in; sample takes several (one batch).
TagOpt = Annotated[Optional[List[str]], typer.Option(
    "--tag", help="A tagged model: the tag to condition on (charlm info lists them); repeat for several "
    "\\[default: untagged, the whole text's voice].", rich_help_panel=DATA, show_default=False)]
