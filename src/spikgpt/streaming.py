"""Annotating an ``.h5ad`` query too large for memory, chunk by chunk.

:func:`annotate_file` never holds the expression matrix: it reads rows from the file
(``h5py`` + anndata's backed sparse datasets) and runs the model's steps
(:meth:`~spikgpt.SpikGPTModel.predict`) in three passes:

1. the mapping sample (:func:`spikgpt.mapping.query_sample`, ≤ 2,000 cells spread over the file)
   is read, embedded and the query → reference translation estimated; the input scale is
   detected on the first rows, as in memory;
2. every chunk of ``chunk_size`` cells is normalised, embedded, mapped, classified and scored for
   novelty; its embedding is written straight into the output file;
3. the Unknown decision (global shift correction, Benjamini–Hochberg) runs over the per-cell
   scores of the whole query — a few numbers per cell.

The output is a copy of the input file with the ``obs`` columns, ``obsm`` embedding and ``uns``
entry of :func:`spikgpt.annotate` added, written through a temporary file and a rename. Labels and
scores equal the in-memory path's when every cell embeds (the default embedder always does;
tested). Memory: the chunk (matrix, embedding, network activations) plus ~50 bytes per cell.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem
from tqdm.auto import tqdm

from spikgpt.data import Cells, check_input_file, write_atomic
from spikgpt.errors import InputError
from spikgpt.mapping import query_sample
from spikgpt.model import SpikGPTModel
from spikgpt.openset.decision import check_fdr, check_shift
from spikgpt.openset.novelty import score_names

logger = logging.getLogger(__name__)

#: Cells read, embedded and classified at once.
DEFAULT_CHUNK_SIZE = 20_000


class QueryFile:
    """Rows of an open ``.h5ad`` file's expression (``X``, a layer or ``raw``) and its ``var``."""

    def __init__(self, f: h5py.File, *, layer: str | None = None, use_raw: bool = False) -> None:
        if use_raw and "raw" not in f:
            raise InputError("use_raw=True but the file has no raw. Drop --use-raw or store raw counts in raw.")
        key = "raw/X" if use_raw else (f"layers/{layer}" if layer else "X")
        if key not in f:
            raise InputError(f"The file has no {key}. Available layers: {sorted(f.get('layers', {}))}.")
        elem = f[key]
        self.matrix = sparse_dataset(elem) if isinstance(elem, h5py.Group) else elem
        self.var = read_elem(f["raw/var" if use_raw else "var"])
        self.obs_names = pd.Index(read_elem(f["obs"]).index)
        self.n_obs = len(self.obs_names)

    def rows(self, index: slice | np.ndarray) -> ad.AnnData:
        """The cells at ``index`` (a slice or sorted positions) in memory, with this file's ``var``."""
        X = self.matrix[index]
        X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        return ad.AnnData(X, obs=pd.DataFrame(index=self.obs_names[index]), var=self.var)


@contextmanager
def _open(path: Path, mode: str = "r"):
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise InputError(f"Cannot read {path} as .h5ad (HDF5): {err}. Is it a complete .h5ad file?") from err
    try:
        yield f
    finally:
        f.close()


