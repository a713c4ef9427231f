"""``rsitr train``, ``rsitr evaluate`` and ``rsitr embed``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from rsitr.cli._app import TTA_HELP, app
from rsitr.cli.report import console, print_metrics_table
from rsitr.errors import ConfigError


def setup_logging(verbose: bool = False) -> None:
    """Rich log handler on stderr (INFO, or DEBUG with ``verbose``)."""
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "PIL", "timm", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=3e-4.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out_dir>/last.")] = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke",
            help="Check the config before renting a GPU: its model with random weights, 2 steps and "
            "one evaluation on a tiny synthetic corpus; prints parameters, step time, peak memory.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --smoke: the report as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a method from a typed YAML config; selects the best epoch on the validation split."""
    from rsitr.training import Trainer, load_config

    setup_logging(verbose)
    cfg = load_config(config, overrides or [])
    if smoke:
        _smoke(cfg, str(config), as_json)
        return
    summary = Trainer(cfg, resume=resume).fit()
    if summary.get("best_val"):
        console.print(f"[bold]best epoch {summary['best_epoch']}[/bold] (validation split, ties {cfg.ties})")
        from rsitr.retrieval.metrics import RetrievalMetrics

        v = summary["best_val"]
        print_metrics_table(
            RetrievalMetrics(v["i2t"], v["t2i"], v["mR"], v["ties"]), title=f"{cfg.method}: validation"
        )
    console.print(
        f"features {summary['feature_seconds']} s, training {summary['train_seconds']} s; "
        f"checkpoint {summary['checkpoint']}"
    )


