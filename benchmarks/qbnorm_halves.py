"""Does QB-Norm's β, tuned on the validation split, carry over to unseen queries?

Run: ``python benchmarks/qbnorm_halves.py VAL.npz TRAIN.npz [--block 10]`` with two ``rsitr embed``
archives of one checkpoint: the validation split and the training split (the query bank).
The val images are sorted by file name and cut into alternate blocks of ``--block`` names
(neighbouring tiles stay together), giving halves A and B. β (2.5–40) and the activation top-k
(1, 5) are chosen on one half with :func:`rsitr.retrieval.tune.tune_rerank`, then read on the
other, against no reranking and against the default β = 20, k = 1. Prints one table row per
direction of the swap. Each half is a smaller gallery, so its mR is higher than the whole val's;
compare the columns of one row, not rows with the val table.
"""

from __future__ import annotations

import argparse

import numpy as np

from rsitr.retrieval import evaluate_scores
from rsitr.retrieval.relevance import Relevance
from rsitr.retrieval.rerank import QueryBank, rerank
from rsitr.retrieval.tune import tune_rerank


def half(val: np.lib.npyio.NpzFile, which: np.ndarray) -> tuple[np.ndarray, np.ndarray, Relevance]:
    """Image and caption embeddings of the val images in ``which`` (and their captions), with
    their ground truth."""
    c2i = val["caption_to_image"]
    keep_caps = np.flatnonzero(np.isin(c2i, which))
    remap = np.full(len(val["image_embeddings"]), -1)
    remap[which] = np.arange(len(which))
    img = val["image_embeddings"][which].astype(np.float64)
    txt = val["text_embeddings"][keep_caps].astype(np.float64)
    return img, txt, Relevance(remap[c2i[keep_caps]], len(which))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("val")
    ap.add_argument("train")
    ap.add_argument("--block", type=int, default=10)
    args = ap.parse_args()
    val, train = np.load(args.val), np.load(args.train)
    bank_img = train["image_embeddings"].astype(np.float64)
    bank_txt = train["text_embeddings"].astype(np.float64)
    order = np.argsort(val["image_names"], kind="stable")
    side = np.empty(len(order), dtype=int)
    side[order] = (np.arange(len(order)) // args.block) % 2
    halves = []
    for h in (0, 1):
        img, txt, rel = half(val, np.flatnonzero(side == h))
        halves.append((img @ txt.T, rel, QueryBank(text=bank_txt @ img.T, image=bank_img @ txt.T)))

    def mr(h: int, beta: float | None, k: int = 1) -> float:
        s, rel, bank = halves[h]
        if beta is None:
            return evaluate_scores(s, rel).mR
        o = rerank(s, "qb-norm", bank=bank, beta=beta, k=k)
        return evaluate_scores(o.i2t, rel, t2i_scores=o.t2i).mR

    print("| tuned on | chosen β, k | mR there (none → tuned) | read on | none | β = 20, k = 1 | chosen |")
    print("|---|---|---|---|---|---|---|")
    for h in (0, 1):
        s, rel, bank = halves[h]
        res = tune_rerank(s, rel, "qb-norm", ks=(1, 5), bank=bank)
        beta, k = res.params["beta"], res.params["k"]
        o = 1 - h
        print(
            f"| half {'AB'[h]} | {beta:g}, {k} | {res.baseline_mR:.2f} → {res.val_mR:.2f} | half {'AB'[o]} "
            f"| {mr(o, None):.2f} | {mr(o, 20.0):.2f} | {mr(o, beta, k):.2f} |"
        )


if __name__ == "__main__":
    main()