def annotate_file(
    query: str | os.PathLike,
    model: SpikGPTModel | str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    novelty: str | None = None,
    fdr: float | None = None,
    mapping: bool | None = None,
    shift: str | None = None,
    key_added: str = "spikgpt",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Annotate an ``.h5ad`` file chunk by chunk and write the annotated copy to ``out``.

    Same results and keys as :func:`spikgpt.annotate` (see there), in memory bounded by
    ``chunk_size`` rather than by the query. The input file is not modified.

    Parameters
    ----------
    query
        Input ``.h5ad``.
    model
        A :class:`~spikgpt.SpikGPTModel` or a model folder.
    out
        Output ``.h5ad``: the input plus the annotation.
    layer, use_raw, gene_key, novelty, fdr, mapping, shift, key_added
        As in :func:`spikgpt.annotate`.
    chunk_size
        Cells per chunk (memory grows with it; results do not change).
    overwrite
        Replace an existing ``out``.
    progress
        Progress bar over chunks (terminal only).

    Returns
    -------
    The ``obs`` columns written (one row per cell).
    """
    from spikgpt.api import annotation_columns, annotation_summary, warn_if_mostly_unknown

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size}).")
    if shift is not None:
        check_shift(shift)
    path = check_input_file(query)
    model = SpikGPTModel.coerce(model)
    fdr = model.fdr if fdr is None else float(fdr)
    check_fdr(fdr)
    method = novelty or model.novelty_method
    names = score_names(method, model.novelty_components)
    use_mapping = model.mapping if mapping is None else mapping
    t0 = time.perf_counter()
    with _open(path) as f:
        src = QueryFile(f, layer=layer, use_raw=use_raw)
        n = src.n_obs
        if n == 0:
            raise InputError(f"{path} has no cells. Pass a query with at least one cell.")
        first = src.rows(slice(0, min(n, chunk_size)))
        scale = _scale_of(first, gene_key)

        def cells(a: ad.AnnData) -> Cells:
            return Cells(a, gene_key=gene_key, scale=scale)

        mapped = None
        if use_mapping and model.novelty is not None:
            rows = query_sample(n)
            E_s, _ = model.embed(cells(src.rows(rows)), names)
            ok = np.isfinite(E_s).all(axis=1)
            mapped = model.map_query(E_s, n_query=n) if ok.all() else model.map_query(E_s[ok])

        label_parts, conf, raw = [], np.zeros(n, np.float32), np.empty(n, dtype=object)
        embedded = np.zeros(n, dtype=bool)
        scores: dict[str, list[np.ndarray]] = {name: [] for name in names}
        starts = range(0, n, chunk_size)

        def write(tmp: str) -> None:
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "r+") as g:
                obsm = g.require_group("obsm")
                if f"X_{key_added}_embedding" in obsm:
                    del obsm[f"X_{key_added}_embedding"]
                ds = None
                for s in tqdm(starts, desc="annotating", unit="chunk", disable=None if progress else True):
                    chunk = first if s == 0 else src.rows(slice(s, min(n, s + chunk_size)))
                    E, residual = model.embed(cells(chunk), names)
                    part = model.classify(E, residual, mapped, names)
                    stop = s + len(E)
                    conf[s:stop], raw[s:stop], embedded[s:stop] = part.confidence, part.raw_label, part.embedded
                    for name in names:
                        scores[name].append(part.scores.get(name, np.zeros(0)))
                    if ds is None:
                        ds = obsm.create_dataset(
                            f"X_{key_added}_embedding",
                            shape=(n, E.shape[1]),
                            dtype=np.float32,
                            chunks=(min(n, 4096), E.shape[1]),
                        )
                        ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
                    ds[s:stop] = part.embedding.astype(np.float32)
                joined = {name: np.concatenate(v) for name, v in scores.items()} if model.novelty else {}
                pvalue, qvalue, unknown, reason, removed = model.decide_unknown(joined, embedded, names, fdr, shift)
                obs = read_elem(g["obs"])
                cols = annotation_columns(model, raw, conf, pvalue, qvalue, unknown, reason, key_added)
                cols.index = obs.index
                obs = pd.concat([obs.drop(columns=cols.columns, errors="ignore"), cols], axis=1)
                del g["obs"]
                write_elem(g, "obs", obs)
                label_parts.append(cols)
                summary = annotation_summary(
                    model,
                    method,
                    fdr,
                    mapped,
                    shift,
                    removed,
                    unknown,
                    embedded,
                    {"layer": layer, "use_raw": use_raw, "gene_key": gene_key},
                    time.perf_counter() - t0,
                )
                uns = g.require_group("uns")
                if key_added in uns:
                    del uns[key_added]
                write_elem(uns, key_added, summary)

        write_atomic(out, write, overwrite=overwrite, suffix=".h5ad")
    result = label_parts[0]
    warn_if_mostly_unknown(result[f"{key_added}_label"].to_numpy() == "Unknown", key_added)
    logger.info(
        "Annotated %d cells in chunks of %d; %d Unknown at FDR %.2f.",
        n,
        chunk_size,
        int((result[f"{key_added}_label"] == "Unknown").sum()),
        fdr,
    )
    return result


def _scale_of(first: ad.AnnData, gene_key: str | None) -> tuple[str, float]:
    """The input scale detected on the first rows, as the in-memory path detects it."""
    expr = Cells(first, gene_key=gene_key).expression()
    return expr.scale, expr.total
