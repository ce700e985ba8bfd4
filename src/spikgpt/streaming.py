"""Annotating a query too large for memory, chunk by chunk, on one machine or a Dask cluster.

:func:`annotate_file` never holds the expression matrix: it reads rows from an ``.h5ad`` file or
a ``.zarr`` store (anndata's backed sparse datasets) and runs the model's steps
(:meth:`~spikgpt.SpikGPTModel.predict`) in three passes:

1. the mapping sample (:func:`spikgpt.mapping.query_sample`, ≤ 2,000 cells spread over the
   store) is read, embedded and the query → reference translation estimated; the input scale is
   detected on the first rows, as in memory;
2. every chunk of ``chunk_size`` cells is normalised, embedded, mapped, classified and scored for
   novelty, in this process or, given a ``dask.distributed`` client, on the cluster's workers
   (each opens the store and the model folder itself); the chunk's embedding goes straight into
   the output;
3. the Unknown decision (global shift correction, Benjamini–Hochberg) runs over the per-cell
   scores of the whole query — a few numbers per cell.

The output is a copy of the input with the ``obs`` columns, ``obsm`` embedding and ``uns`` entry
of :func:`spikgpt.annotate` added, written under a temporary name and renamed. Labels and scores
equal the in-memory path's when every cell embeds (the default embedder always does; tested).
Memory: the chunk (matrix, embedding, network activations) plus ~60 bytes per cell.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, sparse_dataset, write_elem
from tqdm.auto import tqdm

from spikgpt.data import SCALE_SAMPLE_CELLS, Cells, check_input_file, check_output_file, current_umask, nullable_strings
from spikgpt.embed.default import DefaultEmbedder
from spikgpt.embed.obsm import ObsmEmbedder
from spikgpt.errors import InputError
from spikgpt.mapping import Mapping, query_sample
from spikgpt.model import SpikGPTModel
from spikgpt.model.annotator import is_model_folder
from spikgpt.openset.decision import MAX_NEIGHBOURHOOD_CELLS, check_false_unknown, check_fdr, check_shift

logger = logging.getLogger(__name__)

#: Cells read, embedded and classified at once.
DEFAULT_CHUNK_SIZE = 20_000


def open_store(path: Path, mode: str = "r") -> Any:
    """An ``.h5ad`` file (h5py) or ``.zarr`` store (zarr group), with a clear error when unreadable."""
    try:
        if path.suffix == ".zarr":
            # anndata consolidates a store's metadata; an edited copy is re-consolidated after writing.
            return zarr.open_group(path, mode=mode, use_consolidated=False if mode != "r" else None)
        return h5py.File(path, mode)
    except Exception as err:  # h5py / zarr raise several unrelated types
        msg = f"Could not read {path} as AnnData ({type(err).__name__}: {err}). Is it a complete .h5ad / .zarr?"
        raise InputError(msg) from err


def close_store(store: Any) -> None:
    """Close what :func:`open_store` opened (a zarr group needs no closing)."""
    if isinstance(store, h5py.File):
        store.close()


def obs_index(store: Any) -> pd.Index:
    """The cell names of an open store, read without the rest of ``obs``."""
    obs = store["obs"]
    index = obs.attrs.get("_index")
    if index is not None and index in obs:
        # named as anndata names it when it reads the whole obs
        return pd.Index(read_elem(obs[index]), name=None if index == "_index" else index)
    return read_elem(obs).index


class QueryStore:
    """Rows of an open store's expression (``X``, a layer or ``raw``), its ``var`` and cell names."""

    def __init__(
        self, store: Any, *, layer: str | None = None, use_raw: bool = False, obsm_keys: tuple[str, ...] = ()
    ) -> None:
        if use_raw and "raw" not in store:
            raise InputError("use_raw=True but the query has no raw. Drop --use-raw or store raw counts in raw.")
        key = "raw/X" if use_raw else (f"layers/{layer}" if layer else "X")
        if key not in store:
            layers = sorted(store["layers"].keys()) if "layers" in store else []
            raise InputError(f"The query has no {key}. Available layers: {layers}.")
        elem = store[key]
        encoding = elem.attrs.get("encoding-type", "array")
        if encoding == "csc_matrix":
            msg = (
                f"The query's {key} is stored column-wise (CSC): cells cannot be read in chunks. Store it "
                "row-wise: `adata.X = adata.X.tocsr(); adata.write_h5ad(...)`."
            )
            raise InputError(msg)
        self.matrix = sparse_dataset(elem) if encoding == "csr_matrix" else elem
        self.var = read_elem(store["raw/var" if use_raw else "var"])
        self.obs_names = obs_index(store)
        self.n_obs = len(self.obs_names)
        # Embeddings an obsm-based model reads (absent keys are reported by the embedder).
        held = store["obsm"] if "obsm" in store else {}
        self.obsm = {k: held[k] for k in obsm_keys if k in held}

    def scale(self, gene_key: str | None) -> tuple[str, float]:
        """The input scale, detected on the first rows exactly as the in-memory path detects it."""
        first = Cells(self.rows(slice(0, min(self.n_obs, SCALE_SAMPLE_CELLS))), gene_key=gene_key).expression()
        return first.scale, first.total

    def rows(self, index: slice | np.ndarray) -> ad.AnnData:
        """The cells at ``index`` (a slice or sorted positions) in memory, with the store's ``var``."""
        X = _take(self.matrix, index)
        X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        obsm = {k: np.asarray(_take(v, index)) for k, v in self.obsm.items()}
        return ad.AnnData(X, obs=pd.DataFrame(index=self.obs_names[index]), var=self.var, obsm=obsm)


