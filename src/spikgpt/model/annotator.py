""":class:`SpikGPTModel`: a fitted embedder, the spiking classifier and the calibrated Unknown rule.

Saved as a folder of ``config.json`` and safetensors files; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch
from threadpoolctl import threadpool_info, threadpool_limits
from tqdm.auto import tqdm

from spikgpt import __version__
from spikgpt.data import Cells, current_umask
from spikgpt.embed import Embedder, embedder_from_config
from spikgpt.errors import ModelFormatError
from spikgpt.mapping import Mapping, estimate_mapping, query_sample
from spikgpt.model.network import NetworkConfig, SpikingEnsemble
from spikgpt.model.training import TrainConfig
from spikgpt.openset.decision import (
    DEFAULT_FDR,
    DEFAULT_SHIFT,
    MAX_NEIGHBOURHOOD_CELLS,
    calibration_statistic,
    check_fdr,
    check_shift,
    decide,
    neighbourhoods_tested,
    smallest_pvalue,
    unreachable_unknown,
)
from spikgpt.openset.novelty import (
    DEFAULT_COMBINATION,
    NETWORK_SCORES,
    SCORES,
    CellOutputs,
    NoveltyScorer,
    score_names,
)
from spikgpt.snn import LIF

logger = logging.getLogger("spikgpt")

FORMAT = "spikgpt-model"
#: 7: fold models may have no classifier network (``"network": null``, no network weights in
#: ``weights.safetensors``): since 0.23 cross-fitted models whose novelty score reads none train
#: none; 6: cross-fitted models keep their fold models (``folds/0``, ``folds/1``, …), which score the
#: query (since 0.22 each fold model also keeps its held-out cells' scores and positions, which
#: older readers ignore: such a model decides there as 0.21 did); 5: the calibration network is
#: kept beside a refitted classifier (4: an ensemble of networks; 3: one network, read as a
#: one-member ensemble).
FORMAT_VERSION = 7
#: Oldest format this version reads (3: conformal FDR decision and query mapping; 2: class Gaussians).
OLDEST_FORMAT_VERSION = 3
CONFIG_FILE, WEIGHTS_FILE, EMBEDDER_FILE = "config.json", "weights.safetensors", "embedder.safetensors"
NOVELTY_FILE = "novelty.safetensors"
CALIBRATION_NETWORK_FILE = "calibration_network.safetensors"
FOLDS_DIR = "folds"


def scoring_folds(ids, k: int) -> np.ndarray:
    """The fold model (0 … k − 1) that scores each query cell of a cross-fitted model.

    Drawn from a hash of the cell's name (``obs_names``; pandas' SipHash with its fixed key, the
    same on every machine), so a cell is scored alike whatever the order, chunking or company of
    the query it comes in, and the draw is uniform over the folds whatever the names.
    """
    hashed = pd.util.hash_array(np.asarray(ids).astype(str).astype(object), categorize=False)
    return (hashed % np.uint64(k)).astype(np.intp)


def translation(model: SpikGPTModel, E: np.ndarray, n_query: int | None) -> Mapping | None:
    """``model``'s own translation of embedded cells ``E`` (no fold models'; ``None`` when uncalibrated)."""
    if model.novelty is None or len(E) < 2:
        return None
    return estimate_mapping(model.standardise(E), model.novelty.state["ref_embedding"], n_query=n_query)


def blas_threads() -> int:
    """Threads BLAS may use in this process now (``threadpoolctl``; 1 when no BLAS is loaded)."""
    return max((d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"), default=1)


def translations(jobs: list[tuple[SpikGPTModel, np.ndarray, int | None]]) -> list[Mapping | None]:
    """:func:`translation` of every ``(model, E, n_query)``, side by side in threads.

    A cross-fitted model maps the query six times (itself and five fold models, five rounds of
    mutual-neighbour search each); the searches' partial sorts release the GIL, so threads
    share the work (1.5-1.7x on 2 cores), as many threads as BLAS may use (every core unless the
    caller limited them, e.g. with ``threadpoolctl``). One BLAS thread each, which leaves every
    translation bit-identical to a sequential one (checked on the IFN-beta query, all six
    models; tested).
    """
    workers = min(len(jobs), blas_threads())
    if workers < 2:
        return [translation(*job) for job in jobs]
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: translation(*job), jobs))


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a spikgpt ``config.json``."""
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT


def check_model_destination(path: Path, *, overwrite: bool) -> None:
    """Raise unless a model can be written to ``path`` (see :meth:`SpikGPTModel.save`)."""
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            msg = f"Cannot create model folder {path}: {path.parent} is a file."
            raise FileExistsError(msg)
        return
    if not path.is_dir():
        msg = f"{path} is a file, not a model folder. Choose a folder path for the model."
        raise FileExistsError(msg)
    if not is_model_folder(path):
        msg = (
            f"{path} exists and is not a spikgpt model folder (no spikgpt config.json); it is left "
            "untouched. Choose a new or empty-named folder for the model."
        )
        raise FileExistsError(msg)
    if not overwrite:
        msg = f"{path} holds a spikgpt model. Choose another folder or pass overwrite=True (--overwrite)."
        raise FileExistsError(msg)


