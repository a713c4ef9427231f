"""``rsitr synth``: write the synthetic scene dataset (images, Karpathy JSON, labels.csv)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rsitr.cli._app import app
from rsitr.data.synth import generate_scenes


@app.command("synth")
def synth_cmd(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Output folder (created if needed).")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 2000,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed (same seed, same bytes).")] = 0,
    val_frac: Annotated[float, typer.Option("--val-frac", help="Fraction of images in val.")] = 0.1,
    test_frac: Annotated[float, typer.Option("--test-frac", help="Fraction of images in test.")] = 0.1,
    workers: Annotated[
        int, typer.Option("--workers", help="Rendering processes; 0 = one per CPU (at most 8).")
    ] = 0,
    image_format: Annotated[str, typer.Option("--format", help="Image format: jpg|png.")] = "jpg",
    sibling_frac: Annotated[
        float, typer.Option("--sibling-frac", help="Fraction of hard-negative sibling images.")
    ] = 0.3,
) -> None:
    """Generate synthetic remote-sensing scenes with five captions each."""
    summary = generate_scenes(
        out_dir,
        n=n,
        size=size,
        seed=seed,
        val_frac=val_frac,
        test_frac=test_frac,
        workers=workers,
        image_format=image_format,
        sibling_frac=sibling_frac,
    )
    typer.echo(summary.line())
