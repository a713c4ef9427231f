"""Validation splits that mirror a target profile: ``split_profile`` and ``carve_split``.

A validation split carved at random from RSICD's training images does not look like the test
split: half of its images have five identical captions, and 39 % of its captions occur word for
word elsewhere in train (test: 0.2 % and 11 %). It then rewards memorising repeated caption
strings. ``carve_split`` draws a validation split whose *profile* matches a target:

- ``distinct_per_image``: mean number of distinct (normalised) captions per image;
- ``identical_fraction``: share of images whose captions (≥ 2) are all the same text;
- ``verbatim_overlap``: share of captions whose normalised text also occurs in the rest of train;
- ``scene mix``: the pool's scene shares, allocated per scene (largest remainder).

Images that would leak across the split go wholly to one side:

- near duplicates (64-bit DCT perceptual hash, Hamming distance ≤ ``phash_distance``);
- with ``block_size`` B > 0, *file-number blocks*: ``bridge_35.jpg`` … ``bridge_44.jpg`` share the
  block ``(bridge, 3)``. RSICD numbers neighbouring tiles of one place (and one annotator's
  captions) consecutively, and its standard test split is made of such runs (e.g. ``bridge``
  4–5, 35–57, 340–360; median run 10.5 images), so a val of scattered single images keeps
  their siblings in train.

The search is a seeded local search: a stratified random start, then swaps within a scene and
single additions or removals that lower the squared, scaled distance to the target (profile
figures, size, and each scene's allocated count).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsitr.data.corpus import RetrievalCorpus, normalise_caption
from rsitr.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "PROFILES",
    "SplitTarget",
    "carve_split",
    "near_duplicate_groups",
    "normalise_caption",
    "perceptual_hashes",
    "split_profile",
    "write_carved_split",
]


@dataclass(frozen=True)
class SplitTarget:
    """The profile a carved validation split should have.

    Attributes:
        n_images: validation images (``None``: as many as the pool's ``val`` split, or 10 %).
        distinct_per_image: mean distinct captions per image.
        identical_fraction: share of images whose captions are all identical.
        verbatim_overlap: share of captions that occur word for word in the rest of train.
        min_distinct: only units whose images have at least this many distinct captions are
            eligible (with number blocks, one image in ten, or one per block, may fall below).
        block_size: group images into runs of ``block_size`` consecutive file numbers per file
            name prefix (see the module docstring); 0 disables.
        description: where the figures come from.
    """

    n_images: int | None = None
    distinct_per_image: float = 3.31
    identical_fraction: float = 0.002
    verbatim_overlap: float = 0.111
    min_distinct: int = 1
    block_size: int = 0
    description: str = ""


PROFILES: dict[str, SplitTarget] = {
    # The standard RSICD test split (AMFMN/GaLR release, 1,093 images; its captions and file
    # names are in ../shared/data/formats/harma_json/rsicd_test.json):
    #   rsitr data check ../shared/data/formats/harma_json/rsicd_test.json \
    #       --reference ../shared/data/rsicd/dataset_rsicd.json
    # 0.2 % identical-caption images, 3.31 distinct captions per image (2 images with 1 distinct,
    # 252 with 2), 11.1 % of captions also in train, scene mix = the whole data's, and made of
    # runs of consecutive file numbers per scene.
    "rsicd-test": SplitTarget(
        n_images=1093,
        distinct_per_image=3.31,
        identical_fraction=0.002,
        verbatim_overlap=0.111,
        min_distinct=2,
        block_size=5,
        description="standard RSICD test split (AMFMN/GaLR): caption profile, scene mix, number runs",
    ),
}


# -- profile ----------------------------------------------------------------------------------


def _image_texts(corpus: RetrievalCorpus) -> list[list[str]]:
    """Normalised non-blank caption texts of every image."""
    out = []
    for caps in corpus.image_captions:
        texts = [normalise_caption(corpus.captions[c]) for c in caps]
        out.append([t for t in texts if t])
    return out


def split_profile(corpus: RetrievalCorpus, reference: RetrievalCorpus | None = None) -> dict[str, Any]:
    """Profile figures of a split.

    Args:
        corpus: the split.
        reference: the training data the split is compared with (its captions define
            ``verbatim_overlap``). ``None`` compares each image with the *other* images of
            ``corpus`` (the figure for a training split itself).

    Returns:
        ``{n_images, n_captions, captions_per_image, distinct_per_image, identical_fraction,
        verbatim_overlap, reference, scene_mix}``; fractions in [0, 1], ``scene_mix`` maps each
        scene to its share of images (``"?"`` for unlabelled ones).
    """
    texts = _image_texts(corpus)
    n = len(texts)
    n_caps = sum(len(t) for t in texts)
    distinct = [len(set(t)) for t in texts]
    identical = sum(1 for t, d in zip(texts, distinct, strict=True) if len(t) >= 2 and d == 1)
    if reference is not None:
        ref = {t for ts in _image_texts(reference) for t in ts}
        overlap = sum(1 for ts in texts for t in ts if t in ref)
    else:
        owners = Counter(t for ts in texts for t in set(ts))
        overlap = sum(1 for ts in texts for t in ts if owners[t] > 1)
    scenes = Counter(im.scene if im.scene is not None else "?" for im in corpus.images)
    return {
        "n_images": n,
        "n_captions": n_caps,
        "captions_per_image": n_caps / n if n else 0.0,
        "distinct_per_image": sum(distinct) / n if n else 0.0,
        "identical_fraction": identical / n if n else 0.0,
        "verbatim_overlap": overlap / n_caps if n_caps else 0.0,
        "reference": "given" if reference is not None else "other images of the split",
        "scene_mix": {k: v / n for k, v in sorted(scenes.items())},
    }


# -- perceptual hash --------------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def _phash_one(path: Path) -> np.ndarray:
    """64-bit pHash: grey 32×32, 2-D DCT, the 8×8 lowest frequencies thresholded at their median."""
    from PIL import Image

    from rsitr.data.images import load_image

    img = load_image(path).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.float64)
    low = (_DCT32 @ a @ _DCT32.T)[:8, :8].reshape(-1)
    return low > np.median(low)


def perceptual_hashes(paths: Sequence[Path], workers: int | None = None) -> np.ndarray:
    """(N, 64) boolean pHash bits of the images at ``paths`` (threads: decoders release the GIL).

    Raises:
        DataError: naming the first image that cannot be read.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bits = list(pool.map(_phash_one, paths))
    return np.stack(bits) if bits else np.zeros((0, 64), dtype=bool)


def number_blocks(
    filenames: Sequence[str], block_size: int, scenes: Sequence[str | None] | None = None
) -> np.ndarray:
    """Group id per file: ``(scene, prefix, trailing number // block_size)``; files without a
    number are their own group. ``bridge_35.jpg`` and ``bridge_39.jpg`` share a block of 10.
    The scene keeps RSICD's numbered files (``00123.jpg``, several scenes) in pure blocks."""
    keys: dict[tuple[str | None, str, int], int] = {}
    out = np.empty(len(filenames), dtype=np.int64)
    for i, name in enumerate(filenames):
        m = _NUMBERED.match(Path(name).stem)
        scene = scenes[i] if scenes is not None else None
        key = (scene, m.group(1), int(m.group(2)) // block_size) if m and block_size > 0 else (None, name, -1)
        out[i] = keys.setdefault(key, len(keys))
    return out


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def near_duplicate_groups(
    bits: np.ndarray, max_distance: int, chunk: int = 2048, initial: np.ndarray | None = None
) -> np.ndarray:
    """Group ids such that images within ``max_distance`` Hamming bits share a group (transitively).

    Distances are computed blockwise as ``64 - (B·Bᵀ + (1-B)·(1-B)ᵀ)``; pairs are joined with a
    union-find, which starts from the ``initial`` groups when given (e.g. number blocks).
    Returns an (N,) int64 array of group ids (the smallest member index).
    """
    n = len(bits)
    parent = np.arange(n)
    if initial is not None:
        _, first = np.unique(initial, return_index=True)
        parent = first[np.unique(initial, return_inverse=True)[1]].astype(np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    if max_distance < 0 or n == 0:
        return parent.copy()
    b = bits.astype(np.float32)
    nb = 1.0 - b
    for s in range(0, n, chunk):
        agree = b[s : s + chunk] @ b.T + nb[s : s + chunk] @ nb.T
        ii, jj = np.nonzero(64 - agree <= max_distance)
        ii = ii + s
        keep = ii < jj
        for i, j in zip(ii[keep].tolist(), jj[keep].tolist(), strict=True):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


# -- carving ----------------------------------------------------------------------------------


@dataclass
class CarveResult:
    """The carved validation images and what was achieved.

    Attributes:
        val: indices of the pool's images that form the new validation split (sorted).
        profile: :func:`split_profile` of the new val against the new train.
        train_profile: profile of the new train (within itself).
        target: the target that was asked for.
        groups: number of near-duplicate groups with more than one image.
    """

    val: np.ndarray
    profile: dict[str, Any]
    train_profile: dict[str, Any]
    target: SplitTarget
    groups: int
    settings: dict[str, Any] = field(default_factory=dict)


def _allocate(shares: dict[Any, int], total: int) -> dict[Any, int]:
    """Largest-remainder allocation of ``total`` in proportion to ``shares``."""
    whole = sum(shares.values())
    raw = {k: total * v / whole for k, v in shares.items()}
    out = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], str(k)))[: total - sum(out.values())]:
        out[k] += 1
    return out


