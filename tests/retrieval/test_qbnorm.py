"""QB-Norm with a query bank: non-transductive, dynamic inverted softmax by hand, CLI wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rsitr.cli import app
from rsitr.errors import ConfigError
from rsitr.retrieval import rerank
from rsitr.retrieval.rerank import QueryBank, dynamic_inverted_softmax, get_reranker


def _case(seed: int = 0, n: int = 6, cpi: int = 2, bank: int = 9):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, n * cpi))
    qb = QueryBank(text=rng.normal(size=(bank, n)), image=rng.normal(size=(bank, n * cpi)))
    return s, qb


def test_qbnorm_is_labelled_non_transductive():
    assert get_reranker("qb-norm").transductive is False
    assert get_reranker("inverted-softmax").transductive is True


def test_a_querys_scores_do_not_depend_on_the_other_test_queries():
    s, qb = _case()
    full = rerank(s, "qb-norm", bank=qb, beta=5.0)
    # t2i: caption j alone (one column, same gallery) gives the same column
    for j in (0, 3, 11):
        alone = rerank(s[:, [j]], "qb-norm", bank=QueryBank(qb.text, qb.image[:, [j]]), beta=5.0)
        np.testing.assert_array_equal(alone.t2i[:, 0], full.t2i[:, j])
    # i2t: image i alone (one row) over the same captions gives the same row
    for i in (0, 4):
        alone = rerank(s[[i]], "qb-norm", bank=QueryBank(qb.text[:, [i]], qb.image), beta=5.0)
        np.testing.assert_array_equal(alone.i2t[0], full.i2t[i])
    # the transductive inverted softmax does change when the other queries change
    a = rerank(s, "inverted-softmax").t2i[:, 0]
    b = rerank(s[:, [0]], "inverted-softmax").t2i[:, 0]
    assert not np.allclose(a, b)


def test_dynamic_inverted_softmax_matches_the_formula_by_hand():
    q = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    bank = np.array([[0.7, 0.1, 0.2], [0.6, 0.3, 0.1]])  # both bank queries pick gallery item 0
    beta = 2.0
    out = dynamic_inverted_softmax(q, bank, beta, k=1)
    lse = np.log(np.exp(beta * bank).sum(0))
    np.testing.assert_allclose(out[0], beta * q[0] - lse)  # top-1 is item 0: activated
    np.testing.assert_array_equal(out[1], q[1])  # top-1 is item 2: not a hub, raw scores


def test_qbnorm_demotes_a_hub():
    # gallery image 0 is a hub: every bank caption likes it; the query's true image is 1
    s = np.array([[0.80], [0.78], [0.1]])  # (images, one caption)
    bank_text = np.array([[0.9, 0.2, 0.1], [0.85, 0.1, 0.2], [0.8, 0.3, 0.0]])
    out = rerank(s, "qb-norm", bank=QueryBank(bank_text, None), beta=10.0)
    assert np.argmax(s[:, 0]) == 0 and np.argmax(out.t2i[:, 0]) == 1
    np.testing.assert_array_equal(out.i2t, s)  # no image bank: i2t is left as it is


def test_qbnorm_needs_a_bank_of_the_right_shape():
    s, qb = _case()
    with pytest.raises(ConfigError, match="query bank"):
        rerank(s, "qb-norm")
    with pytest.raises(ConfigError, match="shape"):
        rerank(s, "qb-norm", bank=QueryBank(qb.text[:, :3], qb.image))
    with pytest.raises(ConfigError, match="beta"):
        rerank(s, "qb-norm", bank=qb, beta=0.0)


def test_evaluate_scores_cli_with_a_bank_npz(tmp_path):
    rng = np.random.default_rng(1)

    def emb(n_img: int, cpi: int) -> dict:
        img = rng.normal(size=(n_img, 8))
        txt = np.repeat(img, cpi, axis=0) + rng.normal(scale=1.5, size=(n_img * cpi, 8))
        norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        return {"image_embeddings": norm(img), "text_embeddings": norm(txt),
                "caption_to_image": np.repeat(np.arange(n_img), cpi)}  # fmt: skip

    val, train = emb(10, 2), emb(30, 2)
    np.savez(tmp_path / "val.npz", **val)
    np.savez(tmp_path / "train.npz", **train)
    res = CliRunner().invoke(
        app,
        ["evaluate-scores", str(tmp_path / "val.npz"), "--rerank", "qb-norm", "--beta", "3",
         "--bank", str(tmp_path / "train.npz"), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["rerank"] == "qb-norm" and got["transductive"] is False
    s = val["image_embeddings"] @ val["text_embeddings"].T
    bank = QueryBank(train["text_embeddings"] @ val["image_embeddings"].T,
                     train["image_embeddings"] @ val["text_embeddings"].T)  # fmt: skip
    from rsitr.retrieval import Relevance, evaluate_scores

    out = rerank(s, "qb-norm", bank=bank, beta=3.0)
    want = evaluate_scores(out.i2t, Relevance(val["caption_to_image"], 10), t2i_scores=out.t2i)
    assert got["mR"] == pytest.approx(want.mR)
    bad = CliRunner().invoke(
        app, ["evaluate-scores", str(tmp_path / "val.npz"), "--bank", str(tmp_path / "train.npz")]
    )
    assert bad.exit_code != 0 and "qb-norm" in str(bad.exception)


def test_tune_rerank_searches_qbnorm_beta_against_the_bank(tmp_path):
    """tune-rerank --rerank qb-norm: β and k chosen on val against the bank, labelled
    non-transductive, and the saved YAML reproduces its val mR through evaluate-scores."""
    import yaml

    from rsitr.retrieval import Relevance, evaluate_scores

    rng = np.random.default_rng(3)
    hub = rng.normal(size=8)

    def emb(n_img: int, cpi: int) -> dict:
        img = rng.normal(size=(n_img, 8)) + 1.5 * hub  # a shared direction makes hubs
        txt = np.repeat(img, cpi, axis=0) + rng.normal(scale=1.2, size=(n_img * cpi, 8))
        norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        return {"image_embeddings": norm(img), "text_embeddings": norm(txt),
                "caption_to_image": np.repeat(np.arange(n_img), cpi)}  # fmt: skip

    val, train = emb(40, 2), emb(120, 2)
    np.savez(tmp_path / "val.npz", **val)
    np.savez(tmp_path / "train.npz", **train)
    out = tmp_path / "qb.yaml"
    argv = ["tune-rerank", str(tmp_path / "val.npz"), "--rerank", "qb-norm", "--bank",
            str(tmp_path / "train.npz"), "--out", str(out), "--json"]  # fmt: skip
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load(out.read_text())
    assert saved["rerank"] == "qb-norm" and saved["transductive"] is False
    assert saved["grid"]["k"] == [1, 5] and saved["params"]["beta"] in saved["grid"]["beta"]
    # the best grid point, recomputed by hand, and never below the un-reranked val mR
    s = val["image_embeddings"] @ val["text_embeddings"].T
    bank = QueryBank(train["text_embeddings"] @ val["image_embeddings"].T,
                     train["image_embeddings"] @ val["text_embeddings"].T)  # fmt: skip
    rel = Relevance(val["caption_to_image"], 40)

    def mr(beta: float, k: int) -> float:
        o = rerank(s, "qb-norm", bank=bank, beta=beta, k=k)
        return evaluate_scores(o.i2t, rel, t2i_scores=o.t2i).mR

    by_hand = max(mr(b, k) for b in saved["grid"]["beta"] for k in (1, 5))
    assert saved["val_mR"] == pytest.approx(by_hand) and saved["val_mR"] >= saved["baseline_mR"]
    again = CliRunner().invoke(
        app, ["evaluate-scores", str(tmp_path / "val.npz"), "--rerank-config", str(out), "--bank",
              str(tmp_path / "train.npz"), "--json"],
    )  # fmt: skip
    assert again.exit_code == 0 and json.loads(again.output)["mR"] == pytest.approx(saved["val_mR"])
    nobank = CliRunner().invoke(app, argv[:4] + ["--out", str(out)])
    assert nobank.exit_code != 0 and "--bank" in str(nobank.exception)
