"""Write a synthetic dataset: ``images/``, a Karpathy-format JSON and ``labels.csv``.

Image ``i`` has class ``SCENE_CLASSES[i % num_classes]``; its spec and captions come from
generators seeded with ``(seed, i)``, so output bytes depend only on ``(n, size, seed, ...)`` and
not on the number of worker processes. A fraction of the images are *siblings* of the image one
class-cycle earlier: same layout, one small-object attribute changed (hard negatives). Siblings
share their family's split.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from rsitr.data.synth.captions import captions_for
from rsitr.data.synth.render import render_scene
from rsitr.data.synth.sample import make_sibling, sample_scene_spec
from rsitr.data.synth.scenes import SCENE_CLASSES
from rsitr.data.synth.spec import SceneSpec
from rsitr.errors import ConfigError

_logger = logging.getLogger(__name__)

JSON_NAME = "dataset_synth.json"
LABELS_NAME = "labels.csv"
IMAGE_DIR = "images"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_scenes` wrote.

    Attributes:
        out_dir: output folder.
        json_path: the Karpathy-format JSON.
        num_images: images written.
        num_captions: captions written (5 per image).
        num_classes: scene classes present.
        num_siblings: images that are hard-negative siblings of another image.
        splits: images per split (``train``, ``val``, ``test``).
        seconds: wall time.
    """

    out_dir: Path
    json_path: Path
    num_images: int
    num_captions: int
    num_classes: int
    num_siblings: int
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        """One-line human summary."""
        sp = " / ".join(f"{k} {v}" for k, v in self.splits.items())
        return (
            f"wrote {self.num_images} images ({sp}), {self.num_captions} captions, "
            f"{self.num_classes} classes, {self.num_siblings} siblings to {self.out_dir} "
            f"in {self.seconds:.1f} s"
        )


def plan_scenes(
    n: int, seed: int, sibling_frac: float = 0.3, classes: Sequence[str] = SCENE_CLASSES
) -> tuple[list[SceneSpec], list[int | None]]:
    """Sample the specs of ``n`` scenes (cheap: no rendering).

    Args:
        n: number of scenes.
        seed: dataset seed.
        sibling_frac: probability that scene ``i >= len(classes)`` is a sibling of scene
            ``i - len(classes)`` (same class).
        classes: class cycle.

    Returns:
        ``(specs, parents)``: ``parents[i]`` is the index scene ``i`` is a sibling of, or ``None``.
    """
    specs: list[SceneSpec] = []
    parents: list[int | None] = []
    c = len(classes)
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0])
        if i >= c and rng.random() < sibling_frac:
            specs.append(make_sibling(specs[i - c], rng))
            parents.append(i - c)
        else:
            specs.append(sample_scene_spec(rng, classes[i % c]))
            parents.append(None)
    return specs, parents


def assign_splits(
    scenes: Sequence[str],
    parents: Sequence[int | None],
    val_frac: float,
    test_frac: float,
    seed: int,
) -> list[str]:
    """Split stratified by class, keeping each sibling family in one split.

    Families are visited class by class in round robin (shuffled); the first ones fill ``test``,
    the next ``val``, the rest go to ``train``.

    Args:
        scenes: class of each image.
        parents: sibling parent of each image (``None`` for family roots).
        val_frac: fraction of images for ``val``.
        test_frac: fraction of images for ``test``.
        seed: dataset seed.

    Returns:
        The split name of each image.
    """
    n = len(scenes)
    root = list(range(n))
    families: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        root[i] = i if p is None else root[p]
        families.setdefault(root[i], []).append(i)
    rng = np.random.default_rng([seed, n, 2])
    by_class: dict[str, list[int]] = {}
    for r in families:
        by_class.setdefault(scenes[r], []).append(r)
    queues = [[lst[k] for k in rng.permutation(len(lst))] for lst in by_class.values()]
    queues = [queues[k] for k in rng.permutation(len(queues))]
    order = [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]
    quota = {"test": round(n * test_frac), "val": round(n * val_frac)}
    splits = [""] * n
    filled = {"test": 0, "val": 0}
    for r in order:
        name = next((s for s in ("test", "val") if filled[s] < quota[s]), "train")
        if name != "train":
            filled[name] += len(families[r])
        for i in families[r]:
            splits[i] = name
    return splits


def _write_image(job: tuple[str, SceneSpec], size: int, fmt: str) -> None:
    path, spec = job
    tmp = f"{path}.tmp"
    img = render_scene(spec, size)
    if fmt == "JPEG":  # 4:4:4 keeps the colours of few-pixel objects
        img.save(tmp, format=fmt, quality=92, subsampling=0)
    else:
        img.save(tmp, format=fmt, compress_level=1)
    os.replace(tmp, path)


