"""``rsitr evaluate-scores`` and ``rsitr tune-rerank``: the protocol on a saved score matrix."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from rsitr.cli._app import app
from rsitr.cli.report import console, print_metrics_table
from rsitr.errors import ConfigError, DataError
from rsitr.retrieval import evaluate_scores, make_params, rerank
from rsitr.retrieval.rerank import QueryBank, get_reranker
from rsitr.retrieval.scores import ensemble_scores, load_embeddings, scores_and_relevance

RERANK_CHOICES = "none|reverse-rank|mr|smr|inverted-softmax|qb-norm"


def query_bank_from_npz(scores_path: Path, bank_path: Path) -> QueryBank:
    """QB-Norm's bank: the `rsitr embed` archive ``bank_path`` (training split) scored against
    the gallery of the `rsitr embed` archive ``scores_path`` (its images and captions)."""
    if scores_path.suffix != ".npz":
        raise ConfigError("--bank needs embeddings (an `rsitr embed` .npz), not a score matrix")
    gallery, bank = load_embeddings(scores_path), load_embeddings(bank_path)
    if gallery[0].shape[1] != bank[0].shape[1]:
        raise DataError(
            f"embedding size {bank[0].shape[1]} differs from {scores_path}'s {gallery[0].shape[1]}",
            path=bank_path,
        )
    return QueryBank(text=bank[1] @ gallery[0].T, image=bank[0] @ gallery[1].T)


def load_rerank_config(path: Path) -> tuple[str, dict[str, Any]]:
    """Read a ``tune-rerank`` YAML: returns the reranker name and its parameters."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read rerank config ({e})", path=path) from None
    if not isinstance(data, dict) or "rerank" not in data or "params" not in data:
        raise DataError("expected keys 'rerank' and 'params'", path=path)
    return str(data["rerank"]), dict(data["params"])


