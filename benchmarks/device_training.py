"""Train and annotate pbmc68k_reduced on the CPU and, when present, the GPU: seconds and macro-F1.

The check behind ``benchmarks/results/gpu_check.md``: training is not bit-identical across devices,
and on a small reference that moves macro-F1 (the demo: 0.607 on CPU, 0.660 on an H200).

Usage: ``python benchmarks/device_training.py --out benchmarks/results/device_training.json``
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
    args = p.parse_args()
    adata = sc.datasets.pbmc68k_reduced()
    y = adata.obs["bulk_labels"].astype(str).to_numpy()
    ref, query = train_test_split(np.arange(adata.n_obs), test_size=0.3, stratify=y, random_state=0)
    rows = []
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        t0 = time.perf_counter()
        config = TrainConfig(device=device)
        model = spikgpt.train(adata[ref].copy(), "bulk_labels", use_raw=True, progress=False, train_config=config)
        t1 = time.perf_counter()
        out = spikgpt.annotate(adata[query].copy(), model, use_raw=True, copy=True, progress=False)
        t2 = time.perf_counter()
        f1 = f1_score(y[query], out.obs["spikgpt_raw_label"].astype(str), average="macro")
        rows.append({"device": device, "train_s": t1 - t0, "annotate_s": t2 - t1, "macro_f1": float(f1)})
        print(f"{device}: train {t1 - t0:.1f} s, annotate {t2 - t1:.1f} s, macro-F1 {f1:.3f}", flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "gpu": gpu, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
