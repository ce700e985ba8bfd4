"""Reading, validating and normalising AnnData input (no torch here).

Every AnnData that enters spikgpt goes through :func:`prepare`: it picks the expression source
(``X``, a layer or ``raw``), checks it, detects raw counts vs log-normalised values and brings
counts to log1p of counts per 10,000 (the scale log-normalised data is expected to be on),
the same on reference and query.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spikgpt.errors import GeneOverlapError, InputError

logger = logging.getLogger("spikgpt")

TARGET_SUM = 1e4


@dataclass(frozen=True)
class Expression:
    """A validated, normalised cells × genes matrix.

    Attributes
    ----------
    X
        CSR matrix (float32) of log1p counts per 10,000.
    genes
        Upper-cased, de-duplicated gene names, one per column.
    obs_names
        The cells, in input order.
    was_counts
        Whether the input looked like raw counts (else log-normalised).
    """

    X: sp.csr_matrix
    genes: np.ndarray
    obs_names: pd.Index
    was_counts: bool


def read(data: ad.AnnData | str | os.PathLike) -> ad.AnnData:
    """Return an AnnData, reading it from an ``.h5ad`` path if given one.

    Parameters
    ----------
    data
        An AnnData object or a path to an ``.h5ad`` file.

    Returns
    -------
    The AnnData (the same object when one is passed).
    """
    if isinstance(data, ad.AnnData):
        return data
    path = Path(data)
    if not path.exists():
        msg = f"File not found: {path}."
        raise InputError(msg)
    if path.suffix != ".h5ad":
        msg = (
            f"{path} is not an .h5ad file. spikgpt reads AnnData files; convert other formats "
            "first, e.g. `scanpy.read_10x_mtx(...).write_h5ad('data.h5ad')`."
        )
        raise InputError(msg)
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py raises several unrelated types for a damaged file
        msg = f"Could not read {path} as an .h5ad file ({type(err).__name__}: {err})."
        raise InputError(msg) from err


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Write ``adata`` to ``path`` via a temporary file and a rename.

    Parameters
    ----------
    adata
        What to write.
    path
        Destination ``.h5ad``.
    overwrite
        Replace an existing file. Without it an existing file is an error.

    Returns
    -------
    The destination path.
    """
    path = Path(path)
    if path.suffix != ".h5ad":
        msg = f"Output {path} must end in .h5ad."
        raise InputError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} exists. Choose another output or pass overwrite=True (--overwrite)."
        raise FileExistsError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".h5ad.tmp", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def gene_names(adata: ad.AnnData, gene_key: str | None = None, *, use_raw: bool = False) -> np.ndarray:
    """Gene names of ``adata`` as stored (``var_names`` or the ``var`` column ``gene_key``)."""
    var = adata.raw.var if use_raw else adata.var
    if gene_key is None:
        return np.asarray(var.index.astype(str))
    if gene_key not in var.columns:
        msg = (
            f"Gene column {gene_key!r} not found in var. Available columns: "
            f"{list(var.columns)}. Omit the gene key to use var_names."
        )
        raise InputError(msg)
    return np.asarray(var[gene_key].astype(str))


def _matrix(adata: ad.AnnData, layer: str | None, use_raw: bool) -> sp.csr_matrix:
    if use_raw and layer is not None:
        msg = "Choose either a layer or raw, not both."
        raise InputError(msg)
    if use_raw:
        if adata.raw is None:
            msg = "use_raw=True but the AnnData has no .raw. Use X (default) or a layer."
            raise InputError(msg)
        X = adata.raw.X
    elif layer is not None:
        if layer not in adata.layers:
            msg = f"Layer {layer!r} not found. Available layers: {list(adata.layers)}."
            raise InputError(msg)
        X = adata.layers[layer]
    else:
        X = adata.X
    if X is None:
        msg = "The AnnData has no expression matrix in X. Pass a layer or use raw."
        raise InputError(msg)
    # copy=False where possible: never modify the caller's matrix below.
    return sp.csr_matrix(X, dtype=np.float32)


def looks_like_counts(X: sp.csr_matrix) -> bool:
    """Whether the stored values are non-negative integers (raw counts)."""
    sample = X.data[:1_000_000]
    return bool(sample.size == 0 or np.all(sample == np.round(sample)))


