"""Cache model outputs of every open-set scenario on the shared data, for choosing the Unknown rule.

For each scenario (a reference with one or more types absent, and a query that has them) one
model is trained with default settings and saved to ``OUT/<scenario>/``; the query's embedding
and truth go to ``OUT/<scenario>.npz``. ``benchmarks/novelty_decision.py`` then evaluates
decision rules (and the query mapping) on them, leave-one-dataset-out, without retraining.

Scenarios (dataset: scenarios):
- pbmc68k: leave-one-type-out within scanpy's pbmc68k_reduced (70/30 split of the other types);
- pancreas: Xin → Wang (ductal, stellate, acinar unseen), and each Xin type left out in turn;
- cellbench: 3 lines → 5 lines (A549, H838 unseen); CEL-seq2 → Drop-seq with each line left out;
- ifnb: control → stimulated and back, each type (≥ 20 cells) left out in turn;
- mesc: batch2 → batch3 and back, each condition left out in turn.

``--reference-cells N`` trains on a seeded, stratified sample of N reference cells (as
``spikgpt bench --reference-cells``); ``--min-calibration-cells N`` holds out at least N
calibration cells, never more than a third of the splittable ones (through ``spikgpt.train``'s
``calibration_fraction``).

With ``--closed`` it caches the closed-set bench tasks instead (``spikgpt bench``'s, every type
in the reference; each with its composition-shifted query variants' rows), for the false Unknown
a rule gives across seeds: ``--closed --seeds 0 1 2 3 4``.

Usage: ``python benchmarks/novelty_cache.py --out benchmarks/results/novelty_cache --seeds 0``
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

import spikgpt
from spikgpt.bench.run import query_variants
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS, subsample_reference
from spikgpt.data import Cells
from spikgpt.model.training import MIN_SPLIT_CELLS


def scenarios(data_root: Path):
    """Yield (dataset, name, reference, query, label_key, input_kw)."""
    t = TASKS["pbmc68k_split"]
    full = t.read_reference(data_root)
    labels = full.obs[t.label_key].astype(str).to_numpy()
    for typ in [x for x in np.unique(labels) if (labels == x).sum() >= 10]:
        rest = np.flatnonzero(labels != typ)
        r, q = train_test_split(rest, test_size=0.3, stratify=labels[rest], random_state=0)
        q = np.concatenate([q, np.flatnonzero(labels == typ)])
        yield (
            "pbmc68k",
            f"pbmc68k_loto_{typ}",
            full[np.sort(r)].copy(),
            full[np.sort(q)].copy(),
            t.label_key,
            t.input_kw,
        )
    pairs = [
        ("pancreas", "pancreas_xin_to_wang", True),
        ("cellbench", "cellbench_3cl_to_5cl", False),
        ("cellbench", "cellbench_celseq_to_dropseq", True),
        ("ifnb", "ifnb_control_to_stimulated", True),
        ("ifnb", "ifnb_stimulated_to_control", True),
        ("mesc", "mesc_batch2_to_batch3", True),
        ("mesc", "mesc_batch3_to_batch2", True),
    ]
    for dataset, name, loto in pairs:
        t = TASKS[name]
        ref, query = t.load(data_root)
        rl = ref.obs[t.label_key].astype(str)
        if name in ("pancreas_xin_to_wang", "cellbench_3cl_to_5cl"):
            yield dataset, name, ref, query, t.label_key, t.input_kw
        if loto:
            for typ in sorted(set(rl)):
                if (rl == typ).sum() < 20 or (query.obs[t.label_key].astype(str) == typ).sum() < 10:
                    continue
                keep = (rl != typ).to_numpy()
                if len(set(rl[keep])) < 2:
                    continue
                yield dataset, f"{name}_loto_{typ}", ref[keep].copy(), query, t.label_key, t.input_kw


def closed_tasks(data_root: Path, seed: int):
    """Yield (dataset, name, reference, query, label_key, input_kw, variant rows) of every bench task."""
    for name, t in TASKS.items():
        ref, query = t.load(data_root, seed)
        classes = sorted(set(ref.obs[t.label_key].astype(str)))
        query.obs["_row"] = np.arange(query.n_obs)
        rows = {
            "variant" + re.sub(r"\W+", "_", suffix.replace("−", "minus").replace("%", "pct")).rstrip("_"): q.obs[
                "_row"
            ].to_numpy()
            for suffix, q in query_variants(query, t.label_key, classes, seed)
        }
        del query.obs["_row"]
        yield name.split("_")[0], name, ref, query, t.label_key, t.input_kw, rows


def calibration_fraction(labels, minimum: int, fraction: float = 0.2) -> float:
    """``fraction``, or the larger share that holds out ``minimum`` cells (at most a third) of the splittable ones.

    Splittable: cells of types with at least ``MIN_SPLIT_CELLS`` cells (``spikgpt.train``'s default).
    """
    counts = labels.astype(str).value_counts()
    splittable = int(counts[counts >= MIN_SPLIT_CELLS].sum())
    return max(fraction, min(minimum, splittable // 3) / splittable) if splittable else fraction


def cache_one(model, query, label_key, input_kw) -> dict:
    """The query's embedding (before the model's scaling), truth and the model's classes."""
    cells = Cells(query, **input_kw)
    E, residual = model.embedder.embed(cells)
    return {
        "q_embedding": E.astype(np.float32),
        "q_residual": (np.zeros(len(E)) if residual is None else residual).astype(np.float32),
        "q_truth": np.asarray(query.obs[label_key].astype(str).to_numpy(), dtype=str),
        "classes": np.asarray(model.classes, dtype=str),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/novelty_cache"))
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="*", default=None, help="dataset names to run")
    p.add_argument("--embedder", default="default", help="embedder spec, e.g. default:hvg (default: the package's)")
    p.add_argument("--calibration-folds", type=int, default=1, help="spikgpt.train(calibration_folds=...)")
    p.add_argument("--closed", action="store_true", help="the closed-set bench tasks and their query variants")
    p.add_argument("--reference-cells", type=int, default=None, help="subsample every reference (seeded, stratified)")
    p.add_argument("--min-calibration-cells", type=int, default=0, help="hold out at least this many (at most a third)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.closed:
        jobs = ((seed, *task) for seed in args.seeds for task in closed_tasks(args.data_dir, seed))
    else:
        jobs = ((seed, *sc, {}) for sc in scenarios(args.data_dir) for seed in args.seeds)
    for seed, dataset, name, ref, query, key, kw, rows in jobs:
        if args.only and dataset not in args.only:
            continue
        f = args.out / (re.sub(r"[^A-Za-z0-9_.+-]", "-", name) + f"__s{seed}.npz")
        if f.exists():
            continue
        t0 = time.perf_counter()
        if args.reference_cells:
            ref = subsample_reference(ref, key, args.reference_cells, seed)
        model = spikgpt.train(
            ref,
            key,
            embedder=args.embedder,
            seed=seed,
            progress=False,
            calibration_folds=args.calibration_folds,
            calibration_fraction=calibration_fraction(ref.obs[key], args.min_calibration_cells),
            **kw,
        )
        data = cache_one(model, query, key, kw)
        model.save(f.with_suffix(""), overwrite=True)
        np.savez_compressed(f, dataset=dataset, **data, **rows)
        unseen = ~np.isin(data["q_truth"], data["classes"])
        print(
            f"{name} seed {seed}: {unseen.sum()} unseen of {len(unseen)} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