@dataclass
class Prediction:
    """Outputs of :meth:`SpikGPTModel.predict` for n cells."""

    embedding: np.ndarray  # [n, d] embedding the classifier consumed (mapped; NaN rows: could not embed)
    probs: np.ndarray  # [n, C]
    confidence: np.ndarray  # [n]
    raw_label: np.ndarray  # [n] class names, before rejection (None where not embedded)
    embedded: np.ndarray  # [n] bool
    pvalue: np.ndarray  # [n] novelty p-value (small = novel); 0 for cells that could not be embedded
    qvalue: np.ndarray  # [n] Benjamini–Hochberg adjusted p-value
    unknown: np.ndarray  # [n] bool: Unknown at the model's FDR (always for cells not embedded)
    reason: np.ndarray  # [n] the novelty score with the smallest p-value ("not_embedded" where so)
    outputs: CellOutputs  # of the embedded cells
    mapping: Mapping | None
    shift: dict  # global shift of −log p removed before testing (location, scale)

    @property
    def novelty(self) -> np.ndarray:
        """``−log10 p``: higher = more novel (for ranking, e.g. AUROC)."""
        return -np.log10(np.maximum(self.pvalue, 1e-300))


@dataclass
class Classified:
    """Per-cell outputs of :meth:`SpikGPTModel.classify` for n cells (before the Unknown decision)."""

    embedding: np.ndarray  # [n, d] (mapped; NaN rows: could not embed)
    probs: np.ndarray  # [n, C]
    confidence: np.ndarray  # [n]
    raw_label: np.ndarray  # [n]
    embedded: np.ndarray  # [n] bool
    scores: dict[str, np.ndarray]  # raw novelty scores of the embedded cells
    outputs: CellOutputs  # of the embedded cells
    # [k, embedded cells, d] each fold model's positions of the embedded cells (its standardised mapped
    # embedding; NaN where it could not embed), for the neighbourhood test of a cross-fitted model
    fold_positions: np.ndarray | None = None


