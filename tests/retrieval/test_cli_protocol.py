"""The ``rsitr evaluate-scores`` / ``tune-rerank`` contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rsitr.cli import run

KEYS = {"R@1", "R@5", "R@10", "medr", "meanr"}


@pytest.fixture
def scores_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n, cpi = 40, 5
    s = rng.normal(size=(n, n * cpi)) + 1.2 * np.repeat(np.eye(n), cpi, axis=1)
    path = tmp_path / "scores.npy"
    np.save(path, s)
    return path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    return json.loads(out)


def test_json_schema(scores_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _json(capsys, ["evaluate-scores", str(scores_file), "--json"])
    assert set(d) == {"i2t", "t2i", "mR", "ties", "rerank"}
    assert set(d["i2t"]) == KEYS and set(d["t2i"]) == KEYS
    assert d["ties"] == "pessimistic" and d["rerank"] == "none"
    assert all(isinstance(v, float) for v in d["i2t"].values())
    recalls = [d[x][k] for x in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")]
    assert d["mR"] == pytest.approx(sum(recalls) / 6)


@pytest.mark.parametrize(
    ("rerank", "extra", "params"),
    [
        ("reverse-rank", ["--k", "7"], {"k": 7}),
        ("mr", ["--k", "20", "--wp1", "0.3", "--wp2", "1.1"], {"k": 20, "wp1": 0.3, "wp2": 1.1}),
        ("smr", ["--k", "6", "--gamma1", "0.7", "--gamma2", "1.5"], {"k": 6, "gamma1": 0.7, "gamma2": 1.5}),
        ("inverted-softmax", ["--temperature", "0.05"], {"temperature": 0.05}),
    ],
)
def test_rerank_reports(
    scores_file: Path, capsys: pytest.CaptureFixture[str], rerank: str, extra: list[str], params: dict
) -> None:
    """The CLI gives exactly the library's metrics of the reranked matrix, with these parameters."""
    from rsitr.retrieval.metrics import evaluate_scores
    from rsitr.retrieval.relevance import Relevance
    from rsitr.retrieval.rerank import rerank as apply_rerank

    d = _json(
        capsys,
        ["evaluate-scores", str(scores_file), "--rerank", rerank, *extra, "--json", "--ties", "optimistic"],
    )
    assert d["rerank"] == rerank and d["ties"] == "optimistic" and d["transductive"] is True
    s = np.load(scores_file)
    r = apply_rerank(s, rerank, **params)
    rel = Relevance.from_captions_per_image(s.shape[0], 5)
    want = evaluate_scores(r.i2t, rel, "optimistic", t2i_scores=r.t2i)
    assert d["mR"] == pytest.approx(want.mR, abs=1e-9)
    for direction in ("i2t", "t2i"):
        for k, v in getattr(want, direction).items():
            assert d[direction][k] == pytest.approx(v, abs=1e-9), (direction, k)
    plain = evaluate_scores(s, rel, "optimistic")
    assert d["mR"] != pytest.approx(plain.mR)  # the reranker changed the ranking


def test_readable_table(scores_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["evaluate-scores", str(scores_file)]) == 0
    out = capsys.readouterr().out
    assert "i2t" in out and "t2i" in out and "pessimistic" in out


