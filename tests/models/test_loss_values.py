"""Loss values against hand-written formulas (plain Python loops over a tiny batch): the dual
InfoNCE and triplet, MSA's L_CMA / L_MMC (with the KL direction), RDB's ITC, EMA term and
weighted total, and the DWA weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsitr.losses.consistency import score_distribution_kl
from rsitr.losses.weighting import LossWeighting
from rsitr.models import create_method

TINY = {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "image_encoder_kwargs": {"width": 4},
        "text_encoder_kwargs": {"dim": 16}, "embed_dim": 4}  # fmt: skip
IDS = [0, 0, 1, 2]  # pairs 0 and 1 share an image: positives of each other


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


IMG = _unit([[1, 0, 0, 0.5], [1, 0.2, 0, 0.5], [0, 1, 0.3, 0], [0.2, 0, 1, 1]])
TXT = _unit([[0.9, 0.1, 0, 0.4], [0.7, 0, 0.4, 0.5], [0, 0.8, 0.5, 0.1], [0.5, 0.3, 0.8, 0.6]])


def _sim() -> list[list[float]]:
    return [[float(IMG[i] @ TXT[j]) for j in range(4)] for i in range(4)]


def _log_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    lse = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - lse for x in xs]


def infonce_by_hand(s: list[list[float]], ids: list[int], scale: float) -> float:
    """½ [mean_i −Σ_j y_ij log softmax_j(s_i·/τ) + mean_j −Σ_i y_ij log softmax_i(s_·j/τ)], y = P/ΣP."""
    n = len(ids)
    i2t = []
    for i in range(n):
        logp = _log_softmax([scale * s[i][j] for j in range(n)])
        pos = [j for j in range(n) if ids[i] == ids[j]]
        i2t.append(-sum(logp[j] for j in pos) / len(pos))
    t2i = []
    for j in range(n):
        logp = _log_softmax([scale * s[i][j] for i in range(n)])
        pos = [i for i in range(n) if ids[i] == ids[j]]
        t2i.append(-sum(logp[i] for i in pos) / len(pos))
    return 0.5 * (sum(i2t) / n + sum(t2i) / n)


def triplet_by_hand(s: list[list[float]], ids: list[int], margin: float, hardest: bool) -> float:
    n, total = len(ids), 0.0
    for b in range(n):
        caps = [max(0.0, margin - s[b][b] + s[b][j]) for j in range(n) if ids[j] != ids[b]]
        imgs = [max(0.0, margin - s[b][b] + s[i][b]) for i in range(n) if ids[i] != ids[b]]
        total += (max(caps, default=0.0) + max(imgs, default=0.0)) if hardest else (sum(caps) + sum(imgs))
    return total / n


@pytest.mark.parametrize("negatives", ["hardest", "all"])
def test_dual_losses_by_value(negatives: str) -> None:
    cfg = {**TINY, "loss": "both", "learn_temperature": False, "temperature": 0.1, "margin": 0.3,
           "negatives": negatives}  # fmt: skip
    m = create_method("dual", cfg, pretrained=False).double()
    out = m.losses(IMG, TXT, {"image_id": torch.tensor(IDS)})
    s = _sim()
    assert float(out["infonce_loss"]) == pytest.approx(
        infonce_by_hand(s, IDS, 10.0), rel=1e-6
    )  # τ in float32
    want = triplet_by_hand(s, IDS, 0.3, negatives == "hardest")
    assert want > 0 and float(out["triplet_loss"]) == pytest.approx(want, rel=1e-9)


def kl_rows_by_hand(student: list[list[float]], teacher: list[list[float]], mu: float) -> float:
    """mean over rows of KL(softmax(teacher_row/μ) ‖ softmax(student_row/μ)) = Σ q (log q − log p)."""
    out = []
    for srow, trow in zip(student, teacher, strict=True):
        logp = _log_softmax([x / mu for x in srow])
        logq = _log_softmax([x / mu for x in trow])
        out.append(sum(math.exp(q) * (q - p) for p, q in zip(logp, logq, strict=True)))
    return sum(out) / len(out)


def test_msa_alignment_losses_by_value() -> None:
    m = create_method("msa", {**TINY, "embed_dim": 8, "num_heads": 2, "alpha": 1.5, "beta": 2.5, "tau": 0.5,
                              "align_scales": [2, 4]}, pretrained=False).double()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    m2, m4 = (torch.rand(4, 4, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    pos = torch.tensor(IDS)[:, None] == torch.tensor(IDS)[None, :]
    out = m.alignment_losses([m2, m4], pos)
    cma = sum(infonce_by_hand(x.tolist(), IDS, 1 / 0.5) for x in (m2, m4))
    assert float(out["mscma_loss"]) == pytest.approx(1.5 * cma, rel=1e-9)
    mu = m.cfg.mu_value
    assert mu == 0.5  # μ = τ for cosine scores
    kl = kl_rows_by_hand(m2.tolist(), m4.tolist(), mu)  # the largest scale teaches the smaller one
    assert float(out["csmmc_loss"]) == pytest.approx(2.5 * kl, rel=1e-9)
    reverse = kl_rows_by_hand(m4.tolist(), m2.tolist(), mu)
    assert abs(reverse - kl) > 1e-3  # the direction matters on these matrices
    # the column variant (the reference code's softmax axis) is the row formula on the transposes
    col = score_distribution_kl(m2, m4, mu, "column")
    assert float(col) == pytest.approx(kl_rows_by_hand(m2.T.tolist(), m4.T.tolist(), mu), rel=1e-9)


def test_rdb_itc_ema_and_total_by_value() -> None:
    from tests.models.test_rdb import _offline_rdb

    torch.manual_seed(0)
    m = _offline_rdb(weighting="fixed", fixed_weights=[1.0, 0.5, 2.0]).double()
    img = F.normalize(torch.randn(4, 512, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(4, 512, dtype=torch.float64), dim=-1)
    t_img = F.normalize(img + 0.1 * torch.randn_like(img), dim=-1)
    t_txt = F.normalize(txt + 0.1 * torch.randn_like(txt), dim=-1)
    batch = {"image_id": torch.tensor(IDS), "scene": torch.tensor([0, 0, 1, 2]), "teacher_img": t_img,
             "teacher_txt": t_txt, "teacher_cls": m.classifier.weight.detach().clone()}  # fmt: skip
    m.set_schedule(10)
    m.step.fill_(100)  # the EMA ramp is 1
    out = m.losses(img, txt, batch)
    scale = float(m.logit_scale().detach())
    s = (img @ txt.T).tolist()
    assert float(out["itc"]) == pytest.approx(infonce_by_hand(s, IDS, scale), rel=1e-9)
    t_logits = (t_img @ t_txt.T * scale).tolist()
    logits = [[scale * x for x in row] for row in s]
    cols = lambda a: [list(c) for c in zip(*a, strict=True)]  # noqa: E731
    parts = [kl_rows_by_hand(logits, t_logits, 1.0), kl_rows_by_hand(cols(logits), cols(t_logits), 1.0)]
    w = F.normalize(batch["teacher_cls"], dim=-1)
    tc = (
        float(m.classifier.temperature.detach())
        if torch.is_tensor(m.classifier.temperature)
        else float(m.classifier.temperature)
    )
    for t_emb, emb in ((t_img, img), (t_txt, txt)):
        parts.append(kl_rows_by_hand(m.classifier(emb).tolist(), (t_emb @ w.T / tc).tolist(), 1.0))
    assert float(out["ema"]) == pytest.approx(sum(parts) / len(parts), rel=1e-7)
    total = 1.0 * float(out["itc"]) + 0.5 * float(out["cls"]) + 2.0 * float(out["ema"])
    assert float(out["dtcl_loss"]) == pytest.approx(total, rel=1e-9)


def test_dwa_weights_by_value() -> None:
    dwa = LossWeighting(["a", "b", "c"], "dwa", temperature=2.0)
    epochs = [(3.0, 1.0, 2.0), (1.5, 1.0, 3.0)]  # mean losses of two epochs
    for losses in epochs:
        for _ in range(2):  # two steps per epoch, equal losses
            dwa({k: torch.tensor(v) for k, v in zip("abc", losses, strict=True)})
        dwa.end_epoch()
    rho = [e1 / e0 for e0, e1 in zip(*epochs, strict=True)]  # L(e−1) / L(e−2)
    z = [math.exp(r / 2.0) for r in rho]
    want = [3 * x / sum(z) for x in z]
    got = dwa.weights({n: torch.ones(()) for n in "abc"})
    assert [float(v) for v in got.values()] == pytest.approx(want, rel=1e-6)
