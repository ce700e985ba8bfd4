"""``spikgpt bench``: every task × method × seed, open-set scores, tables and figures."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

from spikgpt import __version__
from spikgpt.api import annotate, train
from spikgpt.bench import figures, metrics
from spikgpt.bench.baselines import DEFAULT_PEERS, PEERS, MethodResult, embedding_baselines, peer_runner, run_peer
from spikgpt.bench.metrics import closed_set
from spikgpt.bench.openset import leave_one_type_out, score_aurocs
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS, Task, subsample_reference
from spikgpt.model.training import TrainConfig
from spikgpt.openset.novelty import SCORES

logger = logging.getLogger("spikgpt")

#: Tasks whose leave-one-type-out open-set evaluation runs (one retraining per type).
LOTO_TASKS = ("pbmc68k_split",)
#: Novelty columns of the open-set tables: annotate's p-value, then every raw score.
NOVELTY_COLUMNS = ("decision", *SCORES)
NOVELTY_NOTE = (
    "`decision` = the p-value `annotate` tests (default scores, after mapping and the shift correction); "
    "the other columns are single raw scores, cell by cell, after mapping."
)


def _train_spikgpt(ref, task: Task, seed: int, spiking: bool, train_kw: dict):
    t0 = time.perf_counter()
    network = {"spiking": spiking}
    model = train(ref, task.label_key, seed=seed, progress=False, network=network, **task.input_kw, **train_kw)
    return model, time.perf_counter() - t0


def _annotate_spikgpt(model, query, task: Task, train_seconds: float) -> tuple[MethodResult, object]:
    t0 = time.perf_counter()
    annotated = annotate(query, model, copy=True, **task.input_kw)
    res = MethodResult(
        annotated.obs["spikgpt_raw_label"].astype(str).to_numpy(),
        annotated.obs["spikgpt_label"].astype(str).to_numpy(),
        annotated.obs["spikgpt_confidence"].to_numpy(),
        train_seconds,
        time.perf_counter() - t0,
        {},
    )
    return res, annotated


def query_variants(query, label_key: str, classes: list[str], seed: int) -> list[tuple[str, object]]:
    """The query and its composition-shifted variants (issue 13).

    The query's most abundant reference type removed (``"− TYPE"``), and kept at 10 % of its cells
    (``"TYPE 10%"``, seeded): a mapping or correction estimated from the query's own cells must
    survive a query whose make-up differs from the reference's.
    """
    truth = query.obs[label_key].astype(str).to_numpy()
    known = truth[np.isin(truth, classes)]
    if len(np.unique(known)) < 2:
        return [("", query)]
    types, counts = np.unique(known, return_counts=True)
    top = str(types[counts.argmax()])
    members = np.flatnonzero(truth == top)
    kept = np.random.default_rng(seed).choice(members, max(1, round(0.1 * len(members))), replace=False)
    rare = np.sort(np.concatenate([np.flatnonzero(truth != top), kept]))
    return [("", query), (f" − {top}", query[truth != top].copy()), (f" {top} 10%", query[rare].copy())]


def _method_row(r: MethodResult, truth: np.ndarray, classes: list[str]) -> dict:
    """One method's metrics on one query."""
    known = np.isin(truth, classes)
    per_class = f1_score(truth[known], r.raw_label[known], labels=classes, average=None, zero_division=0)
    return {
        **closed_set(truth, r.raw_label, classes),
        "macro_f1_after_rejection": closed_set(truth, r.label, classes)["macro_f1"],
        "false_unknown": metrics.unknown_rates(truth, r.label, classes)["false_unknown_known"],
        "per_class_f1": dict(zip(classes, map(float, per_class), strict=True)),
        "train_seconds": r.train_seconds,
        "predict_cells_per_s": len(truth) / max(r.predict_seconds, 1e-9),
        **r.extra,
    }


def _record_rejection(open_set: dict, results: dict, truth: np.ndarray, classes: list[str]) -> None:
    """Append spikgpt's and every peer's Unknown rates (and the peers' confidence AUROC) to ``open_set``."""
    sp = metrics.unknown_rates(truth, results["spikgpt"].label, classes)
    open_set["spikgpt_unknown"].append(sp["unseen_called_unknown"])
    open_set["spikgpt_false_unknown"].append(sp["false_unknown_known"])
    for peer in (p for p in PEERS if p in results):
        o = metrics.open_set(truth, results[peer].label, -results[peer].score, classes)
        row = open_set["peers"].setdefault(peer, {"auroc": [], "unknown": [], "false_unknown": []})
        row["auroc"].append(o["unseen_auroc"])
        row["unknown"].append(o["unseen_called_unknown"])
        row["false_unknown"].append(o["false_unknown_known"])