@dataclass
class SpikGPTModel:
    """A trained annotator. Build one with :func:`spikgpt.train`, restore with :meth:`load`.

    ``calibration_network`` is the single network that scored the held-out calibration cells when
    the classifier was refitted on every cell after (:func:`spikgpt.train`'s ``refit``); the
    novelty scores that read a network's outputs are computed with it, so that query and
    calibration cells meet the same network (:meth:`raw_scores`). ``None`` when the classifier
    itself scored them.

    ``fold_models`` (cross-fitted calibration, since 0.20) are the k models each fitted without
    one fold of the reference, whose cells they scored for calibration. They also score the
    query: each query cell by the one model :func:`scoring_folds` draws from its name (since
    0.24; 0.20–0.23 the mean over the k models; cross-conformal scoring, :meth:`fold_scores`), so
    query and calibration cells are scored alike, by models that never saw them. Since 0.23 a
    fold model has no classifier network (``network`` is ``None``) when the model's novelty
    score reads none (:data:`~spikgpt.openset.novelty.NETWORK_SCORES`): the default scores read
    only the embedding and the residual, so a fold network would only cost training time.
    """

    embedder: Embedder
    network: SpikingEnsemble | None
    classes: list[str]
    input_mean: np.ndarray
    input_std: np.ndarray
    train_config: TrainConfig
    summary: dict = field(default_factory=dict)
    novelty: NoveltyScorer | None = None
    novelty_method: str = "combined"
    novelty_components: tuple[str, ...] = DEFAULT_COMBINATION
    fdr: float = DEFAULT_FDR
    shift: str = DEFAULT_SHIFT
    mapping: bool = True
    calibration_network: SpikingEnsemble | None = None
    fold_models: list[SpikGPTModel] = field(default_factory=list)

    def __repr__(self) -> str:
        if self.network is None:
            return f"SpikGPTModel(fold model, no network, embedder={self.embedder.spec!r}, {len(self.classes)} types)"
        cfg = self.network.cfg
        kind = "spiking" if cfg.spiking else "non-spiking twin"
        return (
            f"SpikGPTModel({len(self.classes)} cell types, embedder={self.embedder.spec!r}, "
            f"{kind} ×{len(self.network.members)} T={self.network.time_steps} L={cfg.depth} D={cfg.dim} "
            f"N={cfg.n_tokens} "
            f"({cfg.tokenization}), Unknown at FDR {self.fdr:.0%}{', query mapping' if self.mapping else ''}"
            f"{f', cross-fitted calibration ({len(self.fold_models)} fold models)' if self.fold_models else ''}, "
            f"trained on {self.summary.get('n_cells', '?')} cells)"
        )

    # ---------------------------------------------------------------- inference
    def standardise(self, E: np.ndarray) -> np.ndarray:
        """Scale an embedding with the reference's moments (NaN rows set to 0)."""
        Z = (E - self.input_mean) / self.input_std
        return np.nan_to_num(Z, nan=0.0).astype(np.float32)

    def outputs(
        self, E: np.ndarray, batch_size: int = 4096, *, progress: bool = False, network: SpikingEnsemble | None = None
    ) -> CellOutputs:
        """Logits, latent, standardised embedding and per-layer firing rates for embeddings ``E``.

        ``network``: another network than the classifier (:attr:`calibration_network`).
        """
        network = self.network if network is None else network
        if network is None:
            msg = "this fold model has no classifier network (cross-fitted for a novelty score that reads none)."
            raise ValueError(msg)
        return self._run(self.standardise(E), network, batch_size, progress)

    @torch.inference_mode()
    def _run(self, Z: np.ndarray, net: SpikingEnsemble, batch_size: int = 4096, progress: bool = False) -> CellOutputs:
        """:meth:`outputs` of standardised embeddings ``Z`` through ``net``."""
        net = net.eval()
        acts = [m for m in net.modules() if isinstance(m, LIF | torch.nn.ReLU)]
        n, T, C, D = len(Z), net.time_steps, len(self.classes), net.latent_dim
        # Results go straight into arrays sized for all cells: small per-batch tensors kept in
        # lists pinned the allocator's heap between batches (measured: RSS grew ~30 kB per cell,
        # 10 GB for 400,000 cells; bounded at ~250 MB this way).
        logits = np.zeros((T, n, C), np.float32)
        latent = np.zeros((n, D), np.float32)
        firing = np.zeros((n, len(acts)), np.float32)
        rows = slice(0, 0)

        def record(layer: int, spiking: bool):
            def hook(_m, _i, o: torch.Tensor) -> None:
                # [T, B, ...] spikes are 0/1 and ReLU outputs ≥ 0: a sum over every axis but B
                # counts them (transposing, or counting nonzeros, copied the tensor: 3× slower)
                active = o if spiking else torch.sign(o)
                firing[rows, layer] = active.sum(dim=(0, *range(2, o.dim()))).numpy() / (o.numel() // o.shape[1])

            return hook

        hooks = [m.register_forward_hook(record(i, isinstance(m, LIF))) for i, m in enumerate(acts)]
        try:
            starts = range(0, n, batch_size)
            show = progress and len(starts) > 10
            # No autograd graph: each batch's graph would otherwise stay alive through its
            # logits (measured: +3 GB for 160,000 cells).
            with torch.no_grad():
                for s in tqdm(starts, desc="classifying", unit="batch", disable=None if show else True):
                    rows = slice(s, min(s + batch_size, n))
                    feats = net.features(torch.as_tensor(Z[rows]))
                    logits[:, rows] = net.head(feats).numpy()
                    latent[rows] = feats.mean(0).numpy()
        finally:
            for h in hooks:
                h.remove()
        return CellOutputs(logits=torch.from_numpy(logits), latent=latent, embedding=Z, firing=firing)

    def raw_scores(self, out: CellOutputs, names: tuple[str, ...] = SCORES) -> dict[str, np.ndarray]:
        """Raw novelty scores ``names`` of cells whose classifier outputs are ``out`` (:meth:`outputs`).

        Scores that read a network (:data:`~spikgpt.openset.novelty.NETWORK_SCORES`) come from the
        :attr:`calibration_network` where the model has one: the refitted classifier has seen
        the calibration cells and, as an ensemble, has another latent space, so its scores would
        not be comparable with theirs (measured on pbmc68k with the ensemble: 74 % of a same-study
        query's known cells at p ≤ 0.1 with ``knn_latent``; README, *Limits*).
        """
        read = sorted(NETWORK_SCORES.intersection(names))
        if read and self.calibration_network is not None:
            scored = self._run(out.embedding, self.calibration_network)
            scored.residual = out.residual
            out = scored
        elif read and (self.cross_fitted or "calibration_network" in self.summary) and not self.__dict__.get("_warned"):
            self.__dict__["_warned"] = True  # once per model, not per chunk (cross-fitted, or refitted before 0.18)
            logger.warning(
                "%s: the calibration cells were scored by %s, the query by this model's classifier, so "
                "these p-values are not calibrated (README, Limits). Use the default novelty, or re-train "
                "with spikgpt >= 0.18 and held-out calibration.",
                ", ".join(read),
                "fold networks" if self.cross_fitted else "another network",
            )
        return self.novelty.raw_scores(out, names)

    def score_names(self, novelty: str | None = None) -> tuple[str, ...]:
        """The raw scores of novelty method ``novelty`` (the model's own when ``None``), checked before any work.

        ``ValueError`` for an unknown method, and for a score the model was not calibrated with
        (an older model's, or a network's in a model cross-fitted without fold networks).
        """
        names = score_names(novelty or self.novelty_method, self.novelty_components)
        if self.novelty is not None:
            self.novelty.calibration_scores(names)
        return names

    def predict(
        self,
        cells: Cells,
        *,
        novelty: str | None = None,
        fdr: float | None = None,
        mapping: bool | None = None,
        shift: str | None = None,
        false_unknown: float | None = None,
        progress: bool = False,
    ) -> Prediction:
        """Embed, map and classify ``cells`` and decide which are Unknown (see :func:`spikgpt.annotate`).

        The steps are public so that a query too large for memory can run them chunk by chunk
        (:mod:`spikgpt.streaming`): :meth:`embed`, :meth:`map_query` (on a sample),
        :meth:`classify` (per cell), :meth:`decide_unknown` (over the whole query).
        """
        fdr = self.fdr if fdr is None else fdr
        check_fdr(fdr)
        names = self.score_names(novelty)
        E, residual = self.embed(cells, names)
        embedded = np.isfinite(E).all(axis=1)
        use_mapping = self.mapping if mapping is None else mapping
        # the fold models' embeddings of every cell, once for mapping and scoring, where the
        # neighbourhood test reads them; above that each fold model embeds only the cells it scores
        whole = self._keeps_fold_positions(cells.n_obs)
        fold_inputs = self.fold_embeddings(cells, names, E, residual) if whole else None
        mapped = self.map_query(E[embedded], cells=cells, fold_inputs=fold_inputs) if use_mapping else None
        part = self.classify(E, residual, mapped, names, cells=cells, fold_inputs=fold_inputs, progress=progress)
        matched = None if mapped is None else mapped.matched
        pvalue, qvalue, unknown, reason, removed = self.decide_unknown(
            part.scores,
            part.embedded,
            names,
            fdr,
            shift,
            matched=matched,
            false_unknown=false_unknown,
            labels=part.raw_label,
            embedding=part.embedding,
            fold_positions=part.fold_positions,
            progress=progress,
        )
        return Prediction(
            part.embedding,
            part.probs,
            part.confidence,
            part.raw_label,
            part.embedded,
            pvalue,
            qvalue,
            unknown,
            reason,
            part.outputs,
            mapped,
            removed,
        )

    def embed(self, cells: Cells, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """Embedding of ``cells`` and, when the novelty scores ``names`` need it, their residual."""
        if "pca_residual" in names:
            return self.embedder.embed(cells)
        return self.embedder.transform(cells), None

    def fold_embeddings(
        self, cells: Cells | None, names: tuple[str, ...], E: np.ndarray | None, residual: np.ndarray | None
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Each fold model's embedding of ``cells`` and, when the scores ``names`` need it, their residual.

        ``E`` and ``residual`` (this model's, of every cell) stand for the folds whose embedder learns
        nothing from the reference (:attr:`~spikgpt.embed.Embedder.learns_from_reference`); with
        ``E=None`` every fold model embeds the cells itself.
        """
        if cells is None and (E is None or any(f.embedder.learns_from_reference for f in self.fold_models)):
            msg = "this model scores the query with its fold models: pass the cells to classify(..., cells=)."
            raise ValueError(msg)
        return [
            fold.embed(cells, names) if fold.embedder.learns_from_reference or E is None else (E, residual)
            for fold in self.fold_models
        ]

    def map_query(
        self,
        E: np.ndarray,
        *,
        n_query: int | None = None,
        cells: Cells | None = None,
        fold_inputs: list[tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> Mapping | None:
        """The query → reference translation from embedded cells ``E`` (``None`` when uncalibrated).

        ``n_query``: the query's size when ``E`` holds only the rows :func:`~spikgpt.mapping.query_sample` drew.
        ``cells``: the cells ``E`` was embedded from (all of them, those that could not be embedded
        included), which a model with :attr:`fold_models` needs: each fold model maps them in its
        own embedding (:attr:`~spikgpt.mapping.Mapping.folds`). ``fold_inputs``: those embeddings
        already made (:meth:`fold_embeddings` of ``cells``), not made again.
        """
        if self.novelty is None or len(E) < 2:
            return None
        jobs: list[tuple[SpikGPTModel, np.ndarray, int | None]] = [(self, E, n_query)]
        if self.fold_models:
            if cells is None and any(f.embedder.learns_from_reference for f in self.fold_models):
                msg = "this model scores the query with its fold models: pass the cells to map_query(..., cells=)."
                raise ValueError(msg)
            # only the rows the mapping reads, where the query was not embedded whole by every fold
            sample = cells.subset(query_sample(cells.n_obs)) if fold_inputs is None and n_query is None else None
            for j, fold in enumerate(self.fold_models):
                if not fold.embedder.learns_from_reference:  # it embeds the query as this model does
                    jobs.append((fold, E, n_query))
                    continue
                if sample is not None:
                    E_sample = fold.embedder.transform(sample)
                    if np.isfinite(E_sample).all():
                        jobs.append((fold, E_sample, cells.n_obs))
                        continue
                E_fold = fold.embedder.transform(cells) if fold_inputs is None else fold_inputs[j][0]
                ok = np.isfinite(E_fold).all(axis=1)
                # as for this model: the same sample of the query, streamed or in memory
                jobs.append((fold, E_fold, n_query) if ok.all() else (fold, E_fold[ok], None))
        mapped, *folds = translations(jobs)
        if self.fold_models:
            mapped.folds = tuple(folds)
        return mapped

    def classify(
        self,
        E: np.ndarray,
        residual: np.ndarray | None,
        mapped: Mapping | None,
        names: tuple[str, ...],
        *,
        cells: Cells | None = None,
        fold_inputs: list[tuple[np.ndarray, np.ndarray | None]] | None = None,
        positions: bool = True,
        progress: bool = False,
    ) -> Classified:
        """Classify embedded cells and compute their raw novelty scores; every cell independently.

        ``cells``: the cells ``E`` was embedded from, which a model with :attr:`fold_models` needs
        to score them (:meth:`fold_scores`; ``fold_inputs``: their fold embeddings, if made;
        ``positions=False``: the fold positions are not wanted, e.g. for a chunk of a query too
        large for the neighbourhood test).
        """
        embedded = np.isfinite(E).all(axis=1)
        E_ok = E[embedded]
        if mapped is not None:
            E_ok = E_ok - mapped.shift * self.input_std
        out = self.outputs(E_ok, progress=progress)
        out.residual = None if residual is None else residual[embedded]
        n = len(E)
        probs = np.zeros((n, len(self.classes)), np.float32)
        probs[embedded] = out.probs
        E_out = E.copy()
        E_out[embedded] = E_ok
        scores, fold_positions = {}, None
        if self.novelty is not None and embedded.any():
            if self.fold_models:
                kw = {"E": E, "residual": residual, "fold_inputs": fold_inputs, "positions": positions}
                scores, fold_positions = self.fold_scores(cells, embedded, mapped, names, **kw)
            else:
                scores = self.raw_scores(out, names)
        return Classified(
            E_out,
            probs,
            np.where(embedded, probs.max(axis=1), 0.0),
            # a cell that could not be embedded has no type: missing, not the first class
            np.where(embedded, np.asarray(self.classes, dtype=object)[probs.argmax(axis=1)], None),
            embedded,
            scores,
            out,
            fold_positions,
        )

    def fold_scores(
        self,
        cells: Cells | None,
        embedded: np.ndarray,
        mapped: Mapping | None,
        names: tuple[str, ...],
        *,
        E: np.ndarray | None = None,
        residual: np.ndarray | None = None,
        fold_inputs: list[tuple[np.ndarray, np.ndarray | None]] | None = None,
        positions: bool = True,
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Cross-conformal raw scores of the ``embedded`` cells, each from one of :attr:`fold_models`.

        Every fold model embeds the cells itself and maps them with its own translation
        (``mapped.folds``); the classifier network runs only for scores that read one. Each cell's
        scores are those of the fold model :func:`scoring_folds` draws for it from its name
        (0.24): a known query cell is then scored exactly as a calibration cell was, by one model
        that never saw it, drawn uniformly — where 0.20–0.23's mean over the k models gave known
        query cells a narrower spread than the calibration cells' and lost power
        (``benchmarks/cross_conformal.py``, ``one fold``; README, small references). A cell its
        model cannot embed gets ``-inf`` (p-value 1). ``E`` and ``residual``: this model's
        embedding of ``cells`` (all of them), which fold models whose embedder does not learn from
        the reference reuse (:attr:`~spikgpt.embed.Embedder.learns_from_reference`: scGPT is not
        run six times); ``fold_inputs``: every fold model's embedding of ``cells``
        (:meth:`fold_embeddings`), made once.

        Also returns each fold model's positions of the cells (``[k, n, d]``, its standardised
        mapped embedding; NaN where it could not embed) when ``positions``, the fold models keep
        their calibration cells' positions (:meth:`decide_unknown`'s neighbourhood test) and
        there are at most ``MAX_NEIGHBOURHOOD_CELLS`` cells, else ``None`` — and then each fold
        model embeds only the cells drawn for it (a fifth of the work at 100,000 cells).
        """
        n = int(embedded.sum())
        rows = np.flatnonzero(embedded)
        maps = mapped.folds if mapped is not None else (None,) * len(self.fold_models)
        chosen = {name: np.full(n, -np.inf) for name in names}
        # positions only where the neighbourhood test can use them (k × cells × d floats otherwise wasted)
        keep = positions and self._keeps_fold_positions(len(embedded))
        out_positions = None
        if fold_inputs is None and keep:
            fold_inputs = self.fold_embeddings(cells, names, E, residual)
        # by name; by position only where no cells are given (fold embedders that learn nothing)
        drawn = scoring_folds(cells.adata.obs_names[rows] if cells is not None else np.arange(n), len(self.fold_models))
        for j, (fold, fold_map) in enumerate(zip(self.fold_models, maps, strict=True)):
            mine = drawn == j
            if fold_inputs is None and not mine.any():  # no cell drawn for this fold model
                continue
            if fold_inputs is not None:  # every cell embedded by every fold
                E_fold, res_fold = fold_inputs[j]
                E_fold, res_fold = E_fold[rows], None if res_fold is None else res_fold[rows]
                scored = np.ones(n, dtype=bool)
            else:  # only the cells drawn for this fold
                if fold.embedder.learns_from_reference or E is None:
                    E_fold, res_fold = fold.embed(cells.subset(rows[mine]), names)
                else:
                    E_fold, res_fold = E[rows[mine]], None if residual is None else residual[rows[mine]]
                scored = mine
            ok = np.isfinite(E_fold).all(axis=1)
            E_ok = E_fold[ok] if fold_map is None else E_fold[ok] - fold_map.shift * fold.input_std
            # the default scores read the standardised embedding and the residual only
            out = (
                fold.outputs(E_ok)
                if NETWORK_SCORES.intersection(names)
                else CellOutputs.of_embedding(fold.standardise(E_ok))
            )
            out.residual = None if res_fold is None else res_fold[ok]
            at = np.flatnonzero(scored)[ok]  # positions among the embedded cells
            take = mine[at]
            for name, v in fold.raw_scores(out, names).items():
                chosen[name][at[take]] = v[take]
            if keep:
                if out_positions is None:
                    out_positions = np.full((len(self.fold_models), n, out.embedding.shape[1]), np.nan, np.float32)
                out_positions[j, at] = out.embedding
        return chosen, out_positions

    def _keeps_fold_positions(self, n_cells: int) -> bool:
        """Whether the fold models place a query of ``n_cells`` cells for the neighbourhood test (so embed it whole)."""
        has_null = bool(self.fold_models) and self.fold_calibration_positions() is not None
        return has_null and n_cells <= MAX_NEIGHBOURHOOD_CELLS

    def fold_calibration_positions(self) -> list[np.ndarray] | None:
        """Each fold model's held-out cells' positions in its own embedding (cross-fitted models since 0.22)."""
        found = [f.novelty.calibration_positions() if f.novelty is not None else None for f in self.fold_models]
        return found if found and all(p is not None for p in found) else None

    def decide_unknown(
        self,
        scores: dict[str, np.ndarray],
        embedded: np.ndarray,
        names: tuple[str, ...],
        fdr: float,
        shift: str | None = None,
        *,
        matched: np.ndarray | None = None,
        false_unknown: float | None = None,
        labels: np.ndarray | None = None,
        embedding: np.ndarray | None = None,
        fold_positions: np.ndarray | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """p-values, q-values, Unknown, reason and the global shift removed, over the whole query.

        ``scores`` are the embedded cells' raw novelty scores (:meth:`classify`); ``matched``
        (:attr:`~spikgpt.mapping.Mapping.matched`, over the embedded cells) marks the cells an
        ``@matched`` shift is estimated on; ``false_unknown`` tests each cell at that level
        instead of the query at false discovery rate ``fdr`` (:func:`~spikgpt.openset.decide`);
        ``labels`` (the raw label of every cell) lets a shift be corrected type by type;
        ``embedding`` (the mapped embedding of every cell, :attr:`Classified.embedding`) lets each
        cell's neighbourhood be tested as well, when the model stores its calibration cells'
        positions; a cross-fitted model reads ``fold_positions`` instead (:attr:`Classified.fold_positions`,
        over the embedded cells), each fold model's own, beside its own calibration cells'.
        ``progress``: a progress bar over the neighbourhood test's folds.
        """
        n = len(embedded)
        pvalue, qvalue = np.zeros(n), np.zeros(n)
        unknown = ~embedded
        reason = np.full(n, "not_embedded", dtype=object)
        removed = {"location": 0.0, "scale": 1.0, "unknown_withheld": 0}
        if self.novelty is not None and embedded.any():
            positions = self._positions(embedded, embedding, fold_positions)
            # Cross-fitted: calls are withheld under a global shift only where the folds are too
            # small for the neighbourhood test's null (references of under ~105 cells) or hold no
            # positions (models trained before 0.22). Folds large enough, withholding lost calls and
            # kept no false one out, with the test (0.22, `fold neighbourhoods`) and without it
            # (`cross-conformal mean · guard`, as on queries of over 20,000 cells: FDR ≤ 0.071, ≤ 1.4 %
            # false Unknown at 150 cells to full size; benchmarks/cross_conformal.py).
            cal = self._calibration_positions()
            large_folds = cal is not None and neighbourhoods_tested([len(c) for c in cal])
            d = decide(
                scores,
                self.novelty.calibration_scores(names),
                names,
                fdr=fdr,
                calibration_statistics=self._calibration_statistic(names),
                shift=self.shift if shift is None else check_shift(shift),
                null_cells=matched,
                false_unknown=false_unknown,
                groups=None if labels is None else np.asarray(labels)[embedded],
                positions=positions,
                withhold_under_shift=self.cross_fitted and not large_folds,
                untested=None if labels is None else np.isin(np.asarray(labels)[embedded], self.uncalibrated_types),
                progress=progress,
            )
            pvalue[embedded], qvalue[embedded], reason[embedded] = d.pvalue, d.qvalue, d.reason
            unknown[embedded] = d.unknown
            removed = {**d.shift, "unknown_withheld": d.withheld}
            if d.withheld:
                logger.warning(
                    "The query is shifted as a whole (median -log p %.2f above the null) and this model's "
                    "calibration is cross-fitted on folds too small for a neighbourhood test (a reference of under "
                    "~105 cells, or a model trained before spikgpt 0.22): %d cell(s) that the rule would "
                    "call Unknown keep their labels, because there the shift correction also called known cells "
                    "Unknown (README, small references). Their p- and q-values are kept in obs.",
                    d.shift["location"],
                    d.withheld,
                )
            n_cal = len(self._calibration_statistic(names))
            if why := unreachable_unknown(d.smallest, n_cal, int(embedded.sum()), fdr, false_unknown):
                logger.warning(why)
        elif embedded.any():  # uncalibrated model (calibration_fraction=0): nothing is Unknown
            pvalue[embedded], qvalue[embedded], reason[embedded] = 1.0, 1.0, ""
        return pvalue, qvalue, unknown, reason, removed

    def _positions(
        self, embedded: np.ndarray, embedding: np.ndarray | None, fold_positions: np.ndarray | None
    ) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The neighbourhood test's ``(query, calibration)`` positions (:func:`~spikgpt.openset.decide`), or ``None``.

        One pair for a held-out model; one per fold model for a cross-fitted one, when every fold
        model placed every embedded cell. Only for queries of up to ``MAX_NEIGHBOURHOOD_CELLS``
        cells in all (the chunked path keeps positions only then: the same cells get the same test).
        """
        cal = self._calibration_positions()
        if len(embedded) > MAX_NEIGHBOURHOOD_CELLS or cal is None:
            return None
        if self.fold_models:
            if fold_positions is None or not np.isfinite(fold_positions).all():
                return None
            return list(zip(fold_positions, cal, strict=True))
        if embedding is None:
            return None
        return [(self.standardise(np.asarray(embedding, dtype=np.float32)[embedded]), cal[0])]

    def _calibration_positions(self) -> list[np.ndarray] | None:
        """The calibration cells' positions: one array per fold model (cross-fitted), else the held-out cells' one.

        ``None`` where they were not stored (models before 0.11; cross-fitted ones before 0.22).
        """
        if self.fold_models:
            return self.fold_calibration_positions()
        cal = self.novelty.calibration_positions() if self.novelty is not None else None
        return None if cal is None else [cal]

    @property
    def cross_fitted(self) -> bool:
        """Whether the calibration cells were scored out of fold (``calibration_folds > 1`` at training)."""
        return self.summary.get("calibration", {}).get("folds", 1) > 1

    @property
    def uncalibrated_types(self) -> list[str]:
        """Types no calibration cell represents (too few reference cells to hold one out): not tested for Unknown.

        Models trained before 0.20 did not record them; for those, the types too rare to split
        (``summary["rare_classes"]``), which are the same types under held-out calibration.
        """
        cal = self.summary.get("calibration", {})
        return list(cal.get("uncalibrated_types", self.summary.get("rare_classes", [])))

    def smallest_pvalue(self, names: tuple[str, ...] | None = None) -> float:
        """The smallest p-value a query cell can get (:func:`~spikgpt.openset.decision.smallest_pvalue`); 0: none.

        With the neighbourhood test where the model has calibration positions (queries of
        ``NEIGHBOURS + 1`` to ``MAX_NEIGHBOURHOOD_CELLS`` cells). ``names``: the scores of the
        rule (the model's default novelty method when ``None``).
        """
        names = names or score_names(self.novelty_method, DEFAULT_COMBINATION)
        own = smallest_pvalue(self.novelty.calibration_scores(names), names, self._calibration_statistic(names))
        cal = self._calibration_positions()
        tested = cal is not None and neighbourhoods_tested([len(c) for c in cal])
        return 0.0 if tested else own  # the neighbourhood null's tails have no floor

    def _calibration_statistic(self, names: tuple[str, ...]) -> np.ndarray:
        """Calibration cells' combined statistic for ``names`` (cached: it only depends on the model)."""
        cache = self.__dict__.setdefault("_cal_stat", {})
        if names not in cache:
            cache[names] = calibration_statistic(self.novelty.calibration_scores(names), names)
        return cache[names]

    # ---------------------------------------------------------------- save / load
    def config(self) -> dict:
        """Everything but the arrays, as saved to ``config.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spikgpt_version": __version__,
            "classes": list(self.classes),
            "novelty": {
                "method": self.novelty_method,
                "components": list(self.novelty_components),
                "calibrated": self.novelty is not None,
                "max_reference_cells": self.novelty.max_reference_cells if self.novelty else None,
                "k": self.novelty.k if self.novelty else None,
                "fdr": self.fdr,
                "shift": self.shift,
            },
            "mapping": self.mapping,
            "folds": len(self.fold_models),
            "embedder": self.embedder.config(),
            "network": None if self.network is None else self.network.cfg.to_dict(),
            "train": self.train_config.to_dict(),
            "summary": self.summary,
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model folder atomically (a temporary folder, then a rename).

        Parameters
        ----------
        path
            Destination folder.
        overwrite
            Replace an existing spikgpt model folder. Anything else at ``path`` (a file, a folder
            without a spikgpt ``config.json``) is never replaced: that is an error either way.

        Returns
        -------
        The folder.
        """
        path = Path(path)
        check_model_destination(path, overwrite=overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; a model folder is shared like any output
        try:
            self._write(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    def _write(self, folder: Path) -> None:
        """The model's files in ``folder`` (fold models in ``folds/<j>``, each a model folder)."""
        (folder / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1))
        network = {} if self.network is None else self.network.state_dict()
        state = {k: v.contiguous() for k, v in network.items()}
        state["input_mean"] = torch.as_tensor(self.input_mean)
        state["input_std"] = torch.as_tensor(self.input_std)
        save_torch(state, folder / WEIGHTS_FILE)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.embedder.arrays().items()}
        save_numpy(arrays, folder / EMBEDDER_FILE)
        if self.novelty is not None:
            save_numpy({k: np.ascontiguousarray(v) for k, v in self.novelty.arrays().items()}, folder / NOVELTY_FILE)
        if self.calibration_network is not None:
            cal_state = {k: v.contiguous() for k, v in self.calibration_network.state_dict().items()}
            save_torch(cal_state, folder / CALIBRATION_NETWORK_FILE)
        for j, fold in enumerate(self.fold_models):
            sub = folder / FOLDS_DIR / str(j)
            sub.mkdir(parents=True)
            fold._write(sub)

    @classmethod
    def coerce(cls, model: SpikGPTModel | str | os.PathLike) -> SpikGPTModel:
        """``model`` itself, or the model loaded from the folder it names."""
        return model if isinstance(model, cls) else cls.load(model)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpikGPTModel:
        """Load a model folder written by :meth:`save`.

        Parameters
        ----------
        path
            The folder.

        Returns
        -------
        The model, in eval mode.
        """
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not path.exists():
            msg = f"Model folder {path} does not exist. Check the path, or train one with `spikgpt train`."
            raise ModelFormatError(msg)
        if not cfg_file.is_file():
            msg = f"{path} is not a spikgpt model folder (no {CONFIG_FILE}). Train one with `spikgpt train`."
            raise ModelFormatError(msg)
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            msg = f"{cfg_file} is corrupted ({err}). Re-train or restore the model folder."
            raise ModelFormatError(msg) from err
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            msg = f"{cfg_file} is not a spikgpt model config (foreign file). Point at a folder from `spikgpt train`."
            raise ModelFormatError(msg)
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            msg = (
                f"{path} has model format {cfg['format_version']} (spikgpt {cfg.get('spikgpt_version')}); "
                f"this spikgpt {__version__} reads up to {FORMAT_VERSION}. Upgrade spikgpt."
            )
            raise ModelFormatError(msg)
        if cfg.get("format_version", 0) < OLDEST_FORMAT_VERSION:
            msg = (
                f"{path} has model format {cfg.get('format_version')} (spikgpt {cfg.get('spikgpt_version')}), "
                f"whose Unknown rule this spikgpt {__version__} no longer reads. "
                "Re-train it with `spikgpt train`."
            )
            raise ModelFormatError(msg)
        try:
            state = load_torch(path / WEIGHTS_FILE)
            arrays = load_numpy(path / EMBEDDER_FILE)
            bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            bad += [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
            if bad:
                msg = f"{path} holds NaN/inf in {bad[:3]}: the model is damaged. Re-train it."
                raise ModelFormatError(msg)
            mean, std = state.pop("input_mean").numpy(), state.pop("input_std").numpy()
            if cfg["format_version"] < 4:  # one network, saved without the ensemble's prefix
                cfg["train"]["members"] = 1
                state = {f"members.0.{k}": v for k, v in state.items()}
            n_members = len({k.split(".")[1] for k in state if k.startswith("members.")})
            net = None
            if cfg["network"] is not None:  # None: a fold model without a network (format 7)
                net = SpikingEnsemble(NetworkConfig.from_dict(cfg["network"]), max(n_members, 1))
                net.load_state_dict(state, strict=True)
                net.eval()
            elif state:
                msg = f"{path} holds network weights but no network configuration: the folder is damaged; re-train."
                raise ModelFormatError(msg)
            cal_net = None
            if net is not None and (path / CALIBRATION_NETWORK_FILE).exists():
                cal_net = SpikingEnsemble(net.cfg, 1)
                cal_net.load_state_dict(load_torch(path / CALIBRATION_NETWORK_FILE), strict=True)
                cal_net.eval()
            embedder = embedder_from_config(cfg["embedder"], arrays)
            folds = []
            for j in range(int(cfg.get("folds", 0))):
                sub = path / FOLDS_DIR / str(j)
                if not (sub / CONFIG_FILE).is_file():
                    msg = f"{path} lacks its fold model {FOLDS_DIR}/{j}: the folder is damaged or incomplete; re-train."
                    raise ModelFormatError(msg)
                folds.append(cls.load(sub))
            nov_cfg = cfg["novelty"]
            scorer = None
            if nov_cfg["calibrated"]:
                scorer = NoveltyScorer.from_arrays(
                    load_numpy(path / NOVELTY_FILE), nov_cfg["max_reference_cells"], nov_cfg["k"]
                )
            model = cls(
                embedder=embedder,
                network=net,
                classes=list(cfg["classes"]),
                input_mean=mean,
                input_std=std,
                train_config=TrainConfig.from_dict(cfg["train"]),
                summary=cfg.get("summary", {}),
                novelty=scorer,
                novelty_method=nov_cfg["method"],
                novelty_components=tuple(nov_cfg["components"]),
                fdr=float(nov_cfg["fdr"]),
                shift=str(nov_cfg["shift"]),
                mapping=bool(cfg["mapping"]),
                calibration_network=cal_net,
                fold_models=folds,
            )
        except ModelFormatError:
            raise
        except Exception as err:  # safetensors/torch raise many types for damaged files
            msg = (
                f"Could not load the model in {path}: {type(err).__name__}: {err}. "
                "The folder is damaged or incomplete; re-train it."
            )
            raise ModelFormatError(msg) from err
        return model