def _take(elem: Any, index: slice | np.ndarray) -> Any:
    """Rows ``index`` of a backed sparse dataset, h5py dataset or zarr array."""
    return elem.oindex[index] if isinstance(index, np.ndarray) and hasattr(elem, "oindex") else elem[index]


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk needs besides its rows: where to read, and the query-wide settings."""

    query: str
    layer: str | None
    use_raw: bool
    gene_key: str | None
    scale: tuple[str, float] | None
    names: tuple[str, ...]
    mapping: Mapping | None
    obsm_keys: tuple[str, ...] = ()
    keep_positions: bool = True  # fold positions back to the collector (queries small enough for the test)


@dataclass
class ChunkResult:
    """Per-cell outputs of one chunk (positions ``start:start + len``)."""

    start: int
    confidence: np.ndarray
    raw_label: np.ndarray
    embedded: np.ndarray
    scores: dict[str, np.ndarray]
    embedding: np.ndarray
    fold_positions: np.ndarray | None = None  # [k, embedded cells, d] (:attr:`Classified.fold_positions`)


def run_chunk(
    job: ChunkJob, model: SpikGPTModel, start: int, stop: int, source: QueryStore | None = None
) -> ChunkResult:
    """Classify and score the cells ``start:stop`` of ``job.query`` (opened here unless ``source`` is given)."""
    store = None
    if source is None:
        store = open_store(Path(job.query))
        source = QueryStore(store, layer=job.layer, use_raw=job.use_raw, obsm_keys=job.obsm_keys)
    try:
        cells = Cells(source.rows(slice(start, stop)), gene_key=job.gene_key, scale=job.scale)
        E, residual = model.embed(cells, job.names)
    finally:
        if store is not None:
            close_store(store)
    part = model.classify(E, residual, job.mapping, job.names, cells=cells, positions=job.keep_positions)
    return ChunkResult(
        start,
        part.confidence,
        part.raw_label,
        part.embedded,
        part.scores,
        part.embedding.astype(np.float32),
        part.fold_positions if job.keep_positions else None,
    )


@functools.lru_cache(maxsize=2)
def _worker_model(path: str) -> SpikGPTModel:
    return SpikGPTModel.load(path)


def _fetch(future: Any) -> ChunkResult:
    """A finished chunk's result, released from the cluster's memory."""
    result = future.result()
    future.release()
    return result


def _run_chunk_on_worker(job: ChunkJob, model_path: str, start: int, stop: int) -> ChunkResult:
    return run_chunk(job, _worker_model(model_path), start, stop)


def check_output_store(path: str | os.PathLike, suffix: str, *, overwrite: bool) -> Path:
    """:func:`~spikgpt.data.check_output_file` for ``.h5ad``; for ``.zarr`` only a store is ever replaced."""
    path = Path(path)
    if suffix != ".zarr":
        return check_output_file(path, suffix, overwrite=overwrite)
    if path.suffix != ".zarr":
        raise InputError(f"Output {path} must end in .zarr (the query is a .zarr store).")
    if path.exists():
        if not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
            raise FileExistsError(f"{path} exists and is not a Zarr store; it is left untouched.")
        if not overwrite:
            raise FileExistsError(f"{path} exists. Choose another output or pass overwrite=True (--overwrite).")
    return path


def _new_dense(group: Any, name: str, shape: tuple[int, int]) -> Any:
    """An empty float32 array ``group[name]`` in anndata's dense-array encoding, chunked by cells."""
    if name in group:
        del group[name]
    chunks = (max(1, min(shape[0], 4096)), shape[1])
    if isinstance(group, h5py.Group):
        arr = group.create_dataset(name, shape=shape, dtype=np.float32, chunks=chunks)
    else:
        arr = group.create_array(name, shape=shape, dtype=np.float32, chunks=chunks)
    arr.attrs["encoding-type"], arr.attrs["encoding-version"] = "array", "0.2.0"
    return arr


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
    false_unknown: float | None = None,
    key_added: str = "spikgpt",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    client: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Annotate an ``.h5ad`` file or ``.zarr`` store chunk by chunk; write the annotated copy to ``out``.

    Same results and keys as :func:`spikgpt.annotate` (see there), in memory bounded by
    ``chunk_size`` rather than by the query. The input is not modified.

    Parameters
    ----------
    query
        Input ``.h5ad`` or ``.zarr``.
    model
        A :class:`~spikgpt.SpikGPTModel` or a model folder (a folder when ``client`` is given, so
        that workers load it themselves; a model object is then saved beside ``out`` first).
    out
        Output of the same format as ``query``: the input plus the annotation.
    layer, use_raw, gene_key, novelty, fdr, mapping, shift, false_unknown, key_added
        As in :func:`spikgpt.annotate`.
    chunk_size
        Cells per chunk (memory grows with it; results do not change).
    client
        A ``dask.distributed.Client``: chunks are classified on its workers, which must see
        ``query`` and the model folder at the same paths (a shared file system or one machine).
    overwrite
        Replace an existing ``out``.
    progress
        Progress bar over chunks (terminal only).

    Returns
    -------
    The ``obs`` columns written (one row per cell).
    """
    from spikgpt.api import annotation_columns, annotation_summary, rule_text, warn_if_mostly_unknown

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size}).")
    if shift is not None:
        check_shift(shift)
    path = check_input_file(query)
    out = check_output_store(out, path.suffix, overwrite=overwrite)
    model_path = None if isinstance(model, SpikGPTModel) else Path(model)
    model = SpikGPTModel.coerce(model)
    fdr = model.fdr if fdr is None else float(fdr)
    check_fdr(fdr)
    if false_unknown is not None:
        check_false_unknown(false_unknown)
    method = novelty or model.novelty_method
    names = model.score_names(method)
    use_mapping = model.mapping if mapping is None else mapping
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        store = open_store(path)
        try:
            obsm_keys = (model.embedder.key,) if isinstance(model.embedder, ObsmEmbedder) else ()
            src = QueryStore(store, layer=layer, use_raw=use_raw, obsm_keys=obsm_keys)
            n = src.n_obs
            if n == 0:
                raise InputError(f"{path} has no cells. Pass a query with at least one cell.")
            # Only the default embedder reads the normalised matrix.
            scale = src.scale(gene_key) if isinstance(model.embedder, DefaultEmbedder) else None
            mapped, matched = None, None
            if use_mapping and model.novelty is not None:
                rows = query_sample(n)
                sample = Cells(src.rows(rows), gene_key=gene_key, scale=scale)
                E_s, _ = model.embed(sample, names)
                ok = np.isfinite(E_s).all(axis=1)
                if ok.all():
                    mapped = model.map_query(E_s, n_query=n, cells=sample)
                else:
                    mapped = model.map_query(E_s[ok], cells=sample)
                matched = None if mapped is None else mapped.matched
                if mapped is not None and not ok.all():  # matched over the sample's embedded cells
                    matched = np.zeros(n, dtype=bool)
                    matched[rows[ok]] = mapped.matched
            job = ChunkJob(
                str(path), layer, use_raw, gene_key, scale, names, mapped, obsm_keys, n <= MAX_NEIGHBOURHOOD_CELLS
            )
            bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
            if client is None:
                results = (run_chunk(job, model, s, e, src) for s, e in bounds)
            else:
                if model_path is None or not is_model_folder(model_path):
                    model_path = model.save(tmp / "model")
                from distributed import as_completed

                done = as_completed(
                    [client.submit(_run_chunk_on_worker, job, str(model_path), s, e, pure=False) for s, e in bounds]
                )
                results = (_fetch(f) for f in done)
            written = tmp / f"annotated{path.suffix}"
            if path.suffix == ".zarr":
                shutil.copytree(path, written)
            else:
                shutil.copyfile(path, written)
            out_store = open_store(written, "r+")
            try:
                acc = _collect(out_store, results, len(bounds), n, names, key_added, progress)
                pvalue, qvalue, unknown, reason, removed = model.decide_unknown(
                    acc.scores if model.novelty is not None else {},
                    acc.embedded,
                    names,
                    fdr,
                    shift,
                    matched=None if matched is None else matched[acc.embedded],
                    false_unknown=false_unknown,
                    labels=acc.raw_label,
                    embedding=acc.embedding,
                    fold_positions=acc.fold_positions,
                    progress=progress,
                )
                cols = annotation_columns(
                    model, acc.raw_label, acc.confidence, pvalue, qvalue, unknown, reason, key_added
                )
                cols.index = src.obs_names
                obs = read_elem(out_store["obs"])
                obs = pd.concat([obs.drop(columns=cols.columns, errors="ignore"), cols.set_axis(obs.index)], axis=1)
                del out_store["obs"]
                with nullable_strings():
                    write_elem(out_store, "obs", obs)
                uns = out_store["uns"] if "uns" in out_store else out_store.create_group("uns")
                if key_added in uns:
                    del uns[key_added]
                source = {"layer": layer, "use_raw": use_raw, "gene_key": gene_key}
                summary = annotation_summary(
                    model,
                    method,
                    fdr,
                    mapped,
                    shift,
                    removed,
                    unknown,
                    acc.embedded,
                    source,
                    time.perf_counter() - t0,
                    false_unknown,
                )
                with nullable_strings():
                    write_elem(uns, key_added, summary)
            finally:
                close_store(out_store)
            if written.suffix == ".zarr":
                zarr.consolidate_metadata(str(written))
        finally:
            close_store(store)
        _replace(written, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warn_if_mostly_unknown(unknown, key_added, acc.raw_label)
    logger.info(
        "Annotated %d cells in %d chunks; %d Unknown %s.",
        n,
        len(bounds),
        int(unknown.sum()),
        rule_text(fdr, false_unknown),
    )
    return cols


@dataclass
class _Collected:
    confidence: np.ndarray
    raw_label: np.ndarray
    embedded: np.ndarray
    scores: dict[str, np.ndarray]
    embedding: np.ndarray | None  # kept for the neighbourhood test on queries small enough for it
    fold_positions: np.ndarray | None  # a cross-fitted model's, likewise (over the embedded cells)


def _collect(
    out_store: Any, results, n_chunks: int, n: int, names: tuple[str, ...], key_added: str, progress: bool
) -> _Collected:
    """Write each chunk's embedding into ``out_store`` as it arrives; keep its per-cell numbers."""
    conf, raw = np.zeros(n, np.float32), np.empty(n, dtype=object)
    embedded = np.zeros(n, dtype=bool)
    parts: dict[int, dict[str, np.ndarray]] = {}
    fold_parts: dict[int, np.ndarray | None] = {}
    obsm = out_store["obsm"] if "obsm" in out_store else out_store.create_group("obsm")
    arr, kept = None, None
    for r in tqdm(results, total=n_chunks, desc="annotating", unit="chunk", disable=None if progress else True):
        stop = r.start + len(r.confidence)
        conf[r.start : stop], raw[r.start : stop], embedded[r.start : stop] = r.confidence, r.raw_label, r.embedded
        parts[r.start] = r.scores
        if n <= MAX_NEIGHBOURHOOD_CELLS and r.embedded.any():
            fold_parts[r.start] = r.fold_positions
        if arr is None:
            arr = _new_dense(obsm, f"X_{key_added}_embedding", (n, r.embedding.shape[1]))
        arr[r.start : stop] = r.embedding
        if n <= MAX_NEIGHBOURHOOD_CELLS:
            if kept is None:
                kept = np.zeros((n, r.embedding.shape[1]), np.float32)
            kept[r.start : stop] = r.embedding
    # Chunks may arrive out of order (a cluster); the scores of embedded cells are joined in cell order.
    scores = {name: np.concatenate([parts[k].get(name, np.zeros(0)) for k in sorted(parts)]) for name in names}
    folds = [fold_parts[k] for k in sorted(fold_parts) if fold_parts[k] is not None]
    fold_positions = np.concatenate(folds, axis=1) if folds and len(folds) == len(fold_parts) else None
    return _Collected(conf, raw, embedded, scores, kept, fold_positions)


