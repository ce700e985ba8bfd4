"""Cost of annotating large queries: wall time, peak RSS and cells/s, spikgpt beside CellTypist.

Data: the shared IFN-β PBMCs (``shared/data/pbmc_ifnb``, log1p counts per 10,000, 6,998 genes).
Both tools are trained on the 936 control cells; the query of N cells is the stimulated cells
resampled with replacement (seed 0) with every non-zero value multiplied by exp(ε), ε ~ N(0, 0.1²)
(so no two cells are identical), written chunk by chunk straight into a CSR ``.h5ad`` (never
held in memory). Each run is a fresh process, measured from outside (wall clock; peak RSS from
``getrusage(RUSAGE_CHILDREN)`` of a wrapper whose only child it is):

- spikgpt: ``spikgpt annotate Q --model M --out O --quiet`` (the chunked path, default settings,
  writing the annotated copy of the file);
- CellTypist 1.7.1 (its own environment, ``.venv-celltypist``, made by ``spikgpt bench``):
  ``celltypist.annotate(Q, model, mode="best match")`` reading the same file, no output written.

    python benchmarks/scale.py --sizes 10000 100000 300000 1000000 --references 10000 50000 200000 500000 \
        --out benchmarks/results/scale

References (``--references``): the 936 control cells resampled the same way (seed 1) with their
labels; ``spikgpt train`` with default settings is timed, and the model's macro-F1 (labels before
the Unknown decision) measured on the real stimulated cells.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pbmc_ifnb" / "pbmc_ifnb_kang.h5ad"
CELLTYPIST_PY = ROOT / ".venv-celltypist" / "bin" / "python"
WRAP = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); " + (
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "print('EXIT', r.returncode, file=sys.stderr); sys.exit(0 if r.returncode == 0 else 1)"
)
CELLTYPIST_TRAIN = """
import sys, anndata as ad, celltypist, numpy as np
a = ad.read_h5ad(sys.argv[1]); a = a[a.obs['condition'] == 'control'].copy()
np.random.seed(0)
labels = a.obs['cell_type'].astype(str).to_numpy()
celltypist.train(a, labels=labels, n_jobs=1, check_expression=False).write(sys.argv[2])
"""
CELLTYPIST_ANNOTATE = """
import sys, celltypist
pred = celltypist.annotate(sys.argv[1], model=sys.argv[2], mode='best match')
print(pred.predicted_labels.shape)
"""


def write_resampled(
    src: ad.AnnData, n: int, path: Path, *, label_key: str | None = None, chunk: int = 50_000, seed: int = 0
) -> None:
    """N resampled, jittered cells of ``src`` (with their ``label_key``) as a CSR .h5ad, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(src.X, dtype=np.float32)
    pick = rng.integers(0, X.shape[0], n)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        obs = pd.DataFrame(index=[f"cell{i}" for i in range(n)])
        if label_key:
            obs[label_key] = pd.Categorical(src.obs[label_key].to_numpy()[pick])
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=src.var_names.copy()))
        for key in ("uns", "obsm", "varm", "layers", "obsp", "varp"):
            write_elem(f, key, {})
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = (n, X.shape[1])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        nnz = 0
        for s in range(0, n, chunk):
            part = X[pick[s : s + chunk]]
            part.data = part.data * np.exp(rng.normal(0, 0.1, part.nnz)).astype(np.float32)
            data.resize((nnz + part.nnz,))
            indices.resize((nnz + part.nnz,))
            data[nnz:], indices[nnz:] = part.data, part.indices
            indptr.append(part.indptr[1:].astype(np.int64) + nnz)
            nnz += part.nnz
        g.create_dataset("indptr", data=np.concatenate(indptr))
    tmp.rename(path)


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of ``cmd`` run as the only child of a fresh wrapper."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        # A child killed by signal N exits -N (-9: the kernel's out-of-memory killer).
        lines = (res.stderr or "").strip().splitlines()
        code = next((int(x.split()[1]) for x in lines if x.startswith("EXIT ")), res.returncode)
        last = [x for x in lines if not x.startswith("EXIT ")][-1:] or [""]
        return {"error": f"exit {code}: {last[0][:200]}", "seconds": round(wall, 1)}
    rss = next(int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("MAXRSS"))
    return {"seconds": round(wall, 1), "peak_rss_mb": round(rss / 1024)}


