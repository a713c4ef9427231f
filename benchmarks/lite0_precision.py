"""EfficientNet-Lite0 feature extraction: fp32 and bf16 (``precision: bf16``), each with the
BatchNorms as they are (a trainable tower) and folded into the convolutions (a frozen tower, what
feature caching, ``rsitr embed`` and ``rsitr index`` run): images/s and the relative difference
of the multi-tap features to plain fp32, on the offline ImageNet weights.

    python benchmarks/lite0_precision.py [--batch 64] [--repeats 2] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import time

import torch

from rsitr.models.encoders import create_image_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated (bf16 is slow where emulated)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 224, 224) * 2 - 1  # the [-1, 1] range of mean = std = 0.5
    rows, ref = [], None
    for precision in args.precisions.split(","):
        for frozen in (False, True):
            enc = create_image_encoder("efficientnet-lite0", pool="multi", precision=precision)
            enc = enc.set_frozen(frozen).eval()
            with torch.inference_mode():
                out = enc(x).pooled  # warm-up (and, frozen, the folded copy is built)
                t = time.perf_counter()
                for _ in range(args.repeats):
                    enc(x)
                rate = args.batch * args.repeats / (time.perf_counter() - t)
            ref = out if ref is None else ref
            rel = float((out - ref).norm() / ref.norm())
            rows.append((precision, "folded (frozen)" if frozen else "as trained", rate, rel))
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}\n")
    print("| precision | BatchNorm | images/s | relative feature difference to fp32 |\n|---|---|---|---|")
    for precision, bn, rate, rel in rows:
        print(f"| {precision} | {bn} | {rate:.1f} | {rel:.2e} |")


if __name__ == "__main__":
    main()
