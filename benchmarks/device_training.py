"""Train and annotate pbmc68k_reduced on the CPU and, when present, the GPU: seconds and macro-F1.

The check behind ``benchmarks/results/gpu_check.md``: training is not bit-identical across devices,
and on a small reference that moves macro-F1 (the demo in 0.12: 0.607 on CPU, 0.660 on an H200, when
the GPU drew its own dropout masks). Each seed trains on every device asked for, so the gap between
devices can be set beside the spread over seeds.

Usage: ``python benchmarks/device_training.py --seeds 0 1 2 --out benchmarks/results/device_training.json``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

import spikgpt
from spikgpt.model import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/device_training.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Model seeds (the split is seed 0).")
    p.add_argument("--devices", nargs="+", default=None, help="Default: cpu, and cuda when there is one.")
    args = p.parse_args()
    adata = sc.datasets.pbmc68k_reduced()
    y = adata.obs["bulk_labels"].astype(str).to_numpy()
    ref, query = train_test_split(np.arange(adata.n_obs), test_size=0.3, stratify=y, random_state=0)
    rows = []
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for seed in args.seeds:
        for device in devices:
            t0 = time.perf_counter()
            config = TrainConfig(device=device)
            model = spikgpt.train(
                adata[ref].copy(), "bulk_labels", use_raw=True, seed=seed, progress=False, train_config=config
            )
            t1 = time.perf_counter()
            out = spikgpt.annotate(adata[query].copy(), model, use_raw=True, copy=True, progress=False)
            t2 = time.perf_counter()
            predicted = out.obs["spikgpt_raw_label"].astype(str).tolist()
            f1 = f1_score(y[query], predicted, average="macro")
            row = {"device": device, "seed": seed, "train_s": t1 - t0, "annotate_s": t2 - t1, "macro_f1": float(f1)}
            row["accuracy"] = float(np.mean(y[query] == np.asarray(predicted)))
            row["predicted"] = predicted  # to count the cells two machines label differently
            rows.append(row)
            print(f"seed {seed} {device}: train {t1 - t0:.1f} s, macro-F1 {f1:.3f}", flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "gpu": gpu, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