def _replace(written: Path, out: Path) -> None:
    """Move the finished output into place (its permissions from the umask)."""
    mode = 0o777 if written.is_dir() else 0o666
    os.chmod(written, mode & ~current_umask())
    if out.is_dir():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
        os.replace(written, out)
        shutil.rmtree(old)
    else:
        os.replace(written, out)


#: A reference file with more cells than this trains from the file, read in chunks
#: (:class:`StoredCells`); smaller ones are read into memory.
STREAM_REFERENCE_CELLS = 50_000


class StoredCells:
    """Cells of a store read on demand: what :func:`spikgpt.train` uses for atlas references.

    Only a seeded sample (``fitting_sample``) and one chunk at a time (``chunks``) are ever in
    memory; every cell's expression is validated as its chunk is read.
    """

    def __init__(
        self,
        source: QueryStore,
        rows: np.ndarray,
        *,
        gene_key: str | None,
        scale: tuple[str, float],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.source, self.rows, self.gene_key, self.scale, self.chunk_size = source, rows, gene_key, scale, chunk_size

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return len(self.rows)

    def subset(self, index: np.ndarray) -> StoredCells:
        """The cells at positions ``index`` (still on disk)."""
        return StoredCells(
            self.source, self.rows[index], gene_key=self.gene_key, scale=self.scale, chunk_size=self.chunk_size
        )

    def _read(self, rows: np.ndarray) -> Cells:
        order = np.argsort(rows)  # stores read increasing rows
        cells = Cells(self.source.rows(rows[order]), gene_key=self.gene_key, scale=self.scale)
        return cells if (order == np.arange(len(order))).all() else cells.subset(np.argsort(order))

    def fitting_sample(self, max_cells: int, seed: int) -> tuple[Cells, np.ndarray]:
        """At most ``max_cells`` of these cells (seeded), in memory, for fitting the embedder, and their positions."""
        pick = np.arange(self.n_obs)
        if self.n_obs > max_cells:
            pick = np.sort(np.random.default_rng(seed).choice(self.n_obs, max_cells, replace=False))
        return self._read(self.rows[pick]), pick

    def chunks(self):
        """These cells as in-memory :class:`~spikgpt.data.Cells`, ``chunk_size`` at a time, in order."""
        for s in range(0, self.n_obs, self.chunk_size):
            yield self._read(self.rows[s : s + self.chunk_size])


@contextmanager
def stored_reference(
    path: Path, *, layer: str | None, use_raw: bool, gene_key: str | None, obsm_keys: tuple[str, ...] = ()
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame, StoredCells]]:
    """``obs``, ``var`` and the :class:`StoredCells` of a reference store, open for the block."""
    store = open_store(path)
    try:
        src = QueryStore(store, layer=layer, use_raw=use_raw, obsm_keys=obsm_keys)
        if src.n_obs == 0:
            raise InputError(f"{path} has no cells. Pass a reference with at least one cell.")
        cells = StoredCells(
            src,
            np.arange(src.n_obs),
            gene_key=gene_key,
            scale=src.scale(gene_key),
            chunk_size=DEFAULT_CHUNK_SIZE,
        )
        yield read_elem(store["obs"]), src.var, cells
    finally:
        close_store(store)