def carve_split(
    pool: RetrievalCorpus,
    target: SplitTarget,
    groups: np.ndarray | None = None,
    seed: int = 0,
    iterations: int = 200_000,
) -> CarveResult:
    """Choose validation images from ``pool`` whose profile matches ``target``.

    Args:
        pool: the training images to carve from (e.g. RSICD train + the old val).
        target: the profile to match; ``target.n_images`` must be set.
        groups: (N,) near-duplicate group id per image (see :func:`near_duplicate_groups`);
            ``None`` puts every image in its own group.
        seed: seed of the random start and of the swap proposals.
        iterations: swap proposals of the local search.

    Returns:
        A :class:`CarveResult`.

    Raises:
        ConfigError: if the pool has too few eligible images for ``target.n_images``.
    """
    n = pool.num_images
    if target.n_images is None or not 0 < target.n_images < n:
        raise ConfigError(f"split: n_images must be in 1..{n - 1}, got {target.n_images}")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    texts = _image_texts(pool)
    owners: dict[str, set[int]] = {}
    for i, ts in enumerate(texts):
        for t in set(ts):
            owners.setdefault(t, set()).add(int(groups[i]))
    n_caps = np.array([len(t) for t in texts], dtype=np.float64)
    distinct = np.array([len(set(t)) for t in texts], dtype=np.float64)
    identical = np.array([len(t) >= 2 and len(set(t)) == 1 for t in texts], dtype=np.float64)
    # captions that also occur outside the image's own near-duplicate group
    shared = np.array(
        [sum(1 for t in ts if len(owners[t] - {int(groups[i])}) > 0) for i, ts in enumerate(texts)],
        dtype=np.float64,
    )
    scenes = [im.scene if im.scene is not None else "?" for im in pool.images]

    # group-level units
    unit_ids, unit_of = np.unique(groups, return_inverse=True)
    u = len(unit_ids)
    stats = np.zeros((u, 5))  # images, captions, distinct, identical, shared
    np.add.at(stats, unit_of, np.stack([np.ones(n), n_caps, distinct, identical, shared], 1))
    # a unit is eligible when at most one image in ten (and at most one when smaller) falls below
    # min_distinct: number runs of the test split hold a few such images too
    below = np.zeros(u)
    np.add.at(below, unit_of, (np.where(n_caps > 0, distinct, 0) < target.min_distinct).astype(float))
    unit_scene = [""] * u
    for i in range(n - 1, -1, -1):
        unit_scene[unit_of[i]] = scenes[i]
    eligible = below <= np.maximum(np.floor(stats[:, 0] / 10), 0 if target.block_size == 0 else 1)
    eligible &= below < stats[:, 0]
    want = _allocate(Counter(scenes), target.n_images)
    rng = np.random.default_rng(seed)

    by_scene: dict[str, list[int]] = {}
    for k in rng.permutation(u).tolist():
        if eligible[k]:
            by_scene.setdefault(unit_scene[k], []).append(k)
    chosen = np.zeros(u, dtype=bool)
    for scene, k_list in by_scene.items():
        got, need = 0, want.get(scene, 0)
        for k in k_list:
            if got + int(stats[k, 0]) <= need:
                chosen[k] = True
                got += int(stats[k, 0])
    short = target.n_images - int(stats[chosen, 0].sum())
    if short > 0:  # scenes without enough eligible images: fill from any scene
        for k in rng.permutation(np.flatnonzero(eligible & ~chosen)).tolist():
            if short <= 0:
                break
            chosen[k] = True
            short -= int(stats[k, 0])
    if int(stats[chosen, 0].sum()) < target.n_images:
        raise ConfigError(
            f"split: only {int(stats[eligible, 0].sum())} eligible images (min_distinct="
            f"{target.min_distinct}) for {target.n_images} validation images"
        )

    scale = np.array([0.02, 0.002, 0.005])  # distinct/img, identical share, overlap share
    aim = np.array([target.distinct_per_image, target.identical_fraction, target.verbatim_overlap])
    scene_names = sorted(by_scene)
    scene_of = {name: i for i, name in enumerate(scene_names)}
    unit_si = np.array([scene_of.get(sc, -1) for sc in unit_scene])
    want_arr = np.array([want.get(name, 0) for name in scene_names], dtype=float)
    tol = 0.5  # images per scene: the scene mix weighs as much as the caption profile

    def profile_loss(tot: np.ndarray) -> float:
        imgs, caps = max(tot[0], 1.0), max(tot[1], 1.0)
        got = np.array([tot[2] / imgs, tot[3] / imgs, tot[4] / caps])
        size = (tot[0] - target.n_images) / max(1.0, 0.002 * target.n_images)
        return float((((got - aim) / scale) ** 2).sum() + size**2)

    members = [np.flatnonzero((unit_si == i) & eligible) for i in range(len(scene_names))]

    def search(total: np.ndarray, steps: int, t0: float) -> np.ndarray:
        """Simulated annealing over swaps within a scene and single additions or removals
        (temperature ``t0`` → 1e-3·``t0``, geometric); ends on the best state seen."""
        counts = np.bincount(unit_si[chosen], weights=stats[chosen, 0], minlength=len(scene_names))
        scene_pen = ((counts - want_arr) / tol) ** 2
        current = profile_loss(total) + scene_pen.sum()
        best, best_state = current, (chosen.copy(), total.copy())
        temps = t0 * np.geomspace(1.0, 1e-3, steps) if t0 > 0 else np.zeros(steps)
        accept = rng.random(steps)
        for step in range(steps):
            si = int(rng.integers(len(scene_names)))
            cand = members[si]
            a = cand[rng.integers(len(cand))]
            move = rng.integers(3)
            if move == 0:  # swap a with another unit of the scene on the other side
                b = cand[rng.integers(len(cand))]
                if chosen[a] == chosen[b]:
                    continue
                out_k, in_k = (a, b) if chosen[a] else (b, a)
                delta = stats[in_k] - stats[out_k]
                flips = (out_k, in_k)
            else:  # add or remove a
                delta = -stats[a] if chosen[a] else stats[a]
                flips = (a,)
            trial = total + delta
            new_count = counts[si] + delta[0]
            pen = ((new_count - want_arr[si]) / tol) ** 2
            value = profile_loss(trial) + scene_pen.sum() - scene_pen[si] + pen
            hot = temps[step] > 0 and accept[step] < np.exp((current - value) / max(temps[step], 1e-12))
            if value < current or hot:
                for k in flips:
                    chosen[k] = not chosen[k]
                total, current = trial, value
                counts[si], scene_pen[si] = new_count, pen
                if current < best:
                    best, best_state = current, (chosen.copy(), total.copy())
        chosen[:] = best_state[0]
        return best_state[1]

    # The search counts a caption as shared when any other group has it; the exact figure counts
    # only the new train. A few rounds move the search's aim by the difference (fixed point).
    total = stats[chosen].sum(0)
    for _round in range(4):
        total = search(total, iterations, 10.0) if _round == 0 else search(total, iterations // 4, 0.0)
        val = np.sort(np.flatnonzero(chosen[unit_of]))
        rest = np.setdiff1d(np.arange(n), val)
        val_c, train_c = pool.subset(val), pool.subset(rest)
        profile = split_profile(val_c, train_c)
        exact = profile["verbatim_overlap"]
        if abs(exact - target.verbatim_overlap) < 0.002:
            break
        aim[2] += target.verbatim_overlap - exact
    return CarveResult(
        val=val,
        profile=profile,
        train_profile=split_profile(train_c),
        target=target,
        groups=int((np.bincount(unit_of) > 1).sum()),
    )


def _refuse_overwrite(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        raise ConfigError(f"split: refusing to overwrite the input {source}; choose another --out")


def write_carved_split(
    source: Path,
    pool_splits: Sequence[str],
    val_names: set[str],
    out: Path,
    info: dict[str, Any],
) -> Path:
    """Write a copy of a Karpathy JSON ``source`` where the pool's images are re-split.

    Images of ``pool_splits`` become ``val`` when their file name is in ``val_names`` and
    ``train`` otherwise; images of other splits keep theirs. ``info`` is stored under the
    top-level key ``rsitr_split``. The file is written atomically and never over ``source``.
    """
    _refuse_overwrite(source, out)
    obj = json.loads(source.read_text(encoding="utf-8"))
    for rec in obj["images"]:
        if str(rec.get("split", "")) in pool_splits:
            rec["split"] = "val" if str(rec.get("filename", "")).strip() in val_names else "train"
    obj["rsitr_split"] = info
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj), encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot write the split ({e.strerror}); choose a writable --out", path=out) from e
    os.replace(tmp, out)
    return out


def default_split_path(source: Path, profile: str, seed: int) -> Path:
    """``<stem>.<profile>-s<seed>.json`` next to ``source``."""
    return source.with_name(f"{source.stem}.{profile}-s{seed}.json")


def make_split(
    source: str | Path,
    images: str | Path,
    target: SplitTarget,
    profile_name: str = "custom",
    labels: str | Path | None = None,
    pool_splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    phash_distance: int = 4,
    out: str | Path | None = None,
) -> tuple[Path, CarveResult]:
    """Carve a validation split from the ``pool_splits`` of a Karpathy JSON and write the result.

    The pool's images are hashed (pHash), grouped, carved with :func:`carve_split`, and written
    as a new Karpathy JSON (default :func:`default_split_path`); the input is never modified.

    Returns:
        ``(path written, CarveResult)``.

    Raises:
        ConfigError: for a source that is not Karpathy JSON, or an empty pool.
        DataError: for an unreadable image (named) or an unwritable output.
    """
    from rsitr.data.formats import detect_format
    from rsitr.data.loading import load_corpus

    source = Path(source)
    path = Path(out) if out is not None else default_split_path(source, profile_name, seed)
    _refuse_overwrite(source, path)  # before the hashing, not only at the write
    if detect_format(source, None) != "karpathy":
        raise ConfigError(f"split: {source} is not a Karpathy JSON file (the format split writes)")
    corpus = load_corpus(source, images=images, labels=labels)
    keep = [i for i, im in enumerate(corpus.images) if str(im.meta.get("split", "")) in pool_splits]
    if not keep:
        raise ConfigError(f"split: no image of {source} is in the splits {', '.join(pool_splits)}")
    pool = corpus.subset(keep)
    missing = [im.filename for im in pool.images if im.path is None or not im.path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) not found, e.g. {missing[0]}", path=images)
    if target.n_images is None:
        old_val = sum(str(im.meta.get("split")) == "val" for im in pool.images)
        target = SplitTarget(**{**asdict(target), "n_images": old_val or max(1, pool.num_images // 10)})
    logger.info("split: hashing %d images", pool.num_images)
    bits = perceptual_hashes([im.path for im in pool.images])  # type: ignore[misc]
    scenes = [im.scene for im in pool.images]
    blocks = number_blocks(pool.filenames(), target.block_size, scenes) if target.block_size > 0 else None
    groups = near_duplicate_groups(bits, phash_distance, initial=blocks)
    result = carve_split(pool, target, groups, seed=seed)
    result.settings = {
        "source": str(source),
        "profile": profile_name,
        "target": asdict(target),
        "pool_splits": list(pool_splits),
        "seed": seed,
        "phash_distance": phash_distance,
        "groups_kept_together": result.groups,
        "achieved": {k: v for k, v in result.profile.items() if k != "scene_mix"},
    }
    val_names = {pool.images[i].filename for i in result.val}
    write_carved_split(source, pool_splits, val_names, path, result.settings)
    return path, result
