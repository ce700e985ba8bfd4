"""How many networks the classifier's ensemble needs: macro-F1 of K averaged networks, chosen leave-one-dataset-out.

Trains one single-network model (``TrainConfig(members=1)``) per seed on each task's reference
(the data split of seed 0, so only training varies), caches every query variant's class
probabilities, then scores the mean probabilities of every combination of K of the seeds'
networks (K = 1, 2, 3, 5): the mean and s.d. over combinations is what an ensemble of K
networks gives on this task, with the seed's spread. Averaging the probabilities of networks
trained apart is what ``TrainConfig.members = K`` does (it averages logits: measured beside it).
Leave-one-dataset-out: K is chosen on the mean macro-F1 of all datasets but one and scored on
the one left out.

Usage: ``python benchmarks/ensemble.py --cache /tmp/ensemble --seeds 5 --out benchmarks/results/ensemble``
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

import spikgpt
from spikgpt.bench.metrics import closed_set
from spikgpt.bench.run import query_variants
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS
from spikgpt.data import Cells
from spikgpt.model import TrainConfig

DEFAULT_TASKS = [
    "ifnb_control_to_stimulated",
    "ifnb_stimulated_to_control",
    "mesc_batch2_to_batch3",
    "mesc_batch3_to_batch2",
    "pancreas_xin_to_wang",
    "pbmc68k_split",
]
SIZES = (1, 2, 3, 5)


def cache_task(name: str, seeds: int, cache: Path, data_root: Path) -> None:
    """Train one network per seed and store each query variant's probabilities, truth and classes."""
    t = TASKS[name]
    ref, query = t.load(data_root, seed=0)
    classes = sorted(set(ref.obs[t.label_key].astype(str)))
    variants = query_variants(query, t.label_key, classes, 0)
    for seed in range(seeds):
        f = cache / f"{name}__s{seed}.npz"
        if f.exists():
            continue
        t0 = time.perf_counter()
        model = spikgpt.train(
            ref, t.label_key, seed=seed, progress=False, train_config=TrainConfig(members=1), **t.input_kw
        )
        arrays = {"classes": np.asarray(model.classes, dtype=str)}
        for i, (suffix, q) in enumerate(variants):
            arrays[f"probs{i}"] = model.predict(Cells(q, **t.input_kw)).probs
            arrays[f"truth{i}"] = q.obs[t.label_key].astype(str).to_numpy().astype(str)
            arrays[f"name{i}"] = np.asarray(name + suffix)
        np.savez_compressed(f, **arrays)
        print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def scores(cache: Path, tasks: list[str], seeds: int) -> dict[str, dict[int, list[float]]]:
    """Per query (task and variant) and K: macro-F1 of every K-combination of the seeds' networks."""
    out: dict[str, dict[int, list[float]]] = {}
    for name in tasks:
        runs = [np.load(cache / f"{name}__s{s}.npz") for s in range(seeds)]
        classes = runs[0]["classes"]
        for i in itertools.count():
            if f"probs{i}" not in runs[0]:
                break
            truth, row = runs[0][f"truth{i}"], str(runs[0][f"name{i}"])
            probs = [r[f"probs{i}"] for r in runs]
            out[row] = {
                k: [
                    closed_set(truth, classes[np.mean([probs[s] for s in c], 0).argmax(1)], list(classes))["macro_f1"]
                    for c in itertools.combinations(range(seeds), k)
                ]
                for k in SIZES
                if k <= seeds
            }
    return out


def markdown(result: dict[str, dict[int, list[float]]]) -> str:
    """Per-query table and the leave-one-dataset-out choice of K."""
    sizes = sorted(next(iter(result.values())))
    lines = ["| query | " + " | ".join(f"K = {k}" for k in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for row, by_k in result.items():
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}" for v in by_k.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    dataset = {row: row.split("_")[0] for row in result}
    per = {
        (d, k): float(np.mean([np.mean(result[r][k]) for r in result if dataset[r] == d]))
        for d in set(dataset.values())
        for k in sizes
    }
    lines += ["", "| left out | K chosen on the others | held-out macro-F1 | K = 1 held out |", "|---|---|---|---|"]
    for held in sorted(set(dataset.values())):
        best = max(sizes, key=lambda k: np.mean([v for (d, kk), v in per.items() if d != held and kk == k]))
        lines.append(f"| {held} | {best} | {per[(held, best)]:.3f} | {per[(held, 1)]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="folder for the per-seed probabilities")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ensemble"))
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        cache_task(name, args.seeds, args.cache, args.data_dir)
    result = scores(args.cache, args.tasks, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"spikgpt": spikgpt.__version__, "macro_f1": result}, indent=1))
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