def _figures(fig_dir: Path, name: str, truth, results: dict, runs: dict, annotated, label_key: str, seed: int) -> None:
    """Confusion matrix, per-class F1 by method and the query UMAP of one query."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures.confusion(truth, results["spikgpt"].label, fig_dir / f"{name}_confusion.png", f"spikgpt on {name}")
    f1_table = pd.DataFrame({n: v[-1]["per_class_f1"] for n, v in runs.items()})
    figures.per_class_f1(f1_table, fig_dir / f"{name}_per_class_f1.png", f"per-class F1, {name}")
    figures.query_umap(annotated, label_key, fig_dir / f"{name}_umap.png", seed=seed)


def run_task(
    task: Task,
    seeds: list[int],
    *,
    data_root: Path,
    peers: tuple[str, ...],
    out: Path,
    venv_prefix: str,
    composition: bool = False,
    reference_cells: int | None = None,
    train_kw: dict | None = None,
) -> dict[str, dict]:
    """Every method on one task (and, with ``composition``, its query variants), over seeds.

    Models are trained once per seed and annotate every variant of the query. With
    ``reference_cells`` every method sees the same seeded, stratified sample of the reference
    (:func:`~spikgpt.bench.tasks.subsample_reference`); ``train_kw`` goes to :func:`spikgpt.train`
    for spikgpt and the twin (e.g. a ``train_config``). Returns one result
    per variant, keyed by the task name plus the variant's suffix; open-set scores and figures
    come from the unchanged query (figures for the first seed).
    """
    per_method: dict[str, dict[str, list[dict]]] = {}
    open_set: dict = {"scores": {}, "spikgpt_unknown": [], "spikgpt_false_unknown": [], "peers": {}}
    info: dict[str, dict] = {}
    for seed in seeds:
        ref, full_query = task.load(data_root, seed)
        if reference_cells is not None:
            ref = subsample_reference(ref, task.label_key, reference_cells, seed)
        classes = sorted(set(ref.obs[task.label_key].astype(str)))
        spiking, spiking_s = _train_spikgpt(ref, task, seed, spiking=True, train_kw=train_kw or {})
        twin, twin_s = _train_spikgpt(ref, task, seed, spiking=False, train_kw=train_kw or {})
        variants = query_variants(full_query, task.label_key, classes, seed) if composition else [("", full_query)]
        for suffix, query in variants:
            name = task.name + suffix
            truth = query.obs[task.label_key].astype(str).to_numpy()
            unseen = ~np.isin(truth, classes)
            info[name] = {
                "description": task.description + (f" Query variant:{suffix}." if suffix else ""),
                "n_reference": ref.n_obs,
                "n_query": query.n_obs,
                "unseen_types": sorted(set(truth[unseen])),
                "sources": task.sources,
            }
            results: dict[str, MethodResult] = {}
            results["spikgpt"], annotated = _annotate_spikgpt(spiking, query, task, spiking_s)
            results["non-spiking twin"], _ = _annotate_spikgpt(twin, query, task, twin_s)
            results.update(embedding_baselines(spiking, ref, query, task.label_key, **task.input_kw))
            for peer in peers:
                try:
                    results[peer] = run_peer(
                        peer,
                        ref,
                        query,
                        task.label_key,
                        use_raw=task.use_raw,
                        seed=seed,
                        venv=Path(venv_prefix + peer_runner(peer)),
                    )
                except (RuntimeError, OSError) as err:
                    logger.warning("%s skipped on %s: %s", peer, name, err)
            for method, r in results.items():
                per_method.setdefault(name, {}).setdefault(method, []).append(_method_row(r, truth, classes))
            if suffix:
                continue
            if unseen.any():
                for score, v in score_aurocs(spiking, query, task.label_key, **task.input_kw).items():
                    open_set["scores"].setdefault(score, []).append(v)
                _record_rejection(open_set, results, truth, classes)
            if seed == seeds[0]:
                _figures(out / "figures", name, truth, results, per_method[name], annotated, task.label_key, seed)
    return {
        name: {
            **info[name],
            "methods": per_method[name],
            "open_set": open_set if name == task.name and open_set["scores"] else {},
        }
        for name in per_method
    }


def _ms(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")


def _task_by_method(tasks: dict, methods: list[str], cell: Callable[[list[dict]], str]) -> list[str]:
    """Markdown rows of a task × method table; ``cell`` formats one method's runs on one task."""
    lines = ["| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name, t in tasks.items():
        cells = [cell(runs) if (runs := t["methods"].get(m)) else "–" for m in methods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """The summary tables of a benchmark run."""
    tasks = results["tasks"]
    methods = sorted({m for t in tasks.values() for m in t["methods"]}, key=lambda m: (m != "spikgpt", m))
    lines = ["## Closed set: macro-F1 (accuracy) on query cells of reference types, mean ± sd over seeds", ""]
    lines += _task_by_method(
        tasks,
        methods,
        lambda runs: f"{_ms([r['macro_f1'] for r in runs])} ({np.mean([r['accuracy'] for r in runs]):.3f})",
    )
    lines += ["", "## Speed: training seconds / prediction cells per second (mean over tasks and seeds)", ""]
    lines.append("| method | train s | predict cells/s |")
    lines.append("|---|---|---|")
    for m in methods:
        runs = [r for t in tasks.values() for r in t["methods"].get(m, [])]
        train_s = np.mean([r["train_seconds"] for r in runs])
        speed = np.mean([r["predict_cells_per_s"] for r in runs])
        lines.append(f"| {m} | {train_s:.2f} | {speed:,.0f} |")
    rejecting = [m for m in ("spikgpt", *PEERS) if m in methods]
    lines += [
        "",
        "## Unknown at the default FDR: false Unknown on known types (worst seed); known-type macro-F1 before → after",
        "",
        "; ".join(
            ["spikgpt: conformal p-values, Benjamini–Hochberg at FDR 0.10"]
            + [PEERS[m].rejection for m in rejecting if m in PEERS]
        )
        + " (counted as Unknown).",
        "",
    ]
    lines += _task_by_method(
        tasks,
        rejecting,
        lambda runs: (
            f"{_ms([r['false_unknown'] for r in runs])}"
            # a user runs one seed: a failure on one seed of five is theirs, and the mean hides it
            + (f" (worst {max(r['false_unknown'] for r in runs):.3f})" if len(runs) > 1 else "")
            + f"; {np.mean([r['macro_f1'] for r in runs]):.3f} → "
            f"{np.mean([r['macro_f1_after_rejection'] for r in runs]):.3f}"
        ),
    )
    open_tasks = {n: t["open_set"] for n, t in tasks.items() if t["open_set"]}
    if open_tasks:
        names = NOVELTY_COLUMNS
        peers = [p for p in PEERS if any(p in o.get("peers", {}) for o in open_tasks.values())]
        lines += ["", "## Open set: AUROC unseen vs known query cells, per novelty score", "", NOVELTY_NOTE, ""]
        lines.append(
            "| task | "
            + " | ".join([*names, *(f"{p} confidence" for p in peers), "spikgpt Unknown (unseen / known)"])
            + "".join(f" | {p} Unknown (unseen / known)" for p in peers)
            + " |"
        )
        lines.append("|---" * (len(names) + 2 * len(peers) + 2) + "|")
        for n, o in open_tasks.items():
            peer = [o.get("peers", {}).get(p, {"auroc": [], "unknown": [], "false_unknown": []}) for p in peers]
            row = [_ms(o["scores"].get(s, [])) for s in names] + [_ms(r["auroc"]) for r in peer]
            row.append(f"{_ms(o['spikgpt_unknown'])} / {_ms(o['spikgpt_false_unknown'])}")
            row += [f"{_ms(r['unknown'])} / {_ms(r['false_unknown'])}" for r in peer]
            lines.append(f"| {n} | " + " | ".join(row) + " |")
    for task_name, loto in results.get("leave_one_type_out", {}).items():
        names = [s for s in NOVELTY_COLUMNS if all(s in r["auroc"] for r in loto.values())]
        lines += ["", f"## Leave-one-type-out on {task_name}: AUROC per held-out type and score", "", NOVELTY_NOTE, ""]
        lines.append(
            "| held-out type | " + " | ".join(names) + " | Unknown | false Unknown | macro-F1 before → after |"
        )
        lines.append("|---" * (len(names) + 4) + "|")
        for t, r in loto.items():
            lines.append(
                f"| {t} | "
                + " | ".join(f"{r['auroc'][s]:.3f}" for s in names)
                + f" | {r['unseen_called_unknown']:.2f} | {r['false_unknown_known']:.3f}"
                + f" | {r['macro_f1_before']:.3f} → {r['macro_f1_after']:.3f} |"
            )
        means = [np.mean([r["auroc"][s] for r in loto.values()]) for s in names]
        worst = [np.min([r["auroc"][s] for r in loto.values()]) for s in names]
        lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in means) + " | | | |")
        lines.append("| worst | " + " | ".join(f"{v:.3f}" for v in worst) + " | | | |")
    h = results["hardware"]
    lines += [
        "",
        f"Hardware: {h['cpu_count']} CPU cores, {h['machine']}, torch {h['torch']} ({h['torch_threads']} threads), "
        f"spikgpt {h['spikgpt']}. Seeds: {results['seeds']}. Total {results['seconds']:.0f} s.",
    ]
    if results.get("reference_cells"):
        lines.append(
            f"Every reference subsampled to {results['reference_cells']} cells (seeded, stratified, per seed)."
        )
    if results.get("members"):
        lines.append(f"spikgpt's and the twin's classifiers: {results['members']} network(s) each.")
    return "\n".join(lines) + "\n"


