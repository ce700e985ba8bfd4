"""The public verbs: :func:`train` and :func:`annotate`."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spikgpt import __version__
from spikgpt.data import Cells, check_input_file, read
from spikgpt.embed import Embedder, make_embedder
from spikgpt.embed.default import MAX_FIT_CELLS
from spikgpt.embed.obsm import ObsmEmbedder
from spikgpt.errors import InputError
from spikgpt.mapping import Mapping
from spikgpt.model.annotator import SpikGPTModel
from spikgpt.model.network import NetworkConfig
from spikgpt.model.training import (
    MIN_SPLIT_CELLS,
    TrainConfig,
    batch_size,
    cpu_settings,
    fit_network,
    stratified_folds,
    stratified_split,
)
from spikgpt.openset import DEFAULT_FDR, UNKNOWN, check_false_unknown, check_fdr, reject
from spikgpt.openset.decision import check_shift
from spikgpt.openset.novelty import DEFAULT_COMBINATION, NETWORK_SCORES, SCORES, CellOutputs, NoveltyScorer, score_names
from spikgpt.streaming import STREAM_REFERENCE_CELLS, close_store, obs_index, open_store, stored_reference

logger = logging.getLogger("spikgpt")


def labels_of(adata: ad.AnnData, label_key: str) -> tuple[np.ndarray, list[str]]:
    """Validate ``obs[label_key]``; return integer codes and the sorted class names."""
    if label_key not in adata.obs.columns:
        msg = (
            f"Label column {label_key!r} not found in obs. Available columns: "
            f"{list(adata.obs.columns)}. Pass the column holding cell types (--label-key)."
        )
        raise InputError(msg)
    labels = adata.obs[label_key]
    missing = labels.isna().to_numpy()
    if missing.any():
        msg = (
            f"{missing.sum()} of {len(labels)} cells have no label in obs[{label_key!r}]. Drop "
            f"them first: `adata = adata[adata.obs[{label_key!r}].notna()].copy()`."
        )
        raise InputError(msg)
    labels = labels.astype(str).to_numpy()
    if (labels == UNKNOWN).any():
        msg = f"obs[{label_key!r}] uses the reserved label {UNKNOWN!r}; rename or drop those cells."
        raise InputError(msg)
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        msg = f"obs[{label_key!r}] has {len(classes)} cell type; a classifier needs at least 2."
        raise InputError(msg)
    return y.astype(np.int64), classes.tolist()


#: Folds of cross-fitted calibration.
CALIBRATION_FOLDS = 5
#: Up to this many held-out calibration cells (20 % of a reference of up to ~400 cells),
#: ``calibration_folds=None`` cross-fits whatever the novelty score (0.21; 0.20: up to 20).
CROSS_FIT_HELD_OUT_CELLS = 80
#: Up to this many reference cells, ``calibration_folds=None`` cross-fits when the novelty score
#: reads no network, so the fold models train none (0.23).
CROSS_FIT_MAX_CELLS = STREAM_REFERENCE_CELLS


def auto_calibration_folds(n_held_out: int, n_cells: int, *, fold_networks: bool) -> int:
    """The folds ``calibration_folds=None`` chooses: :data:`CALIBRATION_FOLDS` (cross-fitted) or 1 (held out).

    ``n_held_out``: the cells ``calibration_fraction`` would hold out of an ``n_cells`` reference;
    ``fold_networks``: whether the novelty score reads a network, so each fold model would
    train one. Cross-fitted for :data:`CROSS_FIT_HELD_OUT_CELLS` or fewer held-out cells (a
    reference of up to ~400 cells) and, where the fold models need no network (the default
    scores), for references of up to :data:`CROSS_FIT_MAX_CELLS` cells; else held out.
    Held out, 20 or fewer cells fit no p-value tail and call no cell Unknown; on 150-cell to
    full-size references the held-out rule called Unknown at an FDR of 0.30–0.55 on the worst
    dataset and 6–12 % of a closed-set query's known cells, where cross-fitted calibration with
    the query scored by the fold models kept the FDR ≤ 0.07 and false Unknown ≤ 2.9 %
    (leave-one-dataset-out at 100, 150, 250, 400, 500 cells and full size; README, small references).
    """
    if n_held_out <= CROSS_FIT_HELD_OUT_CELLS or (not fold_networks and n_cells <= CROSS_FIT_MAX_CELLS):
        return CALIBRATION_FOLDS
    return 1


def check_calibration_folds(folds: int | None) -> None:
    """Raise :class:`InputError` unless ``folds`` is ``None`` (automatic), 1 (one held-out split) or at least 2."""
    if folds is not None and folds < 1:
        msg = f"calibration_folds (--calibration-folds) must be 1 (one held-out split) or at least 2, got {folds}."
        raise InputError(msg)


def check_calibration_fraction(fraction: float) -> None:
    """Raise :class:`InputError` unless ``fraction`` is in [0, 1)."""
    if not 0 <= fraction < 1:
        msg = f"calibration_fraction (--calibration-fraction) must be in [0, 1), got {fraction}."
        raise InputError(msg)


def _fit_pipeline(
    cells: Cells,
    y: np.ndarray,
    embedder: str | Embedder,
    net_cfg: NetworkConfig,
    cfg: TrainConfig,
    *,
    seed: int,
    progress: bool,
    with_network: bool = True,
) -> tuple[SpikGPTModel, np.ndarray, np.ndarray]:
    """Fit embedder and classifier on ``cells`` (no calibration).

    Returns the model and the embedding and labels of the cells it was fitted on (those the
    embedder could embed), so the reference need not be embedded twice. ``with_network=False``:
    embedder and scaling only (a fold model whose novelty scores read no network).
    """
    # A passed instance is copied: the caller's object is not fitted in place.
    embedder = copy.deepcopy(make_embedder(embedder))
    sample, rows = cells.fitting_sample(MAX_FIT_CELLS, seed)
    embedder.fit(sample, seed=seed, labels=y[rows])
    E, ok = _reference_embedding(embedder, cells)
    if not ok.all():
        logger.warning("%d reference cells could not be embedded and are left out.", (~ok).sum())
        E, y = E[ok], y[ok]
    # One global scale, not one per dimension: whitening PCA components would blow the
    # low-variance (mostly noise) components up to the weight of the informative ones.
    mean = E.mean(axis=0)
    std = np.full_like(mean, max(float(np.sqrt(((E - mean) ** 2).sum(axis=1).mean() / E.shape[1])), 1e-6))
    Z = ((E - mean) / std).astype(np.float32)
    net, history = None, {}
    if with_network:
        net, history = fit_network(Z, y, replace(net_cfg, in_dim=E.shape[1]), cfg, seed=seed, progress=progress)
    model = SpikGPTModel(
        embedder=embedder,
        network=net,
        classes=[],
        input_mean=mean.astype(np.float32),
        input_std=std.astype(np.float32),
        train_config=cfg,
        summary={"history": {k: v for k, v in history.items() if not isinstance(v, list)}},
    )
    return model, E, y


def _reference_embedding(embedder: Embedder, cells) -> tuple[np.ndarray, np.ndarray]:
    """Embedding of every reference cell, chunk by chunk, and which cells could be embedded."""
    E = np.concatenate([embedder.transform(c) for c in cells.chunks()])
    return E, np.isfinite(E).all(axis=1)


def _embedded_outputs(model: SpikGPTModel, cells: Cells) -> tuple[CellOutputs, np.ndarray]:
    """Model outputs of the cells the embedder could embed, and which those were."""
    parts = [model.embedder.embed(c) for c in cells.chunks()]
    E = np.concatenate([p[0] for p in parts])
    residual = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    ok = np.isfinite(E).all(axis=1)
    out = model.outputs(E[ok]) if model.network is not None else CellOutputs.of_embedding(model.standardise(E[ok]))
    out.residual = None if residual is None else residual[ok]
    return out, ok


def _fit_scored(
    cells,
    y: np.ndarray,
    classes: list[str],
    embedder,
    net_cfg,
    cfg,
    *,
    seed: int,
    progress: bool,
    with_network: bool = True,
):
    """:func:`_fit_pipeline` plus the novelty statistics of the cells it was fitted on."""
    model, E_fit, y_fit = _fit_pipeline(
        cells, y, embedder, net_cfg, cfg, seed=seed, progress=progress, with_network=with_network
    )
    model.classes = classes
    out = model.outputs(E_fit) if with_network else CellOutputs.of_embedding(model.standardise(E_fit))
    model.novelty = NoveltyScorer().fit(out, y_fit, seed=seed)
    return model


def _refit_network(
    model: SpikGPTModel,
    cells,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int,
    progress: bool,
) -> None:
    """Retrain ``model``'s classifier on every reference cell, calibration and validation cells included.

    The first (calibration) network is a single member; the refit trains the ``cfg.members``
    networks of the final classifier. They train for the epochs that early stopping chose for
    the first network, but at least ``cfg.refit_min_steps`` optimiser steps and at most
    ``cfg.max_epochs``, with no cell held out. Embedder, scaling and every novelty statistic
    stay those fitted without the calibration cells, and the first network is kept as the
    model's ``calibration_network``: the scores that read a network are computed with it, the
    network that scored the calibration cells, so every Unknown rule is unchanged by the refit.
    """
    E, ok = _reference_embedding(model.embedder, cells)
    first = model.summary["history"]
    n = int(ok.sum())
    floor = math.ceil(cfg.refit_min_steps / math.ceil(n / batch_size(n, cfg)))
    epochs = min(cfg.max_epochs, max(int(first["best_epoch"]) + 1, floor))
    final = replace(cfg, val_fraction=0.0, max_epochs=epochs)
    net, history = fit_network(model.standardise(E[ok]), y[ok], model.network.cfg, final, seed=seed, progress=progress)
    model.calibration_network = model.network
    model.network, model.train_config = net, cfg  # the calibration network's config said members=1
    model.summary["history"] = {k: v for k, v in history.items() if not isinstance(v, list)}
    model.summary["calibration_network"] = first


def _held_out_scores(
    model: SpikGPTModel, cells, y: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """Novelty scores of cells ``model`` never saw, whether it labels them right, and their standardised embedding.

    A model without a network gives the scores that read none, and ``None`` for the labels.
    """
    out, ok = _embedded_outputs(model, cells)
    if model.network is None:
        return model.raw_scores(out, tuple(n for n in SCORES if n not in NETWORK_SCORES)), None, out.embedding
    return model.raw_scores(out), out.probs.argmax(axis=1) == y[ok], out.embedding


def train(
    adata: ad.AnnData | str | os.PathLike,
    label_key: str,
    *,
    embedder: str | Embedder = "default",
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    network: NetworkConfig | dict | None = None,
    train_config: TrainConfig | None = None,
    fdr: float = DEFAULT_FDR,
    mapping: bool = True,
    calibration_fraction: float = 0.2,
    calibration_folds: int | None = None,
    refit: bool = True,
    novelty: str = "combined",
    min_cells_per_class: int = MIN_SPLIT_CELLS,
    seed: int = 0,
    progress: bool = True,
) -> SpikGPTModel:
    """Train a spiking-transformer annotator on a labelled reference.

    The Unknown rule is calibrated on novelty scores of reference cells that no fitted step
    (embedder, scaling, classifier, early stopping, novelty statistics) has seen; query cells get
    conformal p-values against them (:mod:`spikgpt.openset.decision`). The classifier is first
    trained without a stratified share ``calibration_fraction`` of the reference (its
    early stopping), then (``refit``) again on every cell, so no labelled cell is lost to
    calibration or validation. With ``calibration_folds=1`` that share calibrates. With
    ``calibration_folds=k`` the reference is instead cross-fitted: each of k stratified folds is
    scored by a model fitted on the others, every cell calibrates, and those k fold models are
    kept in the model to score the query (each cell by one of them, drawn from its name; k more
    embedder fits, and k networks only for a novelty score that reads one). The default
    (``None``) cross-fits with 5 folds on references of up to 50,000 cells when the novelty
    score reads no network (the default's), and otherwise where 80 or fewer cells would be held
    out (:func:`auto_calibration_folds`): held out, the worst dataset's FDR was 0.30–0.55 at every
    reference size measured (150 cells to full size), cross-fitted ≤ 0.07 (README, small
    references). On a reference of under ~105 cells, whose folds are too small for the
    neighbourhood test, a cross-fitted model calls no cell Unknown in a query that the shift
    correction judged shifted as a whole (it warns, and ``global_shift_removed`` counts the
    withheld calls). Types too small to hold any cell out
    have no calibration cell and are not tested (``summary["calibration"]["uncalibrated_types"]``).
    The input is not modified.

    Parameters
    ----------
    adata
        Reference AnnData or ``.h5ad`` path.
    label_key
        ``obs`` column with cell types.
    embedder
        ``"default"`` (built-in: marker and variable genes, per-cell ranks, PCA; options in
        :func:`~spikgpt.embed.make_embedder`), ``"obsm:KEY"`` or ``"scgpt:PATH"``.
    layer, use_raw
        Expression source: ``X`` (default), ``layers[layer]`` or ``raw``. Raw counts and
        log-normalised values are both accepted.
    gene_key
        ``var`` column with gene symbols (``var_names`` by default).
    network
        Architecture overrides (:class:`~spikgpt.model.NetworkConfig` fields other than
        ``in_dim`` and ``n_classes``).
    train_config
        Optimisation settings (:class:`~spikgpt.model.TrainConfig`).
    fdr
        Default false discovery rate of the ``Unknown`` calls (the share of them allowed to be
        cells of known types), 0.10; :func:`annotate` can override it.
    mapping
        Map query embeddings onto the reference before classifying (:mod:`spikgpt.mapping`);
        :func:`annotate` can override it.
    calibration_fraction
        Share of reference cells held out to calibrate the threshold (when not cross-fitting);
        0 trains on every cell and skips calibration (no cell is ever ``Unknown``).
    calibration_folds
        ``None`` (default): :func:`auto_calibration_folds` (5 up to 50,000 cells with the
        default novelty score). 1: hold ``calibration_fraction`` out. k ≥ 2: cross-fit with k
        folds. The classifier is trained the same way in every case.
    refit
        After calibrating on held-out cells, train the classifier again on every reference
        cell (calibration and validation cells included) for the number of epochs early
        stopping chose, at least ``TrainConfig.refit_min_steps`` optimiser steps. Embedder,
        scaling and the novelty statistics keep their held-out fit, and the first network
        stays in the model (``calibration_network``) to compute the novelty scores that read a
        network, so the Unknown rule is unchanged. Doubles training time. Chosen
        leave-one-dataset-out over full-size and 100-cell references (README, "Design
        decisions"). ``summary["calibration_network"]`` keeps the first network's history.
    novelty
        Default novelty score for ``Unknown`` (see :mod:`spikgpt.openset.novelty`):
        ``"combined"`` or one of its components.
    min_cells_per_class
        Classes with fewer cells are not split: all their cells train the classifier (none
        validates or calibrates), so a 1-cell type is still learned and predicted. The model's
        ``summary["rare_classes"]`` lists them.
    seed
        Seeds every random step; equal seeds give identical models.
    progress
        Show progress bars.

    Returns
    -------
    The trained :class:`~spikgpt.SpikGPTModel`.
    """
    check_calibration_fraction(calibration_fraction)
    check_calibration_folds(calibration_folds)
    check_fdr(fdr)
    score_names(novelty, DEFAULT_COMBINATION)
    kw = {
        "embedder": embedder,
        "network": network,
        "train_config": train_config,
        "fdr": fdr,
        "mapping": mapping,
        "calibration_fraction": calibration_fraction,
        "calibration_folds": calibration_folds,
        "refit": refit,
        "novelty": novelty,
        "min_cells_per_class": min_cells_per_class,
        "seed": seed,
        "progress": progress,
        "source": {"layer": layer, "use_raw": use_raw, "gene_key": gene_key},
    }
    if not isinstance(adata, ad.AnnData) and _stored_cells(adata) > STREAM_REFERENCE_CELLS:
        # An atlas reference: trained from the file, read in chunks, never whole in memory.
        spec = make_embedder(embedder)
        keys = (spec.key,) if isinstance(spec, ObsmEmbedder) else ()
        path = check_input_file(adata)
        with stored_reference(path, layer=layer, use_raw=use_raw, gene_key=gene_key, obsm_keys=keys) as ref:
            obs, var, cells = ref
            return _train(cells, ad.AnnData(obs=obs), len(var), label_key, **kw)
    adata = read(adata)
    cells = Cells(adata, layer=layer, use_raw=use_raw, gene_key=gene_key)
    cells.expression()  # validate the whole input before any split
    return _train(cells, adata, adata.n_vars, label_key, **kw)


def _stored_cells(path: str | os.PathLike) -> int:
    """Cells in an ``.h5ad`` / ``.zarr`` reference: the length of its ``obs`` index."""
    path = check_input_file(path)
    store = open_store(path)
    try:
        return len(obs_index(store))
    finally:
        close_store(store)


def _train(
    cells,
    adata: ad.AnnData,
    n_genes: int,
    label_key: str,
    *,
    embedder,
    network,
    train_config,
    fdr: float,
    mapping: bool,
    calibration_fraction: float,
    calibration_folds: int | None,
    refit: bool,
    novelty: str,
    min_cells_per_class: int,
    seed: int,
    progress: bool,
    source: dict,
) -> SpikGPTModel:
    """:func:`train` on ``cells`` (in memory or :class:`~spikgpt.streaming.StoredCells`); labels from ``adata.obs``."""
    t0 = time.perf_counter()
    y, classes = labels_of(adata, label_key)
    if isinstance(network, dict):
        network = NetworkConfig(in_dim=1, n_classes=len(classes), **network)
    net_cfg = replace(network or NetworkConfig(in_dim=1, n_classes=1), n_classes=len(classes))
    cfg = train_config or TrainConfig()

    counts = np.bincount(y, minlength=len(classes))
    rare = [c for c, n in zip(classes, counts, strict=True) if n < max(min_cells_per_class, 2)]
    if rare:
        logger.warning(
            "%d cell type(s) have fewer than %d cells and train on all of them (none held out for "
            "validation or calibration; the threshold is set on the other types): %s.",
            len(rare),
            min_cells_per_class,
            ", ".join(f"{c} ({counts[classes.index(c)]})" for c in rare),
        )
    # Every fitted step (embedder, network, novelty statistics) on fixed thread counts: see cpu_settings.
    with cpu_settings(cfg.num_threads):
        fit = {"embedder": embedder, "net_cfg": net_cfg, "cfg": cfg, "seed": seed}
        # Networks that only score held-out cells or choose the refit's epochs are single members.
        single = {**fit, "cfg": replace(cfg, members=1)}
        fit_idx, cal_idx = stratified_split(y, calibration_fraction, min_cells=min_cells_per_class, seed=seed)
        # fold models need a network only for a novelty score that reads one
        fold_networks = bool(NETWORK_SCORES.intersection(score_names(novelty, DEFAULT_COMBINATION)))
        k = calibration_folds
        if k is None:
            k = auto_calibration_folds(len(cal_idx), len(y), fold_networks=fold_networks)
        k = k if len(cal_idx) else 1
        fold = stratified_folds(y, k, min_cells=min_cells_per_class, seed=seed) if k > 1 else np.full(len(y), -1)
        crossfit = bool((fold >= 0).any())
        if len(cal_idx):
            first = single if refit else fit
            model = _fit_scored(cells.subset(fit_idx), y[fit_idx], classes, **first, progress=progress)
            if not crossfit:  # cross-fitted, every cell is scored by its fold model below
                scores, correct, positions = _held_out_scores(model, cells.subset(cal_idx), y[cal_idx])
                how, whose = "held out of training", "their accuracy"
            elif not fold_networks:  # fold models without a network label nothing: this network's accuracy
                out, ok = _embedded_outputs(model, cells.subset(cal_idx))
                correct = out.probs.argmax(axis=1) == y[cal_idx][ok]
                whose = f"the classifier's accuracy on the {len(correct)} cells held out of its first fit"
            if refit:
                _refit_network(model, cells, y, cfg, seed=seed, progress=progress)
        else:
            model, _, _ = _fit_pipeline(cells.subset(fit_idx), y[fit_idx], **fit, progress=progress)
            model.classes, correct = classes, np.zeros(0, dtype=bool)
        if crossfit:
            # Cross-fitting: every cell is scored by a fold model fitted without it, and the fold
            # models score the query too (SpikGPTModel.fold_scores); the classifier is the one above.
            parts = []
            for j in tqdm(range(k), desc="cross-fitting", unit="fold", disable=None if progress else True, leave=False):
                kept, held = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
                fold_model = _fit_scored(
                    cells.subset(kept), y[kept], classes, **single, progress=False, with_network=fold_networks
                )
                parts.append(_held_out_scores(fold_model, cells.subset(held), y[held]))
                # its held-out cells' scores and positions in its own embedding: the neighbourhood test's null
                fold_model.novelty.calibrate(parts[-1][0], parts[-1][2], seed=seed)
                model.fold_models.append(fold_model)
            scores = {name: np.concatenate([p[0][name] for p in parts]) for name in parts[0][0]}
            positions = None
            if fold_networks:
                correct, whose = np.concatenate([p[1] for p in parts]), "their accuracy"
            how = f"out-of-fold in {k}-fold cross-fitting"
    n_cal = len(next(iter(scores.values()))) if len(correct) else 0
    calibration = {"n_cells": n_cal, "folds": k if crossfit else 1}
    if n_cal:
        calibrated = set(y[fold >= 0]) if crossfit else set(y[cal_idx])
        calibration["uncalibrated_types"] = [c for i, c in enumerate(classes) if i not in calibrated]
    model.novelty_method, model.fdr, model.mapping = novelty, fdr, mapping
    if n_cal:
        model.novelty.calibrate(scores, positions, seed=seed)
        calibration.update(accuracy=float(correct.mean()))
        logger.info(
            "Novelty (%s) calibrated on %d reference cells, %s (%s %.3f).",
            novelty,
            n_cal,
            how,
            whose,
            calibration["accuracy"],
        )
        if (smallest := model.smallest_pvalue()) > 0:
            logger.warning(
                "Only %d reference cells calibrate the Unknown rule: no p-value can fall below %.3f, so at "
                "FDR %s few or no query cells will be called Unknown. annotate(..., false_unknown=...) tests "
                "cells one by one; calibration_folds=5 calibrates on every reference cell.",
                n_cal,
                smallest,
                fdr,
            )
    model.summary.update(
        n_cells=int(adata.n_obs),
        n_genes=int(n_genes),
        label_key=label_key,
        class_counts={c: int(n) for c, n in zip(classes, counts, strict=True)},
        rare_classes=rare,
        min_cells_per_class=min_cells_per_class,
        input=source,
        embedder=model.embedder.spec,
        seed=seed,
        calibration=calibration,
        train_seconds=round(time.perf_counter() - t0, 2),
    )
    return model


def annotate(
    adata: ad.AnnData | str | os.PathLike,
    model: SpikGPTModel | str | os.PathLike,
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
    copy: bool = False,
    progress: bool = True,
) -> ad.AnnData | None:
    """Annotate cells with a trained model, calling cells of types absent from the reference ``Unknown``.

    Every query cell is tested against the model's held-out reference cells (conformal
    p-values, see :mod:`spikgpt.openset.decision`); cells whose test is rejected at false
    discovery rate ``fdr`` over the query are ``Unknown``. Before that, the query embedding is
    moved onto the reference by one translation estimated from mutual nearest neighbours
    (:mod:`spikgpt.mapping`), which removes a batch/protocol shift without aligning a new type
    away. Writes, with ``key_added="spikgpt"``:

    - ``obs["spikgpt_label"]``: predicted cell type, or ``Unknown``;
    - ``obs["spikgpt_raw_label"]``: predicted cell type before rejection (missing for a cell
      that could not be embedded);
    - ``obs["spikgpt_confidence"]``: softmax maximum of the time-averaged logits (0 for
      cells the embedder could not embed);
    - ``obs["spikgpt_pvalue"]``: novelty p-value (small = unlike every held-out reference
      cell); ``obs["spikgpt_qvalue"]``: its (Storey-adaptive) Benjamini–Hochberg adjustment. A cell is
      ``Unknown`` iff ``qvalue <= fdr``, so ``obs["spikgpt_qvalue"] <= 0.05`` re-decides at 5 %
      without re-running (and ``obs["spikgpt_pvalue"] <= 0.01`` as ``false_unknown=0.01`` would);
    - ``obs["spikgpt_unknown_reason"]``: the score that made a cell ``Unknown``
      (``neighbourhood`` where the test of its 10 nearest query cells did, ``not_embedded`` for
      cells that could not be embedded), empty otherwise;
    - ``obsm["X_spikgpt_embedding"]``: the (mapped) cell embedding the classifier consumed;
    - ``uns["spikgpt"]``: FDR (or ``false_unknown``), novelty score, mapping shift, global shift
      removed (``global_shift_removed``: location and scale in ``−log p`` units, how many
      predicted types were corrected on their own, and ``unknown_withheld``: the cells a
      cross-fitted model did not call Unknown, although the rule would have, because the query
      was shifted as a whole), ``untested_types`` (types with no calibration cell: cells
      predicted as them get p-value 1 and are never ``Unknown``), settings.

    The query is held in memory; :func:`spikgpt.annotate_file` gives the same results for a
    file or store read in chunks (what ``spikgpt annotate`` runs).

    Parameters
    ----------
    adata
        Query AnnData or ``.h5ad`` path (then ``copy`` is implied).
    model
        A :class:`~spikgpt.SpikGPTModel` or a model folder.
    layer, use_raw, gene_key
        Expression source and gene names of the query (see :func:`train`).
    novelty
        ``"combined"`` (the model's default components) or one of
        :data:`spikgpt.openset.novelty.SCORES` the model was calibrated with; the model's default
        when ``None``. A score that reads the network (``NETWORK_SCORES``) needs a model trained
        with it: a cross-fitted model's fold models have a network only then (0.23), and the
        ``ValueError`` says so before any work.
    fdr
        False discovery rate of the ``Unknown`` calls; the model's (0.10) when ``None``; 0 calls
        nothing ``Unknown``.
    mapping
        Map the query onto the reference first; the model's setting (on) when ``None``.
    shift
        Correction of a global shift of the query's p-values (:data:`spikgpt.openset.decision.SHIFT_MODES`,
        optionally ``"MODE@matched"``: estimated on the query cells the mapping matched to
        reference cells); the model's (``"gated_by_type"`` since 0.10, ``"gated"`` before) when
        ``None``. ``"none"`` gives more power when the query is from the reference's own study and
        many of its cells are new, at the cost of false Unknown under batch shifts.
    false_unknown
        Instead of ``fdr``: the share of known cells you accept to see called ``Unknown`` (e.g.
        0.01). Every cell is tested on its own at that level (``Unknown`` iff its p-value is at
        most ``false_unknown``), so a handful of new cells in a large query can be called,
        which the FDR rule rarely does — but among few new cells most calls may then be known
        cells. Measured in the README (*Unknown*).
    key_added
        Prefix of the keys written.
    copy
        Return an annotated copy instead of writing into ``adata``.
    progress
        Progress bar on long queries (terminal only).

    Returns
    -------
    The annotated AnnData when ``copy`` is true or a path was given, else ``None``.
    """
    if shift is not None:
        check_shift(shift)
    from_path = not isinstance(adata, ad.AnnData)
    adata = read(adata)
    if copy and not from_path:
        adata = adata.copy()
    model = SpikGPTModel.coerce(model)
    fdr = model.fdr if fdr is None else float(fdr)
    check_fdr(fdr)
    if false_unknown is not None:
        check_false_unknown(false_unknown)
    method = novelty or model.novelty_method
    t0 = time.perf_counter()
    cells = Cells(adata, layer=layer, use_raw=use_raw, gene_key=gene_key)
    pred = model.predict(
        cells, novelty=method, fdr=fdr, mapping=mapping, shift=shift, false_unknown=false_unknown, progress=progress
    )
    cols = annotation_columns(
        model, pred.raw_label, pred.confidence, pred.pvalue, pred.qvalue, pred.unknown, pred.reason, key_added
    )
    for name in cols.columns:
        adata.obs[name] = cols[name].array
    adata.obsm[f"X_{key_added}_embedding"] = pred.embedding
    adata.uns[key_added] = annotation_summary(
        model,
        method,
        fdr,
        pred.mapping,
        shift,
        pred.shift,
        pred.unknown,
        pred.embedded,
        {"layer": layer, "use_raw": use_raw, "gene_key": gene_key},
        time.perf_counter() - t0,
        false_unknown,
    )
    logger.info(
        "Annotated %d cells; %d Unknown %s.",
        adata.n_obs,
        adata.uns[key_added]["n_unknown"],
        rule_text(fdr, false_unknown),
    )
    warn_if_mostly_unknown(pred.unknown, key_added, pred.raw_label)
    return adata if (copy or from_path) else None


def annotation_columns(
    model: SpikGPTModel,
    raw_label: np.ndarray,
    confidence: np.ndarray,
    pvalue: np.ndarray,
    qvalue: np.ndarray,
    unknown: np.ndarray,
    reason: np.ndarray,
    key_added: str = "spikgpt",
) -> pd.DataFrame:
    """The ``obs`` columns :func:`annotate` writes (one row per cell, default index)."""
    return pd.DataFrame(
        {
            f"{key_added}_label": pd.Categorical(reject(raw_label, unknown), categories=[*model.classes, UNKNOWN]),
            f"{key_added}_raw_label": pd.Categorical(raw_label, categories=model.classes),
            f"{key_added}_confidence": np.asarray(confidence, dtype=np.float32),
            f"{key_added}_pvalue": pvalue,
            f"{key_added}_qvalue": qvalue,
            f"{key_added}_unknown_reason": np.where(unknown, reason, "").astype(str),
        }
    )


def annotation_summary(
    model: SpikGPTModel,
    method: str,
    fdr: float,
    mapped: Mapping | None,
    shift: str | None,
    removed: dict,
    unknown: np.ndarray,
    embedded: np.ndarray,
    source: dict,
    seconds: float,
    false_unknown: float | None = None,
) -> dict:
    """The ``uns`` entry :func:`annotate` writes (``unknown_rule``: ``"fdr"`` or ``"false_unknown"``)."""
    return {
        "spikgpt_version": __version__,
        "embedder": model.embedder.spec,
        "novelty": method,
        "novelty_components": list(score_names(method, model.novelty_components)),
        "fdr": fdr,
        "unknown_rule": "fdr" if false_unknown is None else "false_unknown",
        "false_unknown": float("nan") if false_unknown is None else float(false_unknown),
        "mapping": {
            "applied": mapped is not None,
            "shift_norm": 0.0 if mapped is None else mapped.norm,
            "mutual_pairs": 0 if mapped is None else mapped.n_pairs,
        },
        "shift_correction": shift or model.shift,
        "global_shift_removed": removed,
        "classes": list(model.classes),
        "untested_types": model.uncalibrated_types if model.novelty is not None else [],
        "n_unknown": int(unknown.sum()),
        "n_not_embedded": int((~embedded).sum()),
        "input": {"layer": source["layer"] or "", "use_raw": source["use_raw"], "gene_key": source["gene_key"] or ""},
        "seconds": round(seconds, 3),
    }


def rule_text(fdr: float, false_unknown: float | None) -> str:
    """How the Unknown calls were decided, for log messages."""
    return f"at FDR {fdr:.2f}" if false_unknown is None else f"at per-cell false Unknown {false_unknown:.3f}"


#: Fewest embedded cells of a predicted type for :func:`warn_if_mostly_unknown` to name it.
WARN_TYPE_CELLS = 20


def warn_if_mostly_unknown(
    unknown: np.ndarray,
    key_added: str = "spikgpt",
    raw_label: np.ndarray | None = None,
) -> None:
    """Warn when more than half of a query of at least 50 cells is Unknown, or of a predicted type.

    A predicted type (``raw_label``; missing for cells that could not be embedded, which are
    left out) of at least :data:`WARN_TYPE_CELLS` cells, more than half of them
    Unknown, is named: either a type absent from the reference resembles it, or the query moved
    that type by more than the corrections removed (a protocol need not move every type alike).
    """
    if len(unknown) >= 50 and unknown.mean() > 0.5:
        logger.warning(
            "%.0f%% of the cells are Unknown. Either most of the query is of types absent from the "
            "reference, or it differs from the reference by more than the mapping removed; compare "
            "obs['%s_raw_label'].",
            100 * unknown.mean(),
            key_added,
        )
        return
    if raw_label is None:
        return
    ok = pd.notna(np.asarray(raw_label, dtype=object))  # no label: a cell that could not be embedded
    labels, unknown = np.asarray(raw_label)[ok], np.asarray(unknown)[ok]
    types, counts = np.unique(labels, return_counts=True)
    mostly = [
        f"{t} ({share:.0%} of {n})"
        for t, n in zip(types, counts, strict=True)
        if n >= WARN_TYPE_CELLS and (share := unknown[labels == t].mean()) > 0.5
    ]
    if mostly:
        logger.warning(
            "Most cells predicted as %s are Unknown: a type absent from the reference resembles them, or "
            "the query moved them by more than was corrected (uns['%s']['global_shift_removed']); "
            "obs['%s_raw_label'] keeps their labels.",
            ", ".join(mostly),
            key_added,
            key_added,
        )


def embed_scgpt(
    adata: ad.AnnData | str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    max_length: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    key_added: str = "X_scGPT",
    progress: bool = True,
    copy: bool = False,
) -> ad.AnnData | None:
    """Compute scGPT cell embeddings into ``obsm[key_added]``.

    Parameters
    ----------
    adata
        AnnData or ``.h5ad`` path with raw counts (any per-cell monotone transform gives the
        same bins; scGPT bins each cell's values).
    checkpoint
        Official scGPT checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``).
    layer, use_raw
        Expression source (``X`` by default).
    gene_key
        ``var`` column with gene symbols (``var_names`` by default).
    max_length
        Token cap including ``<cls>``.
    batch_size
        Cells per forward pass.
    seed
        Seed of tie-breaking and subsampling.
    key_added
        ``obsm`` key written; ``uns[key_added]`` records the settings.
    progress
        Progress bar with cells/s.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    The AnnData when ``copy`` is true or a path was given, else ``None``. Cells with no
    expressed vocabulary gene get a row of NaN.
    """
    from spikgpt.embed.scgpt import ScGPTEmbedder

    from_path = not isinstance(adata, ad.AnnData)
    adata = read(adata)
    if copy and not from_path:
        adata = adata.copy()
    emb = ScGPTEmbedder(checkpoint, max_length=max_length, batch_size=batch_size, seed=seed, progress=progress)
    t0 = time.perf_counter()
    E = emb.transform(Cells(adata, layer=layer, use_raw=use_raw, gene_key=gene_key))
    adata.obsm[key_added] = E
    adata.uns[key_added] = {
        "checkpoint": str(emb.ckpt.path),
        "sha256": emb.ckpt.sha256,
        "max_length": max_length,
        "seed": seed,
        "n_not_embedded": int(np.isnan(E[:, 0]).sum()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return adata if (copy or from_path) else None
