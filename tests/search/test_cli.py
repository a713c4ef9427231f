"""The command line: index build (report), search (text, image, image→caption, JSON, filters),
and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsitr.cli import run
from tests.search.conftest import SearchAssets


def test_index_build_and_search_commands(
    assets: SearchAssets, archive_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (archive_copy / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    merged = tmp_path / "index"
    argv = ["index", "build", str(archive_copy), "--checkpoint", str(assets.ckpt), "--out", str(merged)]
    assert run([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 40
    assert [f["path"] for f in report["failed"]] == ["broken.png"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "40 images indexed" in out and "broken.png" in out

    caption, image = assets.query
    assert run(["search", str(merged), caption, "--top", "3", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["query"] == caption  # the text as typed, no added quotes
    assert body["filters"] == {"bbox": None, "min_score": None}
    assert body["results"][0]["name"] == image and len(body["results"]) == 3
    floor = body["results"][1]["score"]
    assert run(["search", str(merged), caption, "--top", "3", "--min-score", str(floor), "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["results"]
    assert [h["name"] for h in kept] == [h["name"] for h in body["results"][:2]]
    # no image here is georeferenced: a box keeps none of them
    assert run(["search", str(merged), caption, "--bbox", "-180,-90,180,90", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == []
    assert body["results"][0]["metadata"]["width"] == 128

    assert run(["search", str(merged), "--image", str(archive_copy / image), "--top", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["name"] == image and hits[0]["score"] >= hits[1]["score"]  # the image finds itself

    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(c for cs in assets.captions.values() for c in cs))
    assert (
        run(
            [
                "search",
                str(merged),
                "--image",
                str(archive_copy / image),
                "--captions",
                str(caps),
                "--top",
                "5",
                "--json",
            ]
        )
        == 0
    )
    ranked = [h["caption"] for h in json.loads(capsys.readouterr().out)["results"]]
    from rsitr.retrieval.index import Index, read_captions

    with Index.open(merged, assets.ckpt) as ix:  # exactly the API's ranking, first included
        want = [h.caption for h in ix.search_captions(archive_copy / image, read_captions(caps), k=5)]
    assert ranked == want and len(ranked) == 5
    assert set(ranked) & set(assets.captions[image])  # its own captions rank high (a tiny model)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "{idx}"], "either a query text or --image"),
        (["search", "{idx}", "ships", "--image", "x.jpg"], "either a query text or --image"),
        (["search", "{idx}", "ships", "--captions", "c.txt"], "add --image"),
        (["search", "{tmp}/nothing", "ships"], "no index here"),
        (["index", "build", "{tmp}/nothing", "--checkpoint", "{ckpt}", "--out", "{tmp}/o"], "not a folder"),
        (
            [
                "index",
                "build",
                "{archive}",
                "--checkpoint",
                "{ckpt}",
                "--out",
                "{tmp}/o",
                "--engine",
                "spark",
            ],
            "--engine",
        ),
        (
            [
                "index",
                "build",
                "{archive}",
                "--checkpoint",
                "{ckpt}",
                "--out",
                "{tmp}/o",
                "--gpus-per-worker",
                "1",
            ],
            "--engine ray only",
        ),
        (["search", "{idx}", "ships", "--bbox", "10,5,0,6"], "minx <= maxx"),
        (["search", "{idx}", "ships", "--bbox", "1,2,3"], "expected 4 numbers"),
        (["search", "{idx}", "ships", "--bbox", "0,0,200,10"], "longitudes must lie"),
        (["index", "export", "{idx}", "{tmp}/x.csv", "--format", "csv"], "--format"),
        (
            [
                "index",
                "build",
                "{archive}",
                "--checkpoint",
                "{ckpt}",
                "--out",
                "{tmp}/o",
                "--index-kind",
                "lsh",
            ],
            "index kind",
        ),
    ],
)
def test_cli_errors_are_one_line(
    assets: SearchAssets,
    built_index: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    fill = {
        "idx": str(built_index),
        "tmp": str(tmp_path),
        "ckpt": str(assets.ckpt),
        "archive": str(assets.archive),
    }
    assert run([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_serve_binds_to_loopback_by_default() -> None:
    import inspect

    from rsitr.cli.serve import _is_loopback, serve_cmd

    assert inspect.signature(serve_cmd).parameters["host"].default == "127.0.0.1"
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")


def test_serve_command_serves_the_index(
    assets: SearchAssets, built_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rsitr serve`` opens the index and hands uvicorn an app that searches it (uvicorn.run is
    replaced by a recorder, so no port is opened)."""
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    import uvicorn
    from fastapi.testclient import TestClient

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    assert run(["serve", str(built_index), "--port", "8123", "--max-upload-mb", "0.5"]) == 0
    (call,) = calls
    assert call["host"] == "127.0.0.1" and call["port"] == 8123
    caption, image = assets.query
    with TestClient(call["app"]) as client:
        assert client.get("/api/health").json()["images"] == 40
        assert client.get("/api/search", params={"q": caption, "k": 1}).json()["results"][0]["name"] == image
        big = b"\x89PNG\r\n\x1a\n" + bytes(600_000)
        assert (
            client.post("/api/search/image", files={"file": ("b.png", big, "image/png")}).status_code == 413
        )
    call["app"].state.index.close()
