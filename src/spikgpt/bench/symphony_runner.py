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

import sys
import time

import scanpy as sc

if __package__:  # imported as spikgpt.bench.<runner> (tests)
    from spikgpt.bench.peer_io import PeerJob
else:  # run as a script in the peer's own environment, which has no spikgpt
    from peer_io import PeerJob


def main() -> None:  # noqa: D103
    import symphonypy as sy

    job = PeerJob.from_argv(sys.argv[1:])
    ref, query = job.ref, job.query
    ref.obs["_label"] = job.labels
    t0 = time.perf_counter()
    sc.pp.highly_variable_genes(ref, n_top_genes=min(2000, ref.n_vars))
    ref.raw = ref
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.scale(ref, max_value=10)
    sc.pp.pca(ref, n_comps=min(30, ref.n_obs - 1, ref.n_vars - 1), zero_center=False, random_state=job.seed)
    ref.obs["_batch"] = "reference"
    sy.pp.harmony_integrate(ref, key="_batch", random_seed=job.seed)
    t1 = time.perf_counter()
    sy.tl.map_embedding(query, ref)
    sy.tl.per_cell_confidence(query, ref)
    sy.tl.transfer_labels_kNN(query, ref, "_label", n_neighbors=5)
    t2 = time.perf_counter()
    labels = query.obs["_label"].astype(str).to_numpy()
    job.write(labels, labels, -query.obs["symphony_per_cell_dist"].to_numpy(), t1 - t0, t2 - t1)


if __name__ == "__main__":
    main()
