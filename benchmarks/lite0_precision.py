"""EfficientNet-Lite0 feature extraction in fp32 and bf16 (``precision: bf16``): images/s and the
relative difference of the multi-tap features, on the offline ImageNet weights.

    python benchmarks/lite0_precision.py [--batch 64] [--repeats 2]
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
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 224, 224) * 2 - 1  # the [-1, 1] range of mean = std = 0.5
    rows, ref = [], None
    for precision in ("fp32", "bf16"):
        enc = create_image_encoder("efficientnet-lite0", pool="multi", precision=precision).eval()
        with torch.inference_mode():
            out = enc(x).pooled  # warm-up
            t = time.perf_counter()
            for _ in range(args.repeats):
                enc(x)
            rate = args.batch * args.repeats / (time.perf_counter() - t)
        ref = out if ref is None else ref
        rel = float((out - ref).norm() / ref.norm())
        rows.append((precision, rate, rel))
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}\n")
    print("| precision | images/s | relative feature difference to fp32 |\n|---|---|---|")
    for precision, rate, rel in rows:
        print(f"| {precision} | {rate:.1f} | {rel:.4f} |")


if __name__ == "__main__":
    main()
