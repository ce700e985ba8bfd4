"""Are the p-values of the network-read novelty scores valid on a same-study query?

pbmc68k_reduced split 70 / 30 (stratified, the split's seed = the model's), default training
(the refit ensemble of three) and, beside it, the model the refit starts from (``refit=False``,
one network). Their query cells are of the reference's types and from its study, so under
exchangeability a valid p-value is ≤ α for a share α of them. Since 0.18 a refitted model
computes the scores that read a network (``NETWORK_SCORES``) with its calibration network, so the
two models' p-values must be equal; with 0.17 they were computed with the ensemble (README, *Limits*).

Usage: ``python benchmarks/network_score_calibration.py --seeds 0 1 2``
(``--out``, default ``benchmarks/results/network_score_calibration``)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scanpy as sc
from sklearn.model_selection import train_test_split

import spikgpt
from spikgpt.model import TrainConfig

LEVELS = (0.01, 0.05, 0.1, 0.2)
SCORES = ("max_prob", "energy", "knn_latent", "mahalanobis_latent", "firing", "combined")


def run(seed: int) -> dict:
    adata = sc.datasets.pbmc68k_reduced()
    adata = adata.raw.to_adata()
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    ref, query = train_test_split(np.arange(adata.n_obs), test_size=0.3, stratify=labels, random_state=seed)
    ref, query = adata[np.sort(ref)].copy(), adata[np.sort(query)].copy()
    models = {
        "refit ensemble (default)": spikgpt.train(ref, "bulk_labels", seed=seed, progress=False),
        "one network, no refit": spikgpt.train(
            ref, "bulk_labels", seed=seed, refit=False, train_config=TrainConfig(members=1), progress=False
        ),
    }
    out: dict = {}
    for name, model in models.items():
        for score in SCORES:
            obs = spikgpt.annotate(query, model, novelty=score, shift="none", copy=True, progress=False).obs
            p = obs["spikgpt_pvalue"].to_numpy()
            out[f"{name} | {score}"] = {"p": p.tolist(), "share_at": [float((p <= a).mean()) for a in LEVELS]}
    for score in SCORES:
        a, b = (np.asarray(out[f"{n} | {score}"]["p"]) for n in models)
        out[f"equal | {score}"] = bool(np.allclose(a, b, rtol=1e-6, atol=0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/network_score_calibration"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {seed: run(seed) for seed in args.seeds}
    rows = ["| model | score | " + " | ".join(f"share p ≤ {a}" for a in LEVELS) + " | equal to one network |"]
    rows.append("|" + "---|" * (len(LEVELS) + 3))
    for key in results[args.seeds[0]]:
        if key.startswith("equal"):
            continue
        model, score = key.split(" | ")
        shares = np.array([results[s][key]["share_at"] for s in args.seeds])
        cells = [
            f"{m:.3f} ± {sd:.3f}"
            for m, sd in zip(
                shares.mean(0), shares.std(0, ddof=1) if len(args.seeds) > 1 else 0 * shares[0], strict=True
            )
        ]
        equal = all(results[s][f"equal | {score}"] for s in args.seeds)
        rows.append(f"| {model} | {score} | " + " | ".join(cells) + f" | {'yes' if equal else 'no'} |")
    table = "\n".join(rows)
    print(table)
    (args.out / "results.md").write_text(
        f"# Network-read novelty p-values on a same-study pbmc68k query (seeds {args.seeds}, mean ± s.d.)\n\n"
        "A valid p-value is ≤ α for a share α of these known query cells.\n\n" + table + "\n"
    )
    summary = {s: {k: (v if isinstance(v, bool) else v["share_at"]) for k, v in r.items()} for s, r in results.items()}
    (args.out / "results.json").write_text(
        json.dumps({"seeds": args.seeds, "levels": LEVELS, "results": summary}, indent=1)
    )


if __name__ == "__main__":
    main()
