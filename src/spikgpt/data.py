"""Reading, validating and normalising AnnData input (no torch here).

Every AnnData that enters spikgpt goes through :func:`prepare`: it picks the expression source
(``X``, a layer or ``raw``), checks it, detects its scale (:func:`input_scale`: counts, linear,
log1p, log2) and brings it to log1p of counts per 10,000, the same on reference and query.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spikgpt.errors import GeneOverlapError, InputError
from spikgpt.genes import id_kind, match

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
    scale
        The detected input scale (a key of :data:`SCALES`).
    total
        The per-cell total of ``"log1p"`` / ``"log2"`` input (else NaN).
    """

    X: sp.csr_matrix
    genes: np.ndarray
    obs_names: pd.Index
    scale: str
    total: float = np.nan


def read(data: ad.AnnData | str | os.PathLike) -> ad.AnnData:
    """Return an AnnData, reading it from an ``.h5ad`` or ``.zarr`` path if given one.

    Parameters
    ----------
    data
        An AnnData object or a path to an ``.h5ad`` file or ``.zarr`` store.

    Returns
    -------
    The AnnData (the same object when one is passed).
    """
    if isinstance(data, ad.AnnData):
        return data
    path = check_input_file(data)
    try:
        return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)
    except Exception as err:  # h5py / zarr raise several unrelated types for a damaged store
        msg = f"Could not read {path} as AnnData ({type(err).__name__}: {err})."
        raise InputError(msg) from err


def check_input_file(path: str | os.PathLike) -> Path:
    """Raise :class:`InputError` unless ``path`` is an existing ``.h5ad`` file or ``.zarr`` store."""
    path = Path(path)
    if path.suffix == ".zarr":
        if not path.is_dir():
            msg = f"Zarr store not found: {path}." if not path.exists() else f"{path} is a file, not a .zarr store."
            raise InputError(msg)
        return path
    if not path.is_file():
        msg = f"File not found: {path}." if not path.exists() else f"{path} is a folder, not an .h5ad file."
        raise InputError(msg)
    if path.suffix != ".h5ad":
        msg = (
            f"{path} is not an .h5ad file or .zarr store. spikgpt reads AnnData; convert other formats "
            "first, e.g. `scanpy.read_10x_mtx(...).write_h5ad('data.h5ad')`."
        )
        raise InputError(msg)
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path: str | os.PathLike, suffix: str, *, overwrite: bool, source: Path | None = None) -> Path:
    """Raise unless ``path`` is a writable output with ``suffix``; call before any work.

    An existing file is replaced only with ``overwrite``; the input itself and folders never are.
    """
    path = Path(path)
    if path.suffix != suffix:
        msg = f"Output {path} must end in {suffix}."
        raise InputError(msg)
    if path.is_dir():
        msg = f"Output {path} is a folder; give a file path ending in {suffix}."
        raise FileExistsError(msg)
    if path.exists() and source is not None and path.resolve() == Path(source).resolve() and not overwrite:
        msg = f"{path} is the input file; pass --overwrite to replace it."
        raise FileExistsError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} exists. Choose another output or pass overwrite=True (--overwrite)."
        raise FileExistsError(msg)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        msg = f"Cannot write {path}: {parent} is not a writable folder."
        raise FileExistsError(msg)
    return path