def _bad(tmp_path: Path, arr: object, name: str = "bad.npy") -> Path:
    p = tmp_path / name
    np.save(p, arr)
    return p


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda t: _bad(t, np.zeros(10)), [], "2-D"),
        (lambda t: _bad(t, np.full((2, 10), np.nan)), [], "non-finite"),
        (lambda t: _bad(t, np.array([[1.0, np.inf] * 5] * 2)), [], "non-finite"),
        (lambda t: _bad(t, np.zeros((2, 9))), [], "not divisible"),
        (lambda t: _bad(t, np.zeros((3, 10))), [], "3 rows"),
        (lambda t: _bad(t, np.zeros((2, 10))), ["--rerank", "smr", "--k", "3"], "k=3"),
        (lambda t: t / "missing.npy", [], "no such file"),
        (lambda t: (t / "junk.npy").write_text("not numpy") and t / "junk.npy", [], "cannot read"),
        (lambda t: _bad(t, np.zeros((2, 10))), ["--rerank", "bogus"], "unknown reranker"),
        (lambda t: _bad(t, np.zeros((2, 10))), ["--ties", "random"], "ties"),
        (lambda t: _bad(t, np.zeros((2, 10))), ["--gamma1", "1"], "needs a --rerank"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, extra, message
) -> None:
    path = make(tmp_path)
    assert run(["evaluate-scores", str(path), *extra, "--json"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_tune_rerank_saves_best_and_evaluate_reads_it(
    scores_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smr.yaml"
    assert (
        run(
            [
                "tune-rerank",
                str(scores_file),
                "--rerank",
                "smr",
                "--k-list",
                "10,15",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    saved = yaml.safe_load(out.read_text())
    assert saved["params"] == report["params"] and saved["rerank"] == "smr"
    assert saved["params"]["k"] in (10, 15) and 0.5 <= saved["params"]["gamma1"] <= 2.0
    assert saved["val_mR"] >= max(t["mR"] for t in saved["top"]) - 1e-9
    d = _json(capsys, ["evaluate-scores", str(scores_file), "--rerank-config", str(out), "--json"])
    assert d["rerank"] == "smr" and d["mR"] == pytest.approx(saved["val_mR"])


def test_embed_archive_scores_use_its_caption_to_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An `rsitr embed` archive with uneven captions per image: caption j belongs to image c2i[j].
    rng = np.random.default_rng(1)
    img = rng.normal(size=(6, 8)).astype(np.float32)
    c2i = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    txt = img[c2i] + 0.1 * rng.normal(size=(10, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)  # `rsitr embed` writes unit vectors
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    path = tmp_path / "val.npz"
    np.savez(path, image_embeddings=img, text_embeddings=txt, caption_to_image=c2i)
    d = _json(capsys, ["evaluate-scores", str(path), "--json"])
    assert d["i2t"]["R@1"] == 100.0 and d["t2i"]["R@1"] == 100.0
    out = tmp_path / "smr.yaml"
    assert run(["tune-rerank", str(path), "--k-list", "3", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["baseline_mR"] == pytest.approx(d["mR"])
    np.savez(tmp_path / "bad.npz", image_embeddings=img, text_embeddings=txt)
    assert run(["evaluate-scores", str(tmp_path / "bad.npz")]) == 2
    assert "no 'caption_to_image' array" in capsys.readouterr().err


def test_several_matrices_are_evaluated_as_their_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A score-level ensemble (e.g. seeds): the metrics of (S_1 + S_2) / 2, not of either alone."""
    from rsitr.retrieval.metrics import evaluate_scores
    from rsitr.retrieval.relevance import Relevance

    rng = np.random.default_rng(1)
    n, cpi = 30, 5
    truth = np.repeat(np.eye(n), cpi, axis=1)
    noise = rng.normal(size=(n, n * cpi))
    # Each member is wrong where the other is right, so only their mean ranks well.
    s1, s2 = truth + noise, truth - noise
    np.save(a := tmp_path / "a.npy", s1)
    np.save(b := tmp_path / "b.npy", s2)
    d = _json(capsys, ["evaluate-scores", str(a), str(b), "--json"])
    rel = Relevance(np.repeat(np.arange(n), cpi), n)
    expected = evaluate_scores((s1 + s2) / 2, rel)
    assert d["mR"] == pytest.approx(expected.mR) == pytest.approx(100.0)
    assert d["mR"] > _json(capsys, ["evaluate-scores", str(a), "--json"])["mR"]
    assert d["ensemble"] == [str(a), str(b)]


def test_ensemble_of_different_corpora_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(a := tmp_path / "a.npy", np.zeros((4, 20)))
    np.save(b := tmp_path / "b.npy", np.zeros((3, 15)))
    assert run(["evaluate-scores", str(a), str(b), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.npy" in err[0] and "cannot ensemble" in err[0]
