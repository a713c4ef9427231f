"""``rsitr data check``: validate a caption dataset and report what it contains."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rsitr.cli._app import data_app
from rsitr.data.check import check_corpus
from rsitr.data.formats import list_formats
from rsitr.data.splitting import PROFILES, SplitTarget, make_split
from rsitr.errors import ConfigError, DataError


def print_check_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print a check report as a table followed by blank captions, errors and warnings."""
    console = console or Console()
    if report["errors"] and not report["n_images"] and not report["n_captions"]:
        for e in report["errors"]:  # nothing was read: the error says it all
            console.print(f"[red]error:[/red] {escape(e)}", highlight=False)
        console.print("[red]not usable[/red]")
        return
    table = Table(title=escape(f"{report['source']} [{report['format']}, {report['split']}]"))
    table.add_column("check")
    table.add_column("result", justify="right")
    cpi = ", ".join(f"{k}: {v}" for k, v in report["captions_per_image"].items()) or "-"
    within = report["duplicate_captions_within_images"]
    rows: list[tuple[str, Any]] = [
        ("images", report["n_images"]),
        ("captions", report["n_captions"]),
        ("captions per image (count: images)", cpi),
        ("blank captions", len(report["blank_captions"])),
        ("images with blank captions", len(report["images_with_blank_captions"])),
        ("caption strings shared by several images", report["duplicate_captions_across_images"]),
        ("images repeating a caption", within["images"]),
        ("labelled images", report["labelled_images"]),
    ]
    if report["missing_images"] is not None:
        rows.append(("missing images", len(report["missing_images"])))
    if report["corrupt_images"] is not None:
        rows.append(("corrupt images", len(report["corrupt_images"])))
        for key in ("sizes", "modes"):
            values = report["image_summary"][key]
            rows.append((f"image {key}", ", ".join(f"{k}: {v}" for k, v in list(values.items())[:4])))
    prof = report.get("profile")
    if prof and prof["n_images"]:
        rows += [
            ("distinct captions per image", f"{prof['distinct_per_image']:.2f}"),
            ("images whose captions are all identical", f"{100 * prof['identical_fraction']:.1f} %"),
            (f"captions also in {prof['reference']}", f"{100 * prof['verbatim_overlap']:.1f} %"),
            ("scenes", len(prof["scene_mix"])),
        ]
    if report["split_overlap"] is not None:
        rows.append(("images in several splits", report["split_overlap"]["images"]))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    for e in report["errors"]:
        console.print(f"[red]error:[/red] {escape(e)}", highlight=False)
    console.print("[green]usable[/green]" if not report["errors"] else "[red]not usable[/red]")


@data_app.command("check")
def check_cmd(
    source: Annotated[Path, typer.Argument(help="Caption file or directory.")],
    split: Annotated[str | None, typer.Option("--split", help="Split to check (train, val, test).")] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Image root: report missing images.")
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels.csv with filename,scene.")] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help=f"Caption format: {'|'.join(list_formats())}.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset for scene rules (ucm, rsitmd, ...).")
    ] = None,
    deep: Annotated[bool, typer.Option("--deep", help="Decode every image (needs --images).")] = False,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="Training data for the profile's verbatim overlap."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check a caption dataset; exit 0 when usable (warnings allowed), 2 when not."""
    report = check_corpus(
        source, split=split, fmt=fmt, images=images, labels=labels, deep=deep, dataset=dataset,
        reference=reference,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_check_report(report)
    errors = report["errors"]
    if errors:
        # An RsitrError, not typer.Exit: rsitr.cli.run maps it to one stderr line and exit code 2.
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(f"not usable: {errors[0]}{more}")


@data_app.command("split")
def split_cmd(
    source: Annotated[Path, typer.Argument(help="Karpathy JSON to carve a validation split from.")],
    images: Annotated[Path, typer.Option("--images", help="Image root (pHash of every pool image).")],
    labels: Annotated[Path | None, typer.Option("--labels", help="labels.csv: scene mix.")] = None,
    profile: Annotated[
        str, typer.Option("--profile", help=f"Target profile: {'|'.join(PROFILES)}|custom.")
    ] = "rsicd-test",
    pool: Annotated[str, typer.Option("--from", help="Comma-separated splits to carve from.")] = "train,val",
    n_val: Annotated[int | None, typer.Option("--n-val", help="Validation images (profile's).")] = None,
    distinct: Annotated[float | None, typer.Option("--distinct", help="Distinct captions/image.")] = None,
    identical: Annotated[float | None, typer.Option("--identical", help="Share of images, 0-1.")] = None,
    overlap: Annotated[float | None, typer.Option("--overlap", help="Share of captions in train.")] = None,
    min_distinct: Annotated[int | None, typer.Option("--min-distinct", help="Eligibility.")] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="Runs of N consecutive file numbers stay on one side.")
    ] = None,
    phash_distance: Annotated[int, typer.Option("--phash-distance", help="Near-duplicate bits.")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Output JSON (default: next to SOURCE).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Carve a validation split whose profile mirrors a target (e.g. the RSICD test split)."""
    if profile != "custom" and profile not in PROFILES:
        raise ConfigError(f"--profile: unknown profile {profile!r} (choose {', '.join(PROFILES)}, custom)")
    base = PROFILES.get(profile, SplitTarget())
    given = {"n_images": n_val, "distinct_per_image": distinct, "identical_fraction": identical,
             "verbatim_overlap": overlap, "min_distinct": min_distinct, "block_size": block_size}  # fmt: skip
    target = replace(base, **{k: v for k, v in given.items() if v is not None})
    path, result = make_split(
        source, images, target, profile_name=profile, labels=labels,
        pool_splits=tuple(s.strip() for s in pool.split(",") if s.strip()), seed=seed,
        phash_distance=phash_distance, out=out,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"out": str(path), **result.settings, "val_profile": result.profile}, indent=2))
        return
    table = Table(title=escape(f"{path}: new val ({len(result.val)} images) vs target"))
    table.add_column("figure")
    table.add_column("target", justify="right")
    table.add_column("new val", justify="right")
    table.add_column("new train", justify="right")
    p, tp = result.profile, result.train_profile
    table.add_row("images", str(target.n_images), str(p["n_images"]), str(tp["n_images"]))
    for label, key, pct in (
        ("distinct captions per image", "distinct_per_image", False),
        ("images with all captions identical", "identical_fraction", True),
        ("captions also elsewhere in train", "verbatim_overlap", True),
    ):
        cells = [getattr(target, key), p[key], tp[key]]
        table.add_row(label, *[f"{100 * v:.1f} %" if pct else f"{v:.2f}" for v in cells])
    table.add_row("groups kept on one side (number runs, pHash)", "", str(result.groups), "")
    Console().print(table)
