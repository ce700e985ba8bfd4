"""Does the novelty residual see more with more genes? AUROC of unseen vs known query cells.

For every type of a task held out of the reference in turn, the default embedder is fitted on
the rest with 500 (the default), 2,000 or 5,000 variable genes plus the pairwise markers, or
2,000 without markers, and the residual (``DefaultEmbedder.residual``: scaled expression off the
reference's principal subspace) of the query cells is scored: AUROC of the held-out type's
cells against the others. Raw residuals, no mapping, no shift correction.

Usage: ``python benchmarks/residual_genes.py TASK [TASK ...] --out benchmarks/results/residual_genes.md``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS
from spikgpt.data import Cells
from spikgpt.embed.default import DefaultEmbedder

VARIANTS = {"500 + markers": (500, 25), "2000 + markers": (2000, 25), "5000 + markers": (5000, 25), "2000": (2000, 0)}


def task_rows(name: str, data_root: Path = DEFAULT_DATA_ROOT) -> list[list]:
    """One row per held-out type: task, type, its query cells, then an AUROC per variant."""
    task = TASKS[name]
    ref, query = task.load(data_root)
    yr = ref.obs[task.label_key].astype(str).to_numpy()
    yq = query.obs[task.label_key].astype(str).to_numpy()
    q = Cells(query, **task.input_kw)
    rows = []
    for held in sorted(set(yr) & set(yq)):
        keep = yr != held
        r = Cells(ref[keep].copy(), **task.input_kw)
        row = [name, held, int((yq == held).sum())]
        for n_genes, markers in VARIANTS.values():
            emb = DefaultEmbedder(n_genes=n_genes, markers_per_pair=markers).fit(r, labels=yr[keep])
            row.append(float(roc_auc_score(yq == held, emb.residual(q))))
        print(" ".join(map(str, row)), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="+", choices=sorted(TASKS))
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/residual_genes.md"))
    args = p.parse_args()
    logging.disable(logging.WARNING)
    rows = [row for name in args.tasks for row in task_rows(name, args.data_dir)]
    head = "| task | held-out type | query cells | " + " | ".join(VARIANTS) + " |"
    lines = [head, "|---" * (3 + len(VARIANTS)) + "|"]
    lines += [f"| {t} | {h} | {n} | " + " | ".join(f"{v:.3f}" for v in aucs) + " |" for t, h, n, *aucs in rows]
    for name in args.tasks:
        mean = np.mean([r[3:] for r in rows if r[0] == name], axis=0)
        lines.append(f"| **{name} mean** | | | " + " | ".join(f"**{v:.3f}**" for v in mean) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
