"""Train and annotate pbmc68k_reduced on the CPU and, when present, the GPU: seconds and macro-F1.

The check behind ``benchmarks/results/gpu_check.md``: training is not bit-identical across devices,
and on a small reference that moves macro-F1 (the demo in 0.12: 0.607 on CPU, 0.660 on an H200, when
the GPU drew its own dropout masks). Each seed trains on every device asked for, so the gap between
devices can be set beside the spread over seeds.

Usage: ``python benchmarks/device_training.py --seeds 0 1 2 --out runs.json`` on each machine, then
``python benchmarks/device_training.py --compare MACHINE=runs.json [...] --out
benchmarks/results/device_training.json`` (a ``MACHINE`` may name several files) for the summary:
macro-F1 and accuracy per machine, and how many query cells two machines label differently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

import spikgpt
from spikgpt.model import TrainConfig


def compare(files: list[str]) -> dict:
    """Summary of runs written by this script on several machines (``MACHINE=FILE`` each)."""
    runs, predicted = [], {}
    for spec in files:
        machine, path = spec.split("=", 1)
        for row in json.loads(Path(path).read_text())["runs"]:
            predicted[machine, row["seed"]] = np.asarray(row.pop("predicted"))
            runs.append({"machine": machine, **row})
    runs.sort(key=lambda r: (r["machine"], r["seed"]))
    by_machine = defaultdict(list)
    for r in runs:
        by_machine[r["machine"]].append(r)
    summary = {
        m: {
            f"{k}_{stat.__name__}": stat([r[k] for r in rs])
            for k in ("macro_f1", "accuracy")
            for stat in (statistics.mean, statistics.stdev)
        }
        for m, rs in by_machine.items()
    }
    seeds = {m: sorted(r["seed"] for r in rs) for m, rs in by_machine.items()}
    differ = {}
    machines = list(by_machine)
    for i, a in enumerate(machines):
        for b in machines[i + 1 :]:
            shared = [s for s in seeds[a] if s in seeds[b]]
            differ[f"{a} vs {b}, same seed"] = [int((predicted[a, s] != predicted[b, s]).sum()) for s in shared]
    for m in machines:
        differ[f"{m}, seed s vs s+1"] = [
            int((predicted[m, s] != predicted[m, t]).sum()) for s, t in zip(seeds[m], seeds[m][1:], strict=False)
        ]
    n_query = len(next(iter(predicted.values())))
    return {"runs": runs, "summary": summary, "query_cells": n_query, "cells_labelled_differently": differ}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/device_training.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Model seeds (the split is seed 0).")
    p.add_argument("--devices", nargs="+", default=None, help="Default: cpu, and cuda when there is one.")
    p.add_argument("--compare", nargs="+", default=None, metavar="MACHINE=FILE", help="Summarise earlier runs.")
    args = p.parse_args()
    if args.compare:
        args.out.write_text(json.dumps(compare(args.compare), indent=1))
        return
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
