"""Readable tables for metrics reports (CLI only)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rsitr.retrieval.metrics import RetrievalMetrics

console = Console(stderr=False)


def print_metrics_table(metrics: RetrievalMetrics, title: str = "") -> None:
    """Print i2t/t2i R@1/5/10, medr, meanr and mR, naming the tie policy and reranker."""
    table = Table(title=title or None)
    table.add_column("direction")
    for key in ("R@1", "R@5", "R@10", "medr", "meanr"):
        table.add_column(key, justify="right")
    for name in ("i2t", "t2i"):
        d = getattr(metrics, name)
        table.add_row(
            name, *(f"{d[k]:.2f}" for k in ("R@1", "R@5", "R@10")), f"{d['medr']:.0f}", f"{d['meanr']:.2f}"
        )
    console.print(table)
    note = f"mR {metrics.mR:.2f}  (ties: {metrics.ties}; rerank: {metrics.rerank}"
    if metrics.rerank != "none" and metrics.extra.get("transductive", True):
        note += ", transductive: uses the whole query set"
    elif metrics.rerank != "none":
        note += ", non-transductive: each query scored alone against a fixed query bank"
    console.print(note + ")")
