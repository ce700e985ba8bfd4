"""Benchmark tasks: a labelled reference and a query from another batch, technology or study.

Each task is a small declarative spec. Files are read from local paths (``data_root``, by default
the ``shared/data`` folder beside the repository); where a dataset has a public source its URL
and sha256 are recorded so users can fetch it themselves. Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.model_selection import train_test_split

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True)
class Task:
    """One reference → query annotation task.

    Attributes
    ----------
    name
        Identifier used in tables and file names.
    reference, query
        File paths relative to the data root, or ``"scanpy:pbmc68k_reduced"``. ``query=None``
        takes the query from the reference file (by batch, or a stratified split).
    label_key
        ``obs`` column with cell types.
    batch_key, reference_batches, query_batches
        Split one file by batch.
    use_raw
        Read expression from ``.raw``.
    shared_genes
        Restrict the reference to the genes the query measures.
    split_seed_fraction
        Query share of a stratified split when there is no batch column.
    sources
        Public URL and sha256 of every file, for users to fetch it.
    """

    name: str
    reference: str
    label_key: str
    query: str | None = None
    batch_key: str | None = None
    reference_batches: tuple[str, ...] = ()
    query_batches: tuple[str, ...] = ()
    use_raw: bool = False
    shared_genes: bool = False
    split_seed_fraction: float = 0.3
    description: str = ""
    sources: dict = field(default_factory=dict)

    def load(self, data_root: Path = DEFAULT_DATA_ROOT, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
        """Reference and query AnnData of this task."""
        ref = _read(self.reference, data_root)
        if self.query is not None:
            query = _read(self.query, data_root)
        elif self.batch_key:
            batch = ref.obs[self.batch_key].astype(str)
            query = ref[batch.isin(self.query_batches).to_numpy()].copy()
            ref = ref[batch.isin(self.reference_batches).to_numpy()].copy()
        else:
            labels = ref.obs[self.label_key].astype(str).to_numpy()
            r, q = train_test_split(
                np.arange(ref.n_obs), test_size=self.split_seed_fraction, stratify=labels, random_state=seed
            )
            ref, query = ref[np.sort(r)].copy(), ref[np.sort(q)].copy()
        if self.shared_genes:
            ref = ref[:, ref.var_names.isin(query.var_names)].copy()
        return ref, query

    def read_reference(self, data_root: Path = DEFAULT_DATA_ROOT) -> ad.AnnData:
        """The whole reference file (before any split)."""
        return _read(self.reference, data_root)

    @property
    def input_kw(self) -> dict:  # noqa: D102
        return {"use_raw": self.use_raw}


def subsample_reference(ref: ad.AnnData, label_key: str, n_cells: int, seed: int) -> ad.AnnData:
    """A seeded, stratified sample of ``n_cells`` reference cells, as a plate-based study would hold.

    Every type keeps its share of the cells, rounded, and at least 2 (fewer if the reference
    has fewer): a type that a 96-well plate holds twice is a type users do annotate with.
    """
    if n_cells >= ref.n_obs:
        return ref
    labels = ref.obs[label_key].astype(str).to_numpy()
    types, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    take = np.minimum(counts, np.maximum(2, np.round(counts / counts.sum() * n_cells).astype(int)))
    rows = [rng.choice(np.flatnonzero(labels == t), k, replace=False) for t, k in zip(types, take, strict=True)]
    return ref[np.sort(np.concatenate(rows))].copy()


def _read(spec: str, root: Path) -> ad.AnnData:
    if spec == "scanpy:pbmc68k_reduced":
        import scanpy as sc

        return sc.datasets.pbmc68k_reduced()
    path = Path(root) / spec
    if not path.exists():
        msg = (
            f"Benchmark file {path} not found. Pass --data-dir pointing at the datasets; each task's "
            "`sources` (README, 'Benchmark data') says where to fetch the file and its sha256."
        )
        raise FileNotFoundError(msg)
    return ad.read_h5ad(path)


def sha256(path: Path) -> str:
    """Checksum of a data file, to compare with a task's ``sources``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_CELLBENCH = "https://github.com/LuyiTian/sc_mixology (data/csv), GSE118767"
