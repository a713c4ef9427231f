"""The Typer application that every ``rsitr.cli`` module registers its commands on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rsitr",
    help="Remote sensing image-text retrieval: train, evaluate, rerank, index and search.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

data_app = typer.Typer(help="Inspect and validate caption datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

TTA_HELP = (
    "Test-time views averaged into each image embedding: none|flips|d4 or a comma-separated list "
    "(identity, hflip, vflip, rot90, rot180, rot270, transpose, antitranspose)"
)
