"""Protocol benchmark: rsitr's vectorised metrics and rerankers vs straightforward loops.

Run: ``python benchmarks/protocol.py [--large] [--dtype float32|float64]``. Prints a table. The loop
versions below are written here, from the definitions, as a per-query Python loop over
``np.argsort`` (the style of the field's reference code); they are never used by the library.

Sizes: RSICD test (1093 × 5465; float32 unless ``--dtype float64``) and, with ``--large``,
10,000 × 50,000 (float32), where the loops are timed on a row subsample and extrapolated
(marked ``~``).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from rsitr.retrieval import Relevance, evaluate_scores, rerank

# --- loop versions (benchmark-only oracles) -------------------------------------------------


def loop_metrics(s: np.ndarray, cpi: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = s.shape[0] if rows is None else rows
    ri = np.zeros(n)
    for i in range(n):
        inds = np.argsort(s[i])[::-1]
        ri[i] = min(np.where(inds == j)[0][0] for j in range(cpi * i, cpi * i + cpi))
    st = s.T
    nt = st.shape[0] if rows is None else rows * cpi
    rt = np.zeros(nt)
    for j in range(nt):
        inds = np.argsort(st[j])[::-1]
        rt[j] = np.where(inds == j // cpi)[0][0]
    return ri, rt


def _loop_reverse(m: np.ndarray, k: int, rows: int) -> list[list[int]]:
    col_orders = np.argsort(-m, axis=0)
    out = []
    for q in range(rows):
        cand = np.argsort(-m[q])[:k]
        back = [np.where(col_orders[:, c] == q)[0][0] for c in cand]
        out.append(list(cand[np.argsort(back)]))
    return out


def loop_reverse_rank(s: np.ndarray, k: int, rows: int | None = None) -> None:
    _loop_reverse(s, k, s.shape[0] if rows is None else rows)
    _loop_reverse(s.T, k, s.shape[1] if rows is None else rows * (s.shape[1] // s.shape[0]))


def _loop_mr(m: np.ndarray, k: int, w1: float, w2: float, rows: int) -> np.ndarray:
    k = max(10, k)
    sort_cols = np.argsort(-m, axis=0)
    out = np.zeros_like(m, dtype=np.float32)
    for q in range(rows):
        cand = np.argsort(-m[q])[:k]
        back = []
        for j, c in enumerate(cand):
            out[q, c] = w1 * m[q, c] / np.sum(m[:, c]) + np.exp(-0.05 * (j + 1))
            back.append(np.where(sort_cols[:, c] == q)[0][0])
        for jj, c in enumerate(cand[np.argsort(back)]):
            out[q, c] += w2 * np.exp(-0.05 * (jj + 1))
    return out


def loop_mr(s: np.ndarray, k: int, rows: int | None = None) -> None:
    _loop_mr(s, k, 0.3, 1.1, s.shape[0] if rows is None else rows)
    _loop_mr(s.T, k, 0.3, 1.1, s.shape[1] if rows is None else rows * (s.shape[1] // s.shape[0]))


def _loop_smr(m: np.ndarray, k: int, g1: float, g2: float, rows: int) -> np.ndarray:
    nq = m.shape[0]
    col_orders = np.argsort(-m, axis=0, kind="stable")
    col_max = m.max(axis=0)
    out = np.zeros((rows, k))
    for q in range(rows):
        cand = np.argsort(-m[q], kind="stable")[:k]
        row_max = m[q].max()
        for j, c in enumerate(cand, start=1):
            r = np.where(col_orders[:, c] == q)[0][0] + 1
            w = (1 - j / k) + g1 * (1 - r / nq) + g2 * (m[q, c] / row_max + m[q, c] / col_max[c])
            out[q, j - 1] = w * m[q, c]
    return out


def loop_smr(s: np.ndarray, k: int, rows: int | None = None) -> None:
    _loop_smr(s, k, 0.9, 1.9, s.shape[0] if rows is None else rows)
    _loop_smr(s.T, k, 0.9, 1.9, s.shape[1] if rows is None else rows * (s.shape[1] // s.shape[0]))


def loop_inverted_softmax(s: np.ndarray, t: float, rows: int | None = None) -> None:
    n = s.shape[0] if rows is None else rows
    z = s / t
    col_lse = np.array([np.log(np.exp(z[:, c]).sum()) for c in range(s.shape[1])])
    i2t, t2i = np.empty_like(z), np.empty_like(z)
    for i in range(n):
        i2t[i] = z[i] - col_lse
        t2i[i] = z[i] - np.log(np.exp(z[i]).sum())


# --- harness -------------------------------------------------------------------------------


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_scores(n: int, cpi: int, dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, n * cpi), dtype=np.float32).astype(dtype, copy=False)
    cols = np.arange(n * cpi)
    s[cols // cpi, cols] += 1.5  # some signal on the ground-truth pairs
    return s


def bench(n: int, cpi: int, dtype: type, loop_rows: int | None) -> list[tuple[str, str, float, float, str]]:
    s = make_scores(n, cpi, dtype)
    rel = Relevance.from_captions_per_image(n, cpi)
    size = f"{n}×{n * cpi}"
    factor = 1.0 if loop_rows is None else n / loop_rows
    est = "" if loop_rows is None else "~"
    rows = []

    def add(name: str, lib: Callable[[], object], loop: Callable[[], object]) -> None:
        t_lib = timed(lib, repeat=3 if loop_rows is None else 1)
        t_loop = timed(loop) * factor
        rows.append((size, name, t_lib, t_loop, est))
        print(f"  {size:>14} {name:<22} rsitr {t_lib:8.3f}s   loop {est}{t_loop:9.2f}s", flush=True)

    add("metrics", lambda: evaluate_scores(s, rel), lambda: loop_metrics(s, cpi, loop_rows))
    add(
        "reverse-rank (k=30)",
        lambda: rerank(s, "reverse-rank", k=30),
        lambda: loop_reverse_rank(s, 30, loop_rows),
    )
    add("mr (K=30)", lambda: rerank(s, "mr", k=30), lambda: loop_mr(s, 30, loop_rows))
    add("smr (k=10)", lambda: rerank(s, "smr", k=10), lambda: loop_smr(s, 10, loop_rows))
    add(
        "inverted-softmax",
        lambda: rerank(s, "inverted-softmax", temperature=0.1),
        lambda: loop_inverted_softmax(s, 0.1, loop_rows),
    )
    return rows


def metrics_peak_memory(n: int, cpi: int) -> float:
    """Peak extra memory (MiB) of evaluate_scores beyond the input matrix, via tracemalloc."""
    s = make_scores(n, cpi, np.float32)
    rel = Relevance.from_captions_per_image(n, cpi)
    tracemalloc.start()
    evaluate_scores(s, rel)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also run 10,000 × 50,000")
    ap.add_argument("--loop-rows", type=int, default=100, help="row subsample for loops at large size")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="RSICD-size scores")
    args = ap.parse_args()
    print(f"timing (best of 3 for rsitr at RSICD size, {args.dtype}) ...")
    rows = bench(1093, 5, np.dtype(args.dtype).type, None)
    if args.large:
        rows += bench(10_000, 5, np.float32, args.loop_rows)
    print()
    print(f"| {'size':<13} | {'operation':<22} | {'rsitr (s)':>9} | {'loop (s)':>10} | {'speed-up':>8} |")
    print(f"|{'-' * 15}|{'-' * 24}|{'-' * 11}|{'-' * 12}|{'-' * 10}|")
    for size, name, t_lib, t_loop, est in rows:
        print(
            f"| {size:<13} | {name:<22} | {t_lib:9.3f} | {est + format(t_loop, '.2f'):>10} | "
            f"{est + format(t_loop / t_lib, '.0f') + '×':>8} |"
        )
    if args.large:
        peak = metrics_peak_memory(10_000, 5)
        print(f"\nmetrics on 10,000 × 50,000 float32 (input 1.86 GiB): peak extra memory {peak:.1f} MiB")
    print("(~ = loop timed on a row subsample and extrapolated; both directions are included)")


if __name__ == "__main__":
    main()