def references(full: ad.AnnData, sizes: list[int], work: Path, spikgpt: str) -> list[dict]:
    """Train on resampled control references of each size; macro-F1 on the real stimulated cells."""
    from sklearn.metrics import f1_score

    import spikgpt as sg

    control = full[full.obs["condition"] == "control"].copy()
    query = full[full.obs["condition"] == "stimulated"].copy()
    rows = []
    for n in sizes:
        ref = work / f"reference_{n}.h5ad"
        if not ref.exists():
            write_resampled(control, n, ref, label_key="cell_type", seed=1)
        model = work / f"model_{n}"
        cmd = [spikgpt, "train", str(ref), "--label-key", "cell_type", "--out", str(model), "--overwrite", "--quiet"]
        row = {"cells": n, "file_mb": round(ref.stat().st_size / 2**20), "spikgpt": measure(cmd)}
        if model.exists():
            pred = sg.annotate(query, str(model), copy=True, progress=False).obs["spikgpt_raw_label"].astype(str)
            row["macro_f1"] = round(float(f1_score(query.obs["cell_type"].astype(str), pred, average="macro")), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/spikgpt_scale"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--celltypist-max", type=int, default=1_000_000, help="largest query CellTypist is run on")
    parser.add_argument("--references", type=int, nargs="*", default=[], help="reference sizes to train on")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    spikgpt = str(Path(sys.executable).parent / "spikgpt")
    model = args.work / "model"
    if not model.exists():
        ref = args.work / "control.h5ad"
        a = ad.read_h5ad(DATA)
        a[a.obs["condition"] == "control"].copy().write_h5ad(ref)
        subprocess.run(
            [spikgpt, "train", str(ref), "--label-key", "cell_type", "--out", str(model), "--quiet"], check=True
        )
    ct_model = args.work / "celltypist.pkl"
    if CELLTYPIST_PY.exists() and not ct_model.exists():
        subprocess.run([str(CELLTYPIST_PY), "-c", CELLTYPIST_TRAIN, str(DATA), str(ct_model)], check=True)
    full = ad.read_h5ad(DATA)
    src = full[full.obs["condition"] == "stimulated"].copy()
    if args.references:
        train_rows = references(full, args.references, args.work, spikgpt)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "training.json").write_text(json.dumps(train_rows, indent=1) + "\n")
        table = [
            "| reference cells | file | train s | peak RSS | macro-F1 on the stimulated cells |",
            "|---|---|---|---|---|",
        ]
        for r in train_rows:
            m = r["spikgpt"]
            cost = f"failed: {m['error']}" if "error" in m else f"{m['seconds']} | {m['peak_rss_mb']} MB"
            table.append(f"| {r['cells']:,} | {r['file_mb']} MB | {cost} | {r.get('macro_f1', '')} |")
        (args.out / "training.md").write_text("\n".join(table) + "\n")
        print("\n".join(table))
    rows = []
    for n in args.sizes:
        q = args.work / f"query_{n}.h5ad"
        if not q.exists():
            write_resampled(src, n, q)
        out = args.work / f"annotated_{n}.h5ad"
        out.unlink(missing_ok=True)
        row = {"cells": n, "file_mb": round(q.stat().st_size / 2**20)}
        row["spikgpt"] = measure([spikgpt, "annotate", str(q), "--model", str(model), "--out", str(out), "--quiet"])
        if CELLTYPIST_PY.exists() and n <= args.celltypist_max:
            row["celltypist"] = measure([str(CELLTYPIST_PY), "-c", CELLTYPIST_ANNOTATE, str(q), str(ct_model)])
        out.unlink(missing_ok=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| query cells | file | spikgpt s | spikgpt peak RSS | spikgpt cells/s "
        "| CellTypist s | CellTypist peak RSS | CellTypist cells/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for tool in ("spikgpt", "celltypist"):
            m = r.get(tool)
            if m is None:
                cells += ["not run"] * 3
            elif "error" in m:
                cells += [f"failed after {m['seconds']} s: {m['error']}", "", ""]
            else:
                cells += [f"{m['seconds']}", f"{m['peak_rss_mb']} MB", f"{r['cells'] / m['seconds']:.0f}"]
        lines.append(f"| {r['cells']:,} | {r['file_mb']} MB | " + " | ".join(cells) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