def _check(name: str, ok: bool, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}, expected {allowed}")


def _default_workers(n: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return 1 if n < 64 else max(1, min(cpus, 8))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate_scenes(
    out_dir: str | Path,
    n: int = 2000,
    size: int = 224,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    workers: int | None = None,
    image_format: str = "jpg",
    sibling_frac: float = 0.3,
) -> SynthSummary:
    """Generate a synthetic remote-sensing caption dataset.

    Writes ``out_dir/images/<class>_<index>.<ext>``, ``out_dir/labels.csv`` (``filename,scene``)
    and, last, ``out_dir/dataset_synth.json`` (Karpathy format), each via a temporary name and a
    rename, so an interrupted run never leaves a JSON that points at missing images.

    Args:
        out_dir: output folder (created if needed).
        n: number of images.
        size: image side in pixels.
        seed: dataset seed; the same arguments give byte-identical output.
        val_frac: fraction of images in the ``val`` split.
        test_frac: fraction of images in the ``test`` split.
        workers: rendering processes; ``None`` or 0 picks one per CPU (up to 8).
        image_format: ``"jpg"`` or ``"png"``.
        sibling_frac: fraction of images that are hard-negative siblings of another image.

    Returns:
        A summary of what was written.

    Raises:
        ConfigError: for an invalid option (names the option, the value and what is allowed).
    """
    _check("n", isinstance(n, int) and n >= 1, n, "an integer >= 1")
    _check("size", isinstance(size, int) and 32 <= size <= 4096, size, "an integer in [32, 4096]")
    _check("val_frac", 0.0 <= val_frac < 1.0, val_frac, "a fraction in [0, 1)")
    _check("test_frac", 0.0 <= test_frac < 1.0, test_frac, "a fraction in [0, 1)")
    _check("val_frac + test_frac", val_frac + test_frac < 1.0, val_frac + test_frac, "< 1")
    _check("workers", workers is None or workers >= 0, workers, "an integer >= 0")
    _check("image_format", image_format in IMAGE_FORMATS, image_format, "'jpg' or 'png'")
    _check("sibling_frac", 0.0 <= sibling_frac < 1.0, sibling_frac, "a fraction in [0, 1)")
    out = Path(out_dir)
    _check("out_dir", not out.exists() or out.is_dir(), str(out), "a folder (this is a file)")
    start = time.perf_counter()
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    specs, parents = plan_scenes(n, seed, sibling_frac)
    splits = assign_splits([s.scene for s in specs], parents, val_frac, test_frac, seed)
    width = max(5, len(str(n - 1)))
    names = [f"{s.scene}_{i:0{width}d}.{image_format}" for i, s in enumerate(specs)]

    jobs = [(str(out / IMAGE_DIR / name), spec) for name, spec in zip(names, specs, strict=True)]
    write = partial(_write_image, size=size, fmt=IMAGE_FORMATS[image_format])
    num_workers = workers or _default_workers(n)
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            list(pool.map(write, jobs, chunksize=max(1, n // (num_workers * 8))))
    else:
        for job in jobs:
            write(job)

    images = []
    for i, (name, spec, split) in enumerate(zip(names, specs, splits, strict=True)):
        caps = captions_for(spec, np.random.default_rng([seed, i, 1]))
        sentids = list(range(5 * i, 5 * i + len(caps)))
        sentences = [
            {"raw": c, "tokens": c[:-2].split(), "imgid": i, "sentid": sid}
            for c, sid in zip(caps, sentids, strict=True)
        ]
        images.append(
            {"filename": name, "imgid": i, "split": split, "sentids": sentids, "sentences": sentences}
        )
    labels = "filename,scene\n" + "".join(f"{nm},{s.scene}\n" for nm, s in zip(names, specs, strict=True))
    _atomic_write_text(out / LABELS_NAME, labels)
    _atomic_write_text(out / JSON_NAME, json.dumps({"dataset": "synth", "images": images}))

    counts = {k: splits.count(k) for k in ("train", "val", "test")}
    summary = SynthSummary(
        out_dir=out,
        json_path=out / JSON_NAME,
        num_images=n,
        num_captions=sum(len(im["sentences"]) for im in images),
        num_classes=len({s.scene for s in specs}),
        num_siblings=sum(p is not None for p in parents),
        splits=counts,
        seconds=time.perf_counter() - start,
    )
    _logger.info(summary.line())
    return summary
