"""Seconds per training step of a method on CPU (forward + backward + optimiser step + the
method's per-step update, e.g. CMPAGL's momentum encoders or RDB's mean teacher).

Run: ``OMP_NUM_THREADS=2 python benchmarks/method_step.py [--threads 2] [--batch 64] [--steps 5]
[--config configs/cmpagl_rsicd_offline.yaml] [--setups pixels,on-map] [key=value ...]`` (extra
overrides apply to every setup). Any other config: ``--config configs/rdb_rsicd_offline.yaml
--setups config --batch 256``.

Setups, built from the config (default ``configs/cmpagl_rsicd_offline.yaml``) with random-init
towers (speed does not depend on the weights):

* ``config``: the config as given;

* ``pixels``: the former recipe, Gswin-tiny trained from scratch on 128 px images and the MiniLM
  halves unfrozen, every pair through ITM/MLM (raw images and padding-trimmed token ids);
* ``on-map``: the config as shipped, Gswin on the cached EfficientNet-Lite0 map and the cached
  text half (the cached features in their stored dtype, captions padded to the tokenizer's length).

It makes one batch of B pairs as the trainer hands it over and prints a markdown table: the median
wall and process-CPU seconds over ``--steps`` steps after 2 warm-ups, and the seconds an RSICD
epoch takes at that rate (43,680 training pairs; 17,088 on the carved split with
``caption_sampling: distinct``, the trainer's count). The captions are B random ones of RSICD's
training split when ``../shared`` is there (their length matters: the text side runs on the valid
tokens), else synthetic ones of similar length. With another job on the same cores, use
``OMP_WAIT_POLICY=PASSIVE`` (spinning threads stall otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rsitr.models import create_method
from rsitr.models.encoders.base import trim_padding
from rsitr.retrieval.embed import _storage, text_features
from rsitr.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cmpagl_rsicd_offline.yaml"
RSICD = ROOT.parent / "shared" / "data" / "rsicd" / "dataset_rsicd.json"
EPOCH_PAIRS = {"all": 43_680, "distinct": 17_088}  # RSICD train; distinct: the carved split

#: name → (overrides of the config's model section, description)
SETUPS: dict[str, tuple[list[str], str]] = {
    "pixels": (
        [
            "model.gswin_on_map=false",
            "model.gswin_kwargs={}",
            "model.image_encoder=gswin-tiny",
            "model.freeze_image=false",
            "model.freeze_text=false",
            "model.text_tune_layers=0",
            "model.fusion_pairs=0",
            "model.bf16=false",
        ],
        "gswin-tiny from scratch (128 px) + unfrozen MiniLM 3+3 (the former config)",
    ),
    "on-map": ([], "Gswin on the cached EfficientNet-Lite0 map, cached MiniLM half (2 frozen + 1 tuned)"),
    "config": ([], "the config as given"),
}
NUM_CLASSES = 31  # RSICD's scene classes, for methods with a scene classifier (RDB's L_cls)


def captions(n: int) -> list[str]:
    """``n`` RSICD training captions drawn at random (seed 0), or synthetic ones of RSICD's lengths
    (mean 14 tokens, a batch of 64 spans up to about 24)."""
    if RSICD.is_file():
        images = json.loads(RSICD.read_text())["images"]
        caps = [s["raw"] for im in images if im["split"] == "train" for s in im["sentences"]]
        pick = torch.randperm(len(caps), generator=torch.Generator().manual_seed(0))[:n]
        return [caps[i] for i in pick.tolist()]
    words = ["many", "green", "trees", "are", "around", "a", "white", "building", "near", "a", "river"]
    return [" ".join((words * 3)[: 6 + (i * 7) % 17]) for i in range(n)]


def make_batch(method: Any, caps: list[str], cached: bool) -> dict[str, Any]:
    """One training batch as the trainer builds it (``image_id``: each pair its own id, the diagonal)."""
    b = len(caps)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, method.image_encoder.image_size, method.image_encoder.image_size, generator=g)
    ids = torch.arange(b)
    labels = {"scene": ids % NUM_CLASSES}
    if not cached:
        tok = trim_padding(method.tokenize(caps))
        return {"image": images, **tok, "image_id": ids, **labels}
    with torch.no_grad():
        method.eval()
        img = {k: _storage(method, v) for k, v in method.image_features(images).items()}
        txt = text_features(method, caps)
        method.train()
    return {"image_feats": img, "text_feats": txt, "image_id": ids, **labels}


def step_seconds(method: Any, batch: dict[str, Any], steps: int) -> list[tuple[float, float]]:
    """Wall and process CPU seconds of ``steps`` optimiser steps after 2 warm-ups."""
    groups = method.param_groups()
    opt = torch.optim.AdamW([{"params": g} for g in groups.values() if g], lr=1e-5)
    method.train()
    method.set_schedule(EPOCH_PAIRS["distinct"] // len(batch["image_id"]))  # the queue cap of a run
    times = []
    for i in range(steps + 2):
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        out = method(batch)
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        opt.step()
        method.on_step_end()
        if i >= 2:
            times.append((time.perf_counter() - t, time.process_time() - c))
    return times


def build(config: Path, overrides: list[str], extra: list[str]) -> tuple[Any, bool]:
    cfg = load_config(config, overrides + extra)
    model = dict(cfg.model)
    model.pop("positives", None)  # read by the trainer, not the method
    if cfg.method == "rdb":
        model["num_classes"] = NUM_CLASSES
    torch.manual_seed(0)
    method = create_method(cfg.method, model, pretrained=False)
    cached = cfg.cache.enabled == "on" or (cfg.cache.enabled == "auto" and method.cacheable)
    return method, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every setup")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    caps = captions(args.batch)
    extra = " ".join(args.overrides) or "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"median of {args.steps} steps after 2 warm-ups; extra overrides: {extra}")  # fmt: skip
    print("| setup | model | input | s/step | CPU s/step | epoch, all pairs (s) | epoch, distinct (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.setups.split(","):
        overrides, desc = SETUPS[name.strip()]
        method, cached = build(args.config, overrides, args.overrides)
        batch = make_batch(method, caps, cached)
        times = step_seconds(method, batch, args.steps)
        s, cpu = statistics.median(t for t, _ in times), statistics.median(c for _, c in times)
        n = {k: v / args.batch * s for k, v in EPOCH_PAIRS.items()}
        kind = "cached features" if cached else "raw images + ids"
        print(f"| {name} | {desc} | {kind} | {s:.3f} | {cpu:.3f} | {n['all']:.0f} | {n['distinct']:.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