def _smoke(cfg: Any, name: str, as_json: bool) -> None:
    from rich.table import Table

    from rsitr.training.smoke import run_smoke

    report = run_smoke(cfg, name)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"smoke: {name} ({report['method']}, {report['device']})")
    table.add_column("check")
    table.add_column("value", justify="right")
    rows = [
        ("parameters used at inference", f"{report['params_inference']:,}"),
        ("parameters trained", f"{report['params_trained']:,}"),
        ("parameters in all", f"{report['params_total']:,}"),
        (f"seconds per optimiser step ({report['steps']} steps)", f"{report['step_seconds']:.3f}"),
        ("peak memory (MiB)", f"{report['peak_memory_mb']:,.0f}"),
        ("evaluation mR (random weights)", f"{report['val_mR']:.2f}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in report["substitutes"]:
        console.print(f"substitute: {note}")


def _load(checkpoint: Path, device: str) -> Any:
    from rsitr.models.checkpoint import load_method
    from rsitr.training.trainer import resolve_device

    return load_method(checkpoint, device=resolve_device(device))


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder or model.safetensors.")],
    data: Annotated[str, typer.Option("--data", help="Caption source (any supported format).")],
    images: Annotated[Path | None, typer.Option("--images", help="Image root.")] = None,
    split: Annotated[str, typer.Option("--split")] = "test",
    fmt: Annotated[str | None, typer.Option("--format")] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="labels.csv for the per-scene table.")
    ] = None,
    rerank: Annotated[
        str,
        typer.Option(
            "--rerank",
            help="auto|none|reverse-rank|mr|smr|inverted-softmax|qb-norm; auto: the method's "
            "default (smr for cmpagl, none otherwise); qb-norm is non-transductive (query bank)",
        ),
    ] = "auto",
    query_bank: Annotated[
        str,
        typer.Option("--query-bank", help="Split of --data whose captions/images form qb-norm's bank."),
    ] = "train",
    tta: Annotated[str, typer.Option("--tta", help=TTA_HELP)] = "none",
    rerank_config: Annotated[
        Path | None, typer.Option("--rerank-config", help="YAML from tune-rerank.")
    ] = None,
    ties: Annotated[str, typer.Option("--ties")] = "pessimistic",
    itm_rescore: Annotated[
        int,
        typer.Option(
            "--itm-rescore",
            help="K > 0: re-score each query's top-K candidates with the ITM head (cmpagl; "
            "ALBEF-style, replaces --rerank, slower: 2·K·(images + captions) fusion passes)",
        ),
    ] = 0,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write metrics.json, scenes.csv, gallery.png here.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: Annotated[str, typer.Option("--device")] = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Evaluate a checkpoint on a split with the RSITR protocol."""
    from rsitr.cli.progress import progress_reporter
    from rsitr.cli.protocol import load_rerank_config
    from rsitr.data import load_corpus
    from rsitr.retrieval.embed import evaluate_corpus, parse_views
    from rsitr.retrieval.metrics import check_ties
    from rsitr.retrieval.rerank import get_reranker

    setup_logging()
    check_ties(ties)
    params: dict[str, Any] = {}
    if rerank_config is not None:
        rerank, params = load_rerank_config(rerank_config)
    if rerank not in ("none", "auto"):
        get_reranker(rerank)
    if itm_rescore < 0:
        raise ConfigError(f"--itm-rescore: expected K >= 0, got {itm_rescore}")
    if itm_rescore and rerank not in ("none", "auto"):
        raise ConfigError(f"--itm-rescore replaces the reranker; drop --rerank {rerank}")
    import time

    t0 = time.perf_counter()
    method = _load(checkpoint, device)
    if rerank == "auto":  # e.g. CMPAGL evaluates with its SMR by default
        rerank = getattr(method, "default_rerank", "none")
    views = parse_views(tta)
    corpus = load_corpus(data, split=split, fmt=fmt, images=images, labels=labels)
    bank_corpus = None
    if rerank not in ("none", "auto") and get_reranker(rerank).needs_bank:
        if query_bank == split:
            raise ConfigError(f"--query-bank {query_bank}: the bank must not be the evaluated split")
        bank_corpus = load_corpus(data, split=query_bank, fmt=fmt, images=images, labels=labels)
    dev = next(method.parameters()).device
    with progress_reporter("images", disable=as_json) as progress:
        metrics, clean, img, txt = evaluate_corpus(
            method, corpus, ties=ties, rerank=rerank, rerank_params=params, itm_rescore=itm_rescore,
            batch_size=batch_size, device=dev, views=views, bank_corpus=bank_corpus, progress=progress,
        )  # type: ignore[arg-type]  # fmt: skip
    if len(views) > 1:
        metrics.extra["tta_views"] = list(views)
    if bank_corpus is not None:
        metrics.extra["query_bank"] = f"{query_bank} ({bank_corpus.num_images} images)"
    # seconds: the whole command (model and data loading included)
    metrics.extra.update(
        seconds=round(time.perf_counter() - t0, 2), checkpoint=str(checkpoint), data=str(data)
    )
    if report is not None:
        from rsitr.retrieval.report import write_report

        write_report(report, metrics, clean, img, txt, method=method, device=dev)
        metrics.extra["report"] = str(report)
    if as_json:
        typer.echo(json.dumps(metrics.to_dict()))
        return
    print_metrics_table(metrics, title=f"{checkpoint} on {data} [{split}]: {clean.num_images} images")


@app.command("embed")
def embed_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder or model.safetensors.")],
    data: Annotated[str, typer.Option("--data", help="Caption source or image folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output .npz (image_embeddings, text_embeddings, names).")
    ],
    images: Annotated[Path | None, typer.Option("--images")] = None,
    split: Annotated[str | None, typer.Option("--split")] = None,
    fmt: Annotated[str | None, typer.Option("--format")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: Annotated[str, typer.Option("--device")] = "auto",
    tta: Annotated[str, typer.Option("--tta", help=TTA_HELP)] = "none",
) -> None:
    """Export L2-normalised image and caption embeddings of a corpus (npz, no pickle)."""
    from rsitr.cli.progress import progress_reporter
    from rsitr.data import load_corpus
    from rsitr.retrieval.embed import embed_corpus, parse_views, save_embeddings

    setup_logging()
    if out.suffix != ".npz":
        raise ConfigError(f"--out: expected a .npz file name, got {out}")
    method = _load(checkpoint, device)
    corpus, _ = load_corpus(data, split=split, fmt=fmt, images=images).drop_blank_captions("eval")
    views = parse_views(tta)
    with progress_reporter("images") as progress:
        img, txt = embed_corpus(
            method,
            corpus,
            batch_size=batch_size,
            device=next(method.parameters()).device,
            views=views,
            progress=progress,
        )
    save_embeddings(out, img, txt, corpus)
    dim = img.shape[1] if img.numel() else 0
    console.print(f"wrote {out}: {img.shape[0]} images, {txt.shape[0]} captions, dim {dim}")


@app.command("runs")
def runs_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Training output folders (each with summary.json).")],
    seeds: Annotated[
        bool, typer.Option("--seeds", help="Group runs that differ only in seed: mean ± std per figure.")
    ] = False,
) -> None:
    """Print a Markdown table of finished runs: best val recalls, mR, epoch, parameters, time
    (with ``--seeds``: one row per recipe, mean ± std over its seeds, and the val extras)."""
    from rsitr.training.runs import RECALLS, group_by_seed, load_run

    runs = []
    for d in run_dirs:
        r = load_run(d)
        if r is None:
            typer.echo(f"| {d} | (no summary.json: not finished) |")
        elif not r.summary.get("best_val"):
            typer.echo(f"| {d} | (no validation) |")
        else:
            runs.append(r)
    if seeds:
        groups = group_by_seed(runs)
        extras = sorted({k for g in groups for k in g.mean if k.startswith("mR ")})
        cols = [f"{d} {r}" for d, r in RECALLS] + ["mR", *extras, "train_seconds"]
        typer.echo("| runs | seeds | " + " | ".join(c.replace("_seconds", " s") for c in cols) + " |")
        typer.echo("|" + "---|" * (len(cols) + 2))
        for g in groups:
            cells = [f"{g.mean[c]:.2f} ± {g.std[c]:.2f}" if c in g.mean else "-" for c in cols[:-1]] + [
                f"{g.mean.get('train_seconds', float('nan')):.0f}"
            ]
            names = ", ".join(str(r.path) for r in g.runs)
            typer.echo(f"| {names} | {','.join(str(s) for s in g.seeds)} | " + " | ".join(cells) + " |")
        return
    head = (
        "| run | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | mR | best epoch | trainable params | train s |"
    )
    typer.echo(head)
    typer.echo("|" + "---|" * (head.count("|") - 1))
    for r in runs:
        s = r.summary
        rec = [r.figures[f"{d} {k}"] for d, k in RECALLS] + [r.figures["mR"]]
        cells = [f"{x:.2f}" for x in rec] + [
            f"{s['best_epoch']}/{s['epochs']}",
            str(s.get("trainable_params", "?")),
            str(s["train_seconds"]),
        ]
        typer.echo(f"| {r.path} | " + " | ".join(cells) + " |")