_PANCREAS = "scClassify data/scClassify_example.rda (GSE81608, GSE83139)"

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "pbmc68k_split",
            "scanpy:pbmc68k_reduced",
            "bulk_labels",
            use_raw=True,
            description="scanpy's bundled 700 PBMCs, stratified 70/30 split (no batch column)",
            sources={"scanpy:pbmc68k_reduced": "ships inside scanpy"},
        ),
        Task(
            "pancreas_xin_to_wang",
            "pancreas_xin_wang/pancreas_xin.h5ad",
            "cell_type",
            query="pancreas_xin_wang/pancreas_wang.h5ad",
            shared_genes=True,
            description="cross-study islets; ductal, stellate, acinar unseen",
            sources={
                "url": _PANCREAS,
                "pancreas_xin.h5ad": "d35c6a5493a296061eae7292cd7d3d8dfd97239e65b6e63a6c993b5e5f9486bc",
                "pancreas_wang.h5ad": "f6aba19d38cba00f0f144491f3c532277aa8af4ae2a5a3c06e2c166d5b11358a",
            },
        ),
        Task(
            "cellbench_celseq_to_dropseq",
            "cellbench_lung/cellbench_3cl.h5ad",
            "cell_line",
            batch_key="technology",
            reference_batches=("CEL-seq2",),
            query_batches=("Drop-seq",),
            description="lung cell lines, CEL-seq2 → Drop-seq",
            sources={
                "url": _CELLBENCH,
                "cellbench_3cl.h5ad": "615366b9febb99794ee114c9e3795cc467fcb5b4ed6394989ba5869bec29bf44",
            },
        ),
        Task(
            "cellbench_dropseq_to_celseq",
            "cellbench_lung/cellbench_3cl.h5ad",
            "cell_line",
            batch_key="technology",
            reference_batches=("Drop-seq",),
            query_batches=("CEL-seq2",),
            description="lung cell lines, Drop-seq → CEL-seq2",
            sources={
                "url": _CELLBENCH,
                "cellbench_3cl.h5ad": "615366b9febb99794ee114c9e3795cc467fcb5b4ed6394989ba5869bec29bf44",
            },
        ),
        Task(
            "cellbench_3cl_to_5cl",
            "cellbench_lung/cellbench_3cl.h5ad",
            "cell_line",
            query="cellbench_lung/cellbench_5cl.h5ad",
            description="open set across experiments; A549 and H838 unseen",
            sources={
                "url": _CELLBENCH,
                "cellbench_3cl.h5ad": "615366b9febb99794ee114c9e3795cc467fcb5b4ed6394989ba5869bec29bf44",
                "cellbench_5cl.h5ad": "c9a6849ed3738f91a433d8c5e5c581e1200b7ea8ccef30873eb96d2b6657afdd",
            },
        ),
        Task(
            "ifnb_control_to_stimulated",
            "pbmc_ifnb/pbmc_ifnb_kang.h5ad",
            "cell_type",
            batch_key="condition",
            reference_batches=("control",),
            query_batches=("stimulated",),
            description="PBMCs, control → IFN-β stimulated",
            sources={
                "url": "GSE96583 (theislab/scgen valid.h5ad)",
                "pbmc_ifnb_kang.h5ad": "8154680d5546b85fc75e06890bda9c14e0f3ea06d4093afa801ac7b3d2cfa5dc",
            },
        ),
        Task(
            "ifnb_stimulated_to_control",
            "pbmc_ifnb/pbmc_ifnb_kang.h5ad",
            "cell_type",
            batch_key="condition",
            reference_batches=("stimulated",),
            query_batches=("control",),
            description="PBMCs, IFN-β stimulated → control",
            sources={
                "url": "GSE96583 (theislab/scgen valid.h5ad)",
                "pbmc_ifnb_kang.h5ad": "8154680d5546b85fc75e06890bda9c14e0f3ea06d4093afa801ac7b3d2cfa5dc",
            },
        ),
        Task(
            "mesc_batch2_to_batch3",
            "mesc_batches/mesc_kolodziejczyk.h5ad",
            "cell_type",
            batch_key="batch",
            reference_batches=("batch2",),
            query_batches=("batch3",),
            description="mouse ES cells, strong batch effect",
            sources={
                "url": "E-MTAB-2600 (scMerge example_sce)",
                "mesc_kolodziejczyk.h5ad": "99e26560d50e6f44b6a4357d12fbcff1dd7a30042af4cf08424a11172d52048f",
            },
        ),
        Task(
            "mesc_batch3_to_batch2",
            "mesc_batches/mesc_kolodziejczyk.h5ad",
            "cell_type",
            batch_key="batch",
            reference_batches=("batch3",),
            query_batches=("batch2",),
            description="mouse ES cells, strong batch effect (reverse)",
            sources={
                "url": "E-MTAB-2600 (scMerge example_sce)",
                "mesc_kolodziejczyk.h5ad": "99e26560d50e6f44b6a4357d12fbcff1dd7a30042af4cf08424a11172d52048f",
            },
        ),
    ]
}