def validate(adata: ad.AnnData, X: sp.csr_matrix, genes: np.ndarray) -> None:
    """Raise :class:`InputError` for an unusable matrix; see :func:`prepare`."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"The AnnData is empty ({adata.n_obs} cells × {adata.n_vars} genes)."
        raise InputError(msg)
    if not np.all(np.isfinite(X.data)):
        n_bad = int((~np.isfinite(X.data)).sum())
        msg = (
            f"The expression matrix holds {n_bad} NaN/inf values. Remove or impute them "
            "(e.g. `adata.X = np.nan_to_num(adata.X)`) before running spikgpt."
        )
        raise InputError(msg)
    if X.data.size and X.data.min() < 0:
        msg = (
            f"The expression matrix has negative values (min {X.data.min():.3g}): it looks "
            "scaled or batch-corrected. spikgpt needs raw counts or log-normalised values: "
            "pass `use_raw=True` (--use-raw) or `layer=` (--layer) to point at them."
        )
        raise InputError(msg)
    dup = pd.Index(genes).duplicated()
    if dup.any():
        logger.warning(
            "%d duplicate gene names (e.g. %s); keeping the first of each. Make them unique "
            "with `adata.var_names_make_unique()` to silence this.",
            int(dup.sum()),
            ", ".join(map(str, pd.unique(genes[dup])[:3])),
        )


def normalise(X: sp.csr_matrix, *, counts: bool) -> sp.csr_matrix:
    """Bring ``X`` to log1p of counts per 10,000.

    Raw counts are normalised per cell and log1p-transformed. Log-normalised input is kept as
    it is: re-normalising it would assume it is the natural log of counts over the whole
    transcriptome, which published matrices often are not (log2 values, or a panel of a few
    hundred marker genes whose per-cell total is dominated by one hormone gene).
    """
    if not counts:
        return X.copy()
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ X, dtype=np.float32)
    np.log1p(X.data, out=X.data)
    return X


def prepare(
    data: ad.AnnData | str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
) -> Expression:
    """Read, validate and normalise the expression of ``data``; ``data`` is not modified.

    Parameters
    ----------
    data
        AnnData or ``.h5ad`` path.
    layer
        Take expression from ``layers[layer]`` instead of ``X``.
    use_raw
        Take expression from ``raw``.
    gene_key
        ``var`` column with gene symbols; ``var_names`` when ``None``.

    Returns
    -------
    The normalised :class:`Expression`.
    """
    adata = read(data)
    X = _matrix(adata, layer, use_raw)
    genes = np.char.upper(gene_names(adata, gene_key, use_raw=use_raw).astype(str))
    validate(adata, X, genes)
    keep = ~pd.Index(genes).duplicated()
    if not keep.all():
        X, genes = X[:, keep], genes[keep]
    counts = looks_like_counts(X)
    logger.info("Input looks like %s.", "raw counts" if counts else "log-normalised values")
    return Expression(normalise(X, counts=counts), genes, adata.obs_names.copy(), counts)


def align(expr: Expression, genes: np.ndarray, *, min_overlap: float = 0.1) -> tuple[sp.csr_matrix, np.ndarray]:
    """Reorder ``expr``'s columns to ``genes``; genes it lacks come out as all-zero columns.

    Parameters
    ----------
    expr
        Prepared input.
    genes
        The target gene order (upper case, unique), e.g. a model's genes.
    min_overlap
        Smallest fraction of ``genes`` that must be present.

    Returns
    -------
    The aligned CSR matrix and a boolean mask of which target genes were present.
    """
    index = pd.Index(expr.genes).get_indexer(genes)
    present = index >= 0
    frac = present.mean() if len(genes) else 0.0
    logger.info("%d of %d model genes (%.0f%%) found in the input.", present.sum(), len(genes), 100 * frac)
    if frac < min_overlap:
        example = ", ".join(map(str, expr.genes[:3]))
        msg = (
            f"Only {present.sum()} of {len(genes)} model genes ({100 * frac:.0f}%) are in the "
            f"input (its genes look like: {example}). Are they Ensembl IDs or another species? "
            "Point at a var column with gene symbols via gene_key (--gene-key)."
        )
        raise GeneOverlapError(msg)
    if frac < 0.5:
        logger.warning(
            "Only %.0f%% of model genes are present in the input; missing genes are treated as "
            "unmeasured (set to the reference mean after scaling). Consider training on the "
            "shared genes.",
            100 * frac,
        )
    cols = np.where(present, index, 0)
    X = expr.X[:, cols].tocsc()
    # Zero out the columns standing in for absent genes.
    X = X @ sp.diags(present.astype(np.float32))
    return sp.csr_matrix(X, dtype=np.float32), present


@dataclass
class Cells:
    """An AnnData plus where to read its expression; the normalised matrix is computed once.

    Embedders take a :class:`Cells` so that cross-fitting can subset cells without
    re-reading or re-normalising.
    """

    adata: ad.AnnData
    layer: str | None = None
    use_raw: bool = False
    gene_key: str | None = None
    _expression: Expression | None = None

    def expression(self) -> Expression:
        """The validated, normalised expression (cached)."""
        if self._expression is None:
            self._expression = prepare(self.adata, layer=self.layer, use_raw=self.use_raw, gene_key=self.gene_key)
        return self._expression

    def subset(self, index: np.ndarray) -> Cells:
        """The cells at integer positions ``index`` (views, no copy of the AnnData)."""
        expr = self._expression
        if expr is not None:
            expr = Expression(expr.X[index], expr.genes, expr.obs_names[index], expr.was_counts)
        return Cells(self.adata[index], self.layer, self.use_raw, self.gene_key, expr)

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.adata.n_obs
