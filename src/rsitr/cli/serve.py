"""``rsitr serve``: the web page and JSON API over an index."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer

from rsitr.cli._app import app
from rsitr.errors import MissingDependencyError

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.")],
    host: Annotated[
        str,
        typer.Option("--host", help="Bind address (loopback by default; anything else exposes the archive)."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Model (default: the one the index was built with).")
    ] = None,
    root: Annotated[
        Path | None, typer.Option("--root", help="Archive root, if it moved since the build.")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest accepted upload.")] = 10.0,
    basemap: Annotated[
        str | None,
        typer.Option(
            "--basemap",
            help="XYZ tile URL template for the map (https://…/{z}/{x}/{y}.png); default none: "
            "footprints over a graticule, nothing loaded from outside.",
        ),
    ] = None,
    basemap_attribution: Annotated[
        str, typer.Option("--basemap-attribution", help="Attribution text the tile provider requires.")
    ] = "",
) -> None:
    """Serve a search page and a JSON API (OpenAPI at /docs) over an index."""
    try:
        import uvicorn

        from rsitr.service import ServiceConfig, UploadPolicy, create_app
    except ImportError as e:
        raise MissingDependencyError(
            f"rsitr serve needs the serve extra: pip install 'rsitr[serve]' ({e})"
        ) from e
    from rsitr.cli.train import setup_logging
    from rsitr.retrieval.index import Index

    setup_logging()
    if not _is_loopback(host):
        logger.warning(
            "binding to %s: anyone who can reach this address can search and view the archive", host
        )
    index = Index.open(index_dir, checkpoint, root=root)
    config = ServiceConfig(
        upload=UploadPolicy(max_bytes=int(max_upload_mb * (1 << 20))),
        basemap=basemap,
        basemap_attribution=basemap_attribution,
    )
    logger.info("serving %d images of %s on http://%s:%d", index.count, index_dir, host, port)
    uvicorn.run(create_app(index, config), host=host, port=port, log_level="info")
