"""Symphony reference mapping + kNN label transfer inside its own environment (run by :mod:`spikgpt.bench.baselines`).

symphonypy brings scanpy and harmonypy pins of its own, so it lives in a separate virtual
environment and this file must only import what that environment has (no spikgpt, no torch).

Protocol (``shared/reference/peers.md``, third run; the symphonypy README's reference building):
log1p counts per 10,000, 2,000 highly variable genes of the reference, scaled (max 10), 30
principal components (not centred again), Harmony on the reference with one constant batch key
(it stores the soft clusters Symphony needs), the query mapped with ``map_embedding`` as one
batch, labels by ``transfer_labels_kNN`` (k = 5). Symphony has no rejection of its own; the
confidence for the open-set AUROC is minus its per-cell mapping distance
(``per_cell_confidence``).

Usage: python symphony_runner.py REF.h5ad QUERY.h5ad LABEL_KEY OUT.csv USE_RAW(0|1) SEED
"""

import json
import resource
import sys
import time

import anndata as ad
import pandas as pd
import scanpy as sc

if __package__:  # imported as spikgpt.bench.<runner> (tests)
    from spikgpt.bench.peer_io import log1p_cp10k
else:  # run as a script in the peer's own environment, which has no spikgpt
    from peer_io import log1p_cp10k


def main() -> None:  # noqa: D103
    import symphonypy as sy

    ref_path, query_path, label_key, out, use_raw, seed = sys.argv[1:7]
    use_raw = use_raw == "1"
    ref = log1p_cp10k(ad.read_h5ad(ref_path), use_raw)
    query = log1p_cp10k(ad.read_h5ad(query_path), use_raw)
    ref.obs[label_key] = ref.obs[label_key].astype(str)
    t0 = time.perf_counter()
    sc.pp.highly_variable_genes(ref, n_top_genes=min(2000, ref.n_vars))
    ref.raw = ref
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.scale(ref, max_value=10)
    sc.pp.pca(ref, n_comps=min(30, ref.n_obs - 1, ref.n_vars - 1), zero_center=False, random_state=int(seed))
    ref.obs["_batch"] = "reference"
    sy.pp.harmony_integrate(ref, key="_batch", random_seed=int(seed))
    t1 = time.perf_counter()
    sy.tl.map_embedding(query, ref)
    sy.tl.per_cell_confidence(query, ref)
    sy.tl.transfer_labels_kNN(query, ref, label_key, n_neighbors=5)
    t2 = time.perf_counter()
    labels = query.obs[label_key].astype(str).to_numpy()
    df = pd.DataFrame(
        {"raw_label": labels, "label": labels, "confidence": -query.obs["symphony_per_cell_dist"].to_numpy()},
        index=query.obs_names,
    )
    df.to_csv(out)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train_seconds": t1 - t0, "predict_seconds": t2 - t1, "peak_rss_mb": rss_mb}))


if __name__ == "__main__":
    main()