def run_bench(
    out: str | os.PathLike,
    *,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    peers: tuple[str, ...] = DEFAULT_PEERS,
    loto: bool = True,
    composition: bool = True,
    data_root: str | os.PathLike | None = None,
    venv_prefix: str = ".venv-",
    reference_cells: int | None = None,
    members: int | None = None,
) -> dict:
    """Run the benchmark and write ``results.json``, ``results.md`` and ``figures/`` into ``out``.

    Parameters
    ----------
    out
        Output folder.
    tasks
        Task names (see :data:`spikgpt.bench.tasks.TASKS`); all by default.
    seeds
        Seeds to repeat every task with (default 0, 1, 2).
    peers
        Peers to run, each in its own virtual environment (created on first use); by default
        :data:`~spikgpt.bench.baselines.DEFAULT_PEERS` (CellTypist best match and majority
        voting, SingleR, Symphony); ``"scanvi"`` (scANVI + scArches, minutes per task) on
        request. See :data:`spikgpt.bench.baselines.PEERS`.
    loto
        Run leave-one-type-out on :data:`LOTO_TASKS`.
    composition
        Also score every task on composition-shifted queries (:func:`query_variants`): its most
        abundant reference type removed, and kept at 10 %.
    data_root
        Folder with the datasets (default: ``shared/data`` beside the repository).
    venv_prefix
        A peer's environment is ``venv_prefix + name`` (``.venv-celltypist``, ``.venv-singler``).
    reference_cells
        Train every method on a seeded, stratified sample of this many reference cells (the
        100–500-cell references of plate-based studies); the whole reference by default.
    members
        Networks of the classifier's ensemble (spikgpt's and the twin's, leave-one-type-out
        included); the default :class:`~spikgpt.model.training.TrainConfig`'s by default.

    Returns
    -------
    The results (also in ``results.json``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root else DEFAULT_DATA_ROOT
    seeds = seeds if seeds is not None else [0, 1, 2]
    names = tasks or list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        msg = f"Unknown task(s) {unknown}; choose from {list(TASKS)}."
        raise ValueError(msg)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        msg = f"Unknown peer(s) {unknown}; choose from {list(PEERS)}."
        raise ValueError(msg)
    if reference_cells is not None and reference_cells < 2:
        msg = f"reference_cells (--reference-cells) must be at least 2 (e.g. 100), got {reference_cells}."
        raise ValueError(msg)
    if members is not None and members < 1:
        msg = f"members (--members) must be at least 1, got {members}."
        raise ValueError(msg)
    # one set of training options for every model the bench trains (leave-one-type-out's included)
    train_kw = {} if members is None else {"train_config": TrainConfig(members=members)}
    results: dict = {"tasks": {}, "seeds": seeds, "reference_cells": reference_cells, "members": members}
    for n in names:
        logger.info("Task %s", n)
        results["tasks"].update(
            run_task(
                TASKS[n],
                seeds,
                data_root=root,
                peers=tuple(peers),
                out=out,
                venv_prefix=venv_prefix,
                composition=composition,
                reference_cells=reference_cells,
                train_kw=train_kw,
            )
        )
    if loto:
        results["leave_one_type_out"] = {}
        for n in [t for t in LOTO_TASKS if t in names]:
            task = TASKS[n]
            adata = task.read_reference(root)
            results["leave_one_type_out"][n] = leave_one_type_out(
                adata,
                task.label_key,
                seed=seeds[0],
                input_kw=task.input_kw,
                train_kw=train_kw,
            )
    results["seconds"] = time.perf_counter() - t0
    results["hardware"] = {
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "spikgpt": __version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown(results))
    return results
