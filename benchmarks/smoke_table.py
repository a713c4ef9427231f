"""The ``--smoke`` figures of the paper configs, as the README's "Reproduce the papers" table.

Run: ``python benchmarks/smoke_table.py [--configs msa_rsicd_resnet101_bert,...]``. Each config
runs ``rsitr train CONFIG --smoke --json`` in its own process (so peak memory is per config) and
the table gives the parameters used at inference and trained, the seconds per optimiser step
(batch 8, random weights, on this machine's device) and the peak memory. Offline, hub text
towers are rebuilt as their own architecture (``bert-base-uncased``) with MiniLM's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "rsitr" / "configs"
PAPER = [
    "msa_rsitmd_resnet50_bert", "msa_rsicd_resnet101_bert", "cmpagl_rsicd_gswin_bert",
    "cmpagl_rsitmd_gswin_bert", "rdb_rsicd_clip_vitb32", "rdb_rsitmd_clip_vitb32",
    "rdb_rsicd_georsclip_vitb32", "rdb_rsitmd_georsclip_vitb32",
]  # fmt: skip


def smoke(name: str) -> dict:
    """The ``--smoke --json`` report of one config (a fresh process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "rsitr", "train", str(CONFIGS / f"{name}.yaml"), "--smoke", "--json"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(PAPER), help="comma-separated config names")
    args = ap.parse_args()
    print("| config | params at inference | params trained | s / step (batch 8) | peak MiB | device |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = smoke(name)
        print(
            f"| `{name}` | {r['params_inference'] / 1e6:.1f} M | {r['params_trained'] / 1e6:.1f} M | "
            f"{r['step_seconds']:.2f} | {r['peak_memory_mb']:,.0f} | {r['device']} |"
        )


if __name__ == "__main__":
    main()
