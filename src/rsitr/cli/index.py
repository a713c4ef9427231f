"""``rsitr index build``, ``rsitr index export`` and ``rsitr search``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from rsitr.cli._app import TTA_HELP, app
from rsitr.cli.report import console
from rsitr.errors import ConfigError

index_app = typer.Typer(
    help="Build, update and export search indexes of image archives.", no_args_is_help=True
)
app.add_typer(index_app, name="index")

KIND_HELP = "Vector index: auto (flat up to --ann-threshold, then ivfpq), flat, ivfpq or hnsw."


def _vector_config(kind: str | None, ann_threshold: int | None) -> Any:
    from rsitr.retrieval.index import VectorIndexConfig

    if kind is None and ann_threshold is None:
        return None  # the index's stored options (or the defaults for a new index)
    options: dict[str, Any] = {}
    if kind is not None:
        options["kind"] = kind
    if ann_threshold is not None:
        options["ann_threshold"] = ann_threshold
    return VectorIndexConfig(**options)


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    console.print(report.line(), soft_wrap=True)
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} unreadable file(s) skipped:[/yellow]")
        for f in report.failed[:20]:
            console.print(f"  {f['path']}: {f['error']}", markup=False, highlight=False, soft_wrap=True)
        if len(report.failed) > 20:
            console.print(f"  … full list in {Path(report.index_dir) / 'build_report.json'}", soft_wrap=True)


@index_app.command("build")
def build_cmd(
    images: Annotated[Path, typer.Argument(help="Archive folder (JPEG, PNG, TIFF/GeoTIFF; recursive).")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder or model.safetensors.")],
    out: Annotated[Path, typer.Option("--out", help="Index folder (created, resumed or updated).")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch and commit.")] = 32,
    kind: Annotated[str | None, typer.Option("--index-kind", help=KIND_HELP)] = None,
    ann_threshold: Annotated[
        int | None, typer.Option("--ann-threshold", help="auto: size past which the index is approximate.")
    ] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    workers: Annotated[
        int, typer.Option("--workers", help="local: threads decoding files; ray: embedding actors.")
    ] = 2,
    tta: Annotated[str, typer.Option("--tta", help=TTA_HELP)] = "none",
    engine: Annotated[
        str, typer.Option("--engine", help="local (this process) or ray (an actor pool; the scale extra).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="ray: a running cluster (e.g. auto); default a local Ray."),
    ] = None,
    gpus_per_worker: Annotated[
        float, typer.Option("--gpus-per-worker", help="ray: GPUs per embedding actor (0: CPU).")
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the build report as JSON.")] = False,
) -> None:
    """Index an image archive: resumable (re-run after an interruption), incremental (re-run after
    the folder changed), with a progress bar and ETA; unreadable files are skipped and listed."""
    from rsitr.cli.progress import progress_reporter
    from rsitr.cli.train import setup_logging
    from rsitr.retrieval.index import RayOptions, build_index
    from rsitr.training.trainer import resolve_device

    setup_logging()
    cfg = _vector_config(kind, ann_threshold)
    if engine == "local" and (ray_address is not None or gpus_per_worker):
        raise ConfigError("--ray-address and --gpus-per-worker apply to --engine ray only")
    ray = RayOptions(ray_address, workers, gpus_per_worker) if engine == "ray" else None
    with progress_reporter("embedding", disable=as_json) as progress:
        report = build_index(
            images, checkpoint, out, batch_size=batch_size, vector_config=cfg,
            device=resolve_device(device), workers=workers, progress=progress, tta=tta,
            engine=engine, ray=ray,  # type: ignore[arg-type]
        )  # fmt: skip
    _print_report(report, as_json)


@index_app.command("export")
def export_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.")],
    out: Annotated[Path, typer.Argument(help="The file to write (e.g. archive.parquet).")],
    fmt: Annotated[str, typer.Option("--format", help="Output format: geoparquet.")] = "geoparquet",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Export an index: one row per image (path, sha256, size, CRS, acquisition time, embedding)
    with its footprint in EPSG:4326 as the geometry (null without georeferencing)."""
    from rsitr.retrieval.index.export import FORMATS, export_geoparquet

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    report = export_geoparquet(index_dir, out)
    if as_json:
        typer.echo(json.dumps(report.__dict__))
    else:
        console.print(report.line(), soft_wrap=True)