@app.command("evaluate-scores")
def evaluate_scores_cmd(
    scores_paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="SCORES.npy|EMB.npz...",
            help="(n_images, n_captions) score matrix, or embeddings from `rsitr embed`; several "
            "of the same corpus are averaged (a score-level ensemble, e.g. of seeds).",
        ),
    ],
    captions_per_image: Annotated[
        int, typer.Option("--captions-per-image", help="Captions of image i are columns cpi·i…cpi·i+cpi−1.")
    ] = 5,
    ties: Annotated[str, typer.Option(help="Tie policy: pessimistic|optimistic.")] = "pessimistic",
    rerank_name: Annotated[str, typer.Option("--rerank", help=f"Reranker: {RERANK_CHOICES}.")] = "none",
    k: Annotated[int | None, typer.Option("--k", help="Top-k candidates (reverse-rank, mr, smr).")] = None,
    gamma1: Annotated[float | None, typer.Option("--gamma1", help="SMR γ1.")] = None,
    gamma2: Annotated[float | None, typer.Option("--gamma2", help="SMR γ2.")] = None,
    wp1: Annotated[float | None, typer.Option("--wp1", help="MR Wp1.")] = None,
    wp2: Annotated[float | None, typer.Option("--wp2", help="MR Wp2.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Inverted-softmax τ.")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="QB-Norm β.")] = None,
    bank: Annotated[
        Path | None,
        typer.Option("--bank", help="qb-norm's query bank: `rsitr embed` .npz of the training split."),
    ] = None,
    rerank_config: Annotated[
        Path | None, typer.Option("--rerank-config", help="YAML written by tune-rerank.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate a saved score matrix with the RSITR protocol, optionally after reranking."""
    t0 = time.perf_counter()
    given = {"k": k, "gamma1": gamma1, "gamma2": gamma2, "wp1": wp1, "wp2": wp2, "temperature": temperature,
             "beta": beta}  # fmt: skip
    if rerank_config is not None:
        name, params = load_rerank_config(rerank_config)
        if rerank_name not in ("none", name):
            raise ConfigError(f"--rerank {rerank_name} contradicts {rerank_config} ({name})")
        rerank_name = name
        given = {**params, **{a: v for a, v in given.items() if v is not None}}
    if rerank_name == "none":
        extra = sorted(a for a, v in given.items() if v is not None)
        if extra:
            raise ConfigError(f"--{extra[0]} needs a --rerank method")
        params = None
    else:
        get_reranker(rerank_name)
        params = make_params(rerank_name, **given)
    scores_path = scores_paths[0]
    if bank is not None:
        if rerank_name == "none" or not get_reranker(rerank_name).needs_bank:
            raise ConfigError("--bank is the query bank of --rerank qb-norm")
        if len(scores_paths) > 1:
            raise ConfigError("--bank takes one embeddings file, not an ensemble")
    if len(scores_paths) > 1:
        scores, rel = ensemble_scores(scores_paths, captions_per_image)
    else:
        scores, rel = scores_and_relevance(scores_path, captions_per_image)
    qbank = query_bank_from_npz(scores_path, bank) if bank is not None else None
    out = rerank(scores, rerank_name, params, bank=qbank)
    metrics = evaluate_scores(out.i2t, rel, ties, t2i_scores=out.t2i, rerank=rerank_name)  # type: ignore[arg-type]
    if params is not None:
        metrics.extra["rerank_params"] = asdict(params)
        metrics.extra["transductive"] = get_reranker(rerank_name).transductive
    if len(scores_paths) > 1:
        metrics.extra["ensemble"] = [str(p) for p in scores_paths]
    if as_json:
        typer.echo(json.dumps(metrics.to_dict()))
        return
    names = " + ".join(p.name for p in scores_paths)
    title = f"{names}: {rel.num_images} images × {rel.num_captions} captions"
    print_metrics_table(metrics, title=title)
    console.print(f"[dim]{time.perf_counter() - t0:.2f} s[/dim]")


@app.command("tune-rerank")
def tune_rerank_cmd(
    scores_path: Annotated[
        Path,
        typer.Argument(
            metavar="VAL_SCORES.npy|VAL_EMB.npz",
            help="Validation score matrix or `rsitr embed` embeddings (never test).",
        ),
    ],
    rerank_name: Annotated[str, typer.Option("--rerank", help="smr|mr|qb-norm")] = "smr",
    captions_per_image: Annotated[int, typer.Option("--captions-per-image")] = 5,
    ks: Annotated[
        str | None,
        typer.Option("--k-list", help="Comma-separated k values (default 10,20,30; qb-norm 1,5)."),
    ] = None,
    bank: Annotated[
        Path | None,
        typer.Option("--bank", help="qb-norm's query bank: `rsitr embed` .npz of the training split."),
    ] = None,
    ties: Annotated[str, typer.Option(help="Tie policy: pessimistic|optimistic.")] = "pessimistic",
    out: Annotated[Path, typer.Option("--out", help="Where to save the best parameters (YAML).")] = Path(
        "rerank.yaml"
    ),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Grid-search SMR (γ1, γ2 ∈ 0.5…2.0), MR (Wp1, Wp2) or QB-Norm (β, with --bank) and k on
    validation scores."""
    from rich.progress import Progress

    from rsitr.retrieval.tune import tune_rerank

    if ks is None:
        ks = "1,5" if rerank_name == "qb-norm" else "10,20,30"
    if bank is not None and rerank_name != "qb-norm":
        raise ConfigError("--bank is the query bank of --rerank qb-norm")
    try:
        k_values = [int(v) for v in ks.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--k-list: expected comma-separated integers, got {ks!r}") from None
    if not k_values:
        raise ConfigError("--k-list is empty")
    scores, rel = scores_and_relevance(scores_path, captions_per_image, mmap=False)
    qbank = query_bank_from_npz(scores_path, bank) if bank is not None else None
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"tuning {rerank_name}", total=None)
        result = tune_rerank(
            scores,
            rel,
            rerank_name,
            k_values,
            ties,  # type: ignore[arg-type]
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            bank=qbank,
        )
    report = {**result.to_dict(), "source": str(scores_path)}
    if bank is not None:
        report["bank"] = str(bank)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(yaml.safe_dump(report, sort_keys=False))
    tmp.replace(out)
    if as_json:
        typer.echo(json.dumps(report))
        return
    console.print(
        f"{rerank_name}: best {result.params} → val mR {result.val_mR:.2f} "
        f"(without rerank {result.baseline_mR:.2f}, ties {ties}, "
        f"{'transductive' if result.transductive else 'non-transductive'}); saved {out}"
    )