def write_atomic(
    path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool, suffix: str | None = None
) -> Path:
    """Write a file through ``write(tmp_path)`` and a rename, with permissions from the umask.

    The destination is checked first (:func:`check_output_file`, with ``suffix`` when given).
    """
    path = check_output_file(path, suffix or Path(path).suffix, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
    with nullable_strings():
        return write_atomic(path, adata.write_h5ad, overwrite=overwrite, suffix=".h5ad")


def nullable_strings():
    """Context in which anndata writes pandas' string arrays.

    From pandas 3 strings are stored as ``StringArray`` / ``ArrowStringArray`` (the names, labels
    and every ``obs`` column of text), which anndata writes only when asked (anndata < 0.11 cannot
    read them; spikgpt needs ≥ 0.12). Without it, writing a result fails on pandas 3.
    """
    return ad.settings.override(allow_write_nullable_strings=True)


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
    if not (isinstance(X, np.ndarray) or sp.issparse(X)):  # backed (on-disk) matrix: read it
        X = X[()] if hasattr(X, "dtype") and not hasattr(X, "format") else X[:]
    # copy=False where possible: never modify the caller's matrix below.
    X = sp.csr_matrix(X, dtype=np.float32)
    if not X.has_canonical_format:  # duplicate entries summed, as scipy reads them, on a copy
        X = X.copy()
        X.sum_duplicates()
    return X


#: What :func:`input_scale` can detect, and what spikgpt does with it.
SCALES = {
    "counts": "raw counts (integers): normalised to 10,000 per cell, then log1p",
    "linear": "non-integer values on a linear scale (e.g. ambient-corrected counts, or counts per "
    "10,000 without log): normalised to 10,000 per cell, then log1p",
    "log1p": "log1p of per-cell normalised values: kept (rescaled to 10,000 per cell if the total differs)",
    "log2": "log2(x + 1) of per-cell normalised values: converted to log1p of counts per 10,000",
    "log": "log-scale values whose per-cell totals cannot be checked (e.g. a gene panel): kept as they are",
}
#: Rows the input scale is detected on (the first ones; chunked reading detects it on the same rows).
SCALE_SAMPLE_CELLS = 2000


def input_scale(X: sp.csr_matrix) -> tuple[str, float]:
    """Detect the scale of an expression matrix.

    Integers are counts. Non-integer values above 50 cannot be on a log scale (log1p of a
    million is 13.8), so they are linear. Below that, the per-cell totals of ``expm1(x)`` or
    ``2**x - 1`` tell log1p from log2 data when they are the same for every cell (within 1 %),
    which is what per-cell normalisation produces on the whole transcriptome.

    Parameters
    ----------
    X
        Cells × genes, non-negative.

    Returns
    -------
    One of :data:`SCALES`, and the per-cell total for ``"log1p"`` / ``"log2"`` (else NaN).
    """
    rows = X[: min(X.shape[0], SCALE_SAMPLE_CELLS)]
    data = rows.data
    if data.size == 0 or np.all(data == np.round(data)):
        return "counts", np.nan
    if data.max() > 50:
        return "linear", np.nan
    for kind, inverse in (("log1p", np.expm1), ("log2", lambda v: np.exp2(v) - 1)):
        lin = rows.copy()
        lin.data = inverse(lin.data.astype(np.float64))
        totals = np.asarray(lin.sum(axis=1)).ravel()
        totals = totals[totals > 0]
        if len(totals) >= 2 and totals.std() <= 0.01 * totals.mean():
            return kind, float(np.median(totals))
    return "log", np.nan


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


def normalise(X: sp.csr_matrix, scale: str, total: float = np.nan) -> sp.csr_matrix:
    """Bring ``X``, detected as ``scale`` (see :func:`input_scale`), to log1p of counts per 10,000.

    Log-scale input whose totals cannot be checked (``"log"``) is kept as it is: re-normalising
    it would assume it is the natural log of counts over the whole transcriptome, which published
    matrices often are not (a panel of a few hundred marker genes whose per-cell total is
    dominated by one hormone gene).
    """
    if scale == "log" or (scale == "log1p" and abs(np.log10(total / TARGET_SUM)) < 0.01):
        return X.copy()
    X = X.copy()
    if scale == "log1p":
        X.data = np.expm1(X.data)
    elif scale == "log2":
        X.data = np.exp2(X.data) - 1
    totals = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    factor = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.csr_matrix(sp.diags(factor.astype(np.float32)) @ X, dtype=np.float32)
    np.log1p(X.data, out=X.data)
    return X


def prepare(
    data: ad.AnnData | str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    scale: tuple[str, float] | None = None,
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
    scale
        The input scale and per-cell total as :func:`input_scale` returns them, when already
        detected (chunks of one file must all be read the same way); detected when ``None``.

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
    if scale is None:
        kind, total = input_scale(X)
        logger.info(
            "Input looks like %s.", SCALES[kind] + (f" (per-cell total {total:.4g})" if np.isfinite(total) else "")
        )
    else:
        kind, total = scale
    return Expression(normalise(X, kind, total), genes, adata.obs_names.copy(), kind, total)


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
    found = match(genes, expr.genes)
    index = found.index
    present = index >= 0
    frac = present.mean() if len(genes) else 0.0
    if found.n_translated:
        logger.info("Gene identifiers: %s.", found.how)
    logger.info("%d of %d model genes (%.0f%%) found in the input.", present.sum(), len(genes), 100 * frac)
    if frac < min_overlap:
        kind_model, kind_input = id_kind(genes), id_kind(expr.genes)
        msg = (
            f"Only {present.sum()} of {len(genes)} model genes ({100 * frac:.0f}%) are in the input. The "
            f"model's genes are {kind_model} (e.g. {', '.join(map(str, genes[:3]))}); the input's are "
            f"{kind_input} (e.g. {', '.join(map(str, expr.genes[:3]))}). "
        )
        if kind_model != kind_input:
            msg += (
                f"Human and mouse Ensembl IDs are translated offline ({found.n_translated} were here); for "
                f"other species point gene_key (--gene-key) at a var column of the input holding {kind_model}."
            )
        else:
            msg += "Is the input from another species or gene panel? Point gene_key (--gene-key) at the right column."
        raise GeneOverlapError(msg)
    if frac < 0.5:
        logger.warning(
            "Only %.0f%% of model genes are present in the input; missing genes are treated as "
            "unmeasured (set to the reference mean after scaling). Consider training on the "
            "shared genes.",
            100 * frac,
        )
    X = sp.csr_matrix(expr.X[:, np.where(present, index, 0)], dtype=np.float32)
    if not present.all():  # drop the values of the columns standing in for absent genes
        X.data[~present[X.indices]] = 0.0
        X.eliminate_zeros()
    # Column indices stay in the input's gene order within a row (sorting them costs more than
    # the alignment; nothing downstream needs it), and without duplicates (:func:`prepare` sums them).
    return X, present


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
    scale: tuple[str, float] | None = None  # detected from the data when None (see prepare)
    _expression: Expression | None = None
    _aligned: dict = field(default_factory=dict, repr=False)

    def aligned(self, genes: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """:func:`align` of the expression to ``genes``, cached (the overlap is logged once)."""
        key = hash(tuple(map(str, genes)))
        if key not in self._aligned:
            self._aligned[key] = align(self.expression(), genes)
        return self._aligned[key]

    def expression(self) -> Expression:
        """The validated, normalised expression (cached)."""
        if self._expression is None:
            self._expression = prepare(
                self.adata, layer=self.layer, use_raw=self.use_raw, gene_key=self.gene_key, scale=self.scale
            )
        return self._expression

    def subset(self, index: np.ndarray) -> Cells:
        """The cells at integer positions ``index`` (views, no copy of the AnnData)."""
        expr = self._expression
        if expr is not None:
            expr = Expression(expr.X[index], expr.genes, expr.obs_names[index], expr.scale, expr.total)
        return Cells(self.adata[index], self.layer, self.use_raw, self.gene_key, self.scale, expr)

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.adata.n_obs

    def fitting_sample(self, max_cells: int, seed: int) -> tuple[Cells, np.ndarray]:
        """The cells an embedder is fitted on, and their positions: all of them in memory (the embedder samples)."""
        return self, np.arange(self.n_obs)

    def chunks(self):
        """The cells in pieces for embedding: one piece in memory (a file-backed reference streams)."""
        yield self