def _print_hits(title: str, rows: Sequence[Any]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("image")
    table.add_column("size", justify="right")
    table.add_column("CRS")
    table.add_column("lon/lat bounds")
    for r in rows:
        m = r.metadata
        size = f"{m.width}x{m.height}" if m.width else ""
        box = ", ".join(f"{v:.4f}" for v in m.lonlat_bounds) if m.lonlat_bounds else "not georeferenced"
        table.add_row(str(r.rank), f"{r.score:.4f}", r.name, size, m.crs or "", box)
    console.print(table)


@app.command("search")
def search_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.")],
    query: Annotated[str | None, typer.Argument(help="Query text (text→image search).")] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Query image: image→image (or →caption with --captions).")
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option("--captions", help="Caption corpus (.txt, one per line, or a caption dataset)."),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Number of results.")] = 10,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Model (default: the one the index was built with).")
    ] = None,
    root: Annotated[
        Path | None, typer.Option("--root", help="Archive root, if it moved since the build.")
    ] = None,
    bbox: Annotated[
        str | None,
        typer.Option(
            "--bbox", help="Only images whose footprint intersects minx,miny,maxx,maxy (EPSG:4326)."
        ),
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Drop results below this cosine score.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Search an index by text, by image, or rank captions for an image; --bbox and --min-score
    filter the images (the box before ranking: the top k inside it)."""
    from rsitr.data.footprints import parse_bbox
    from rsitr.retrieval.index import Index, read_captions

    if (query is None) == (image is None):
        raise ConfigError("search: give either a query text or --image PATH (not both)")
    if captions is not None and image is None:
        raise ConfigError("--captions ranks captions for an image: add --image PATH")
    if top < 1:
        raise ConfigError(f"--top {top}: expected a positive integer")
    box = parse_bbox(bbox, "--bbox")
    if captions is not None and (box is not None or min_score is not None):
        raise ConfigError("--bbox and --min-score filter images; they do not apply to --captions")
    with Index.open(index_dir, checkpoint, root=root) as index:
        if captions is not None:
            assert image is not None
            hits = index.search_captions(image, read_captions(captions), k=top)
            if as_json:
                typer.echo(json.dumps({"image": str(image), "results": [h.to_dict() for h in hits]}))
                return
            for h in hits:
                console.print(
                    f"{h.rank:>3}  {h.score:.4f}  {h.caption}", markup=False, highlight=False, soft_wrap=True
                )
            return
        filters = {"bbox": box, "min_score": min_score}
        if query is not None:
            results = index.search_text(query, k=top, **filters)  # type: ignore[arg-type]
        else:
            results = index.search_image(image, k=top, **filters)  # type: ignore[arg-type]
        if as_json:
            payload: dict[str, Any] = {"query": query} if query is not None else {"image": str(image)}
            box_list = None if box is None else list(box.as_tuple())
            payload["filters"] = {"bbox": box_list, "min_score": min_score}
            typer.echo(json.dumps({**payload, "results": [r.to_dict() for r in results]}))
            return
        label = f'"{query}"' if query is not None else str(image)
        _print_hits(f"{label}: top {len(results)} of {index.count} images", results)


def quickstart_search(
    images: Path, files: Sequence[Path], checkpoint: Path, out: Path, queries: Sequence[str], top: int = 3
) -> None:
    """The quickstart's last step: index ``files`` of ``images`` and print a few text queries.

    Args:
        images: the archive root.
        files: the files to index (the synthetic test split).
        checkpoint: the trained checkpoint.
        out: the index folder.
        queries: example queries.
        top: results per query.
    """
    import shutil

    from rsitr.retrieval.index import Index, build_index, checkpoint_identity, read_manifest
    from rsitr.retrieval.index.identity import same_identity

    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is not None and not same_identity(manifest.identity, checkpoint_identity(checkpoint)):
        shutil.rmtree(out)  # the quickstart's own index of an earlier run's model: rebuild it
    report = build_index(images, checkpoint, out, files=files)
    console.print(report.line(), soft_wrap=True)
    with Index.open(out, checkpoint) as index:
        for q, hits in zip(queries, index.search_texts(list(queries), k=top), strict=True):
            console.print(
                f'[bold]"{q}"[/bold] → ' + ", ".join(f"{h.name} ({h.score:.3f})" for h in hits),
                highlight=False,
                soft_wrap=True,
            )
    console.print(
        f'search it yourself: rsitr search {out} "a harbour with ships"  or  rsitr serve {out}',
        soft_wrap=True,
    )
