"""The Typer application that every ``rsitr.cli`` module registers its commands on."""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

#: Commands in the order a user meets them: try it, get data, train, evaluate, then search.
COMMAND_ORDER = (
    "quickstart", "synth", "data", "train", "runs", "evaluate", "evaluate-scores", "tune-rerank",
    "embed", "index", "search", "serve",
)  # fmt: skip


class UserPathGroup(TyperGroup):
    """Lists commands in :data:`COMMAND_ORDER` (any others after them, alphabetically)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {n: i for i, n in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


app = typer.Typer(
    name="rsitr",
    cls=UserPathGroup,
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
