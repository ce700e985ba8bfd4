"""Does training from a file in chunks (the atlas path) change accuracy? Macro-F1 on every bench task.

Every task of ``spikgpt bench`` with a reference below 50,000 cells normally trains in memory.
Here each reference is also written to an ``.h5ad`` file and trained from it with the streamed
path forced (``spikgpt.api.STREAM_REFERENCE_CELLS = 0``: the file is read in chunks, as for an
atlas). Both models annotate the same query; the table shows the macro-F1 of the labels before
Unknown on query cells of reference types, per seed, and the mean difference.

Usage: ``python benchmarks/streamed_training.py --out benchmarks/results/streamed_training``
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

import spikgpt
import spikgpt.api
from spikgpt.bench.metrics import closed_set
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS


def macro_f1(model, query, task) -> float:
    out = spikgpt.annotate(query, model, copy=True, progress=False, **task.input_kw)
    truth = query.obs[task.label_key].astype(str).to_numpy()
    return closed_set(truth, out.obs["spikgpt_raw_label"].astype(str).to_numpy(), list(model.classes))["macro_f1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.tasks:
        task = TASKS[name]
        for seed in args.seeds:
            ref, query = task.load(args.data_dir, seed)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "reference.h5ad"
                ref.write_h5ad(path)
                memory = spikgpt.train(ref, task.label_key, seed=seed, progress=False, **task.input_kw)
                default = spikgpt.api.STREAM_REFERENCE_CELLS
                spikgpt.api.STREAM_REFERENCE_CELLS = 0
                try:
                    streamed = spikgpt.train(path, task.label_key, seed=seed, progress=False, **task.input_kw)
                finally:
                    spikgpt.api.STREAM_REFERENCE_CELLS = default
            row = {"task": name, "seed": seed, "memory": macro_f1(memory, query, task)}
            row["streamed"] = macro_f1(streamed, query, task)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| task | in memory (mean ± s.d.) | from the file in chunks | mean difference | largest |",
        "|---|---|---|---|---|",
    ]
    for name in args.tasks:
        r = [x for x in rows if x["task"] == name]
        m, s = np.array([x["memory"] for x in r]), np.array([x["streamed"] for x in r])
        lines.append(
            f"| {name} | {m.mean():.3f} ± {m.std():.3f} | {s.mean():.3f} ± {s.std():.3f} | "
            f"{(s - m).mean():+.3f} | {np.abs(s - m).max():.3f} |"
        )
    m = np.array([x["memory"] for x in rows])
    s = np.array([x["streamed"] for x in rows])
    lines.append(f"| **all** | {m.mean():.3f} | {s.mean():.3f} | {(s - m).mean():+.3f} | {np.abs(s - m).max():.3f} |")
    lines.append(f"\nSeeds {args.seeds}; labels before Unknown; query cells of reference types.")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
