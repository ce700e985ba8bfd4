"""scANVI with scArches query surgery inside its own environment (run by :mod:`spikgpt.bench.baselines`).

scvi-tools brings its own torch stack (lightning, pyro), so it lives in a separate virtual
environment and this file must only import what that environment has (no spikgpt).

Protocol (``shared/reference/peers.md``, second run; the scvi-tools reference-mapping tutorial):
scvi-tools 1.4.2 (1.4.3+ needs Python ≥ 3.12) on torch 2.13.0 CPU, 2 threads; counts
(``round(expm1(x))`` where a task ships log values); the reference's 2,000 most variable genes
(``seurat_v3`` on counts); scVI with the scArches settings (2 layers, covariates encoded, layer
norm, no batch norm) on the reference as one batch, ``SCANVI.from_scvi_model``, then
``SCANVI.prepare_query_anndata`` + ``SCANVI.load_query_data`` with the query as a new batch and
query training with ``weight_decay=0``. Epochs: scVI ``min(200, 400 × 20,000 / n)`` (scvi-tools'
own rule, capped at 200), scANVI 50, query 100 (``EPOCHS``). Labels by ``predict()``; scANVI
has no rejection of its own; the confidence for the open-set AUROC is its largest class
probability.

Usage: python scanvi_runner.py REF.h5ad QUERY.h5ad LABEL_KEY OUT.csv USE_RAW(0|1) SEED
"""

import sys
import time

import numpy as np

if __package__:  # imported as spikgpt.bench.<runner> (tests)
    from spikgpt.bench.peer_io import PeerJob
else:  # run as a script in the peer's own environment, which has no spikgpt
    from peer_io import PeerJob

#: scVI (cap), scANVI and query-surgery epochs.
EPOCHS = (200, 50, 100)
UNLABELLED = "__unlabelled__"


def main() -> None:  # noqa: D103
    import scanpy as sc
    import scvi
    import torch

    job = PeerJob.from_argv(sys.argv[1:], values="counts")
    torch.set_num_threads(2)
    scvi.settings.seed = job.seed
    ref, query = job.ref, job.query
    ref.X.data, query.X.data = np.round(ref.X.data), np.round(query.X.data)
    quiet = {"enable_progress_bar": False, "accelerator": "cpu"}
    t0 = time.perf_counter()
    sc.pp.highly_variable_genes(ref, n_top_genes=min(2000, ref.n_vars - 1), flavor="seurat_v3")
    ref = ref[:, ref.var["highly_variable"].to_numpy()].copy()
    ref.obs["_label"], ref.obs["_batch"] = job.labels, "reference"
    scvi.model.SCVI.setup_anndata(ref, batch_key="_batch", labels_key="_label")
    vae = scvi.model.SCVI(
        ref, n_layers=2, encode_covariates=True, deeply_inject_covariates=False,
        use_layer_norm="both", use_batch_norm="none",
    )  # fmt: skip
    vae.train(max_epochs=min(EPOCHS[0], round(400 * 20_000 / ref.n_obs)), **quiet)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELLED, labels_key="_label")
    lvae.train(max_epochs=EPOCHS[1], n_samples_per_label=100, **quiet)
    t1 = time.perf_counter()
    query.obs["_label"], query.obs["_batch"] = UNLABELLED, "query"
    scvi.model.SCANVI.prepare_query_anndata(query, lvae)
    qvae = scvi.model.SCANVI.load_query_data(query, lvae)
    qvae.train(max_epochs=EPOCHS[2], plan_kwargs={"weight_decay": 0.0}, check_val_every_n_epoch=10, **quiet)
    soft = qvae.predict(soft=True)
    t2 = time.perf_counter()
    labels = soft.columns.to_numpy()[soft.to_numpy().argmax(axis=1)].astype(str)
    job.write(labels, labels, soft.to_numpy().max(axis=1), t1 - t0, t2 - t1)


if __name__ == "__main__":
    main()
