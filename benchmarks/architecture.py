"""Embedder, network width and time steps, chosen leave-one-dataset-out on the bench tasks.

Each configuration (``NAME='{"time_steps": 8}'``: fields of :class:`spikgpt.model.NetworkConfig`,
plus ``"embedder"``: an embedder spec such as ``"default:hvg"`` or a dict of
:class:`~spikgpt.embed.default.DefaultEmbedder` settings, ``"train"``: a dict of
:class:`~spikgpt.model.TrainConfig` settings, and ``"refit"``: :func:`spikgpt.train`'s
``refit``) trains spikgpt on every task of
``spikgpt bench`` (unchanged queries) with seeds 0–2 and scores
the macro-F1 of the labels before Unknown. Leave-one-dataset-out: for each dataset the configuration with the
best mean on the other datasets is chosen and scored on it.

Usage: ``python benchmarks/architecture.py --configs T8='{"time_steps": 8}' D128='{"dim": 128}'
--out benchmarks/results/architecture``. The rows named ``default`` are those of the committed bench
run (``benchmarks/results/bench/results.json``), i.e. whatever the defaults were when it ran.
A configuration named ``default`` given on the command line (e.g. ``default='{"refit": false}'``)
replaces those rows, which is needed when the committed bench ran other code. With
``--reference-cells N`` each reference is first subsampled as ``spikgpt bench --reference-cells N``
does, and a configuration named ``default`` must be given.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

import spikgpt
from spikgpt.bench.metrics import closed_set
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS, subsample_reference
from spikgpt.embed.default import DefaultEmbedder
from spikgpt.model import TrainConfig

BENCH = Path(__file__).resolve().parent / "results" / "bench" / "results.json"


#: Configuration keys passed to :func:`spikgpt.train` as they are; with these, the keys that are not network fields.
TRAIN_KWARGS = ("refit",)
TRAIN_KEYS = ("embedder", "train", *TRAIN_KWARGS)


def run(name: str, config: dict, data_root: Path, reference_cells: int | None = None) -> list[dict]:
    network = {k: v for k, v in config.items() if k not in TRAIN_KEYS}
    extra = {k: config[k] for k in TRAIN_KWARGS if k in config}
    train_config = TrainConfig(**config.get("train", {}))
    embedder = config.get("embedder", "default")
    if isinstance(embedder, dict):  # DefaultEmbedder settings, e.g. {"markers_per_pair": 25}
        embedder = DefaultEmbedder(**embedder)
    rows = []
    for task_name, task in TASKS.items():
        for seed in (0, 1, 2):
            ref, query = task.load(data_root, seed)
            if reference_cells:
                ref = subsample_reference(ref, task.label_key, reference_cells, seed)
            model = spikgpt.train(
                ref,
                task.label_key,
                seed=seed,
                progress=False,
                network=network,
                embedder=embedder,
                train_config=train_config,
                **extra,
                **task.input_kw,
            )
            out = spikgpt.annotate(query, model, copy=True, progress=False, **task.input_kw)
            truth = query.obs[task.label_key].astype(str).to_numpy()
            pred = out.obs["spikgpt_raw_label"].astype(str).to_numpy()
            rows.append(
                {
                    "config": name,
                    "task": task_name,
                    "seed": seed,
                    "macro_f1": closed_set(truth, pred, list(model.classes))["macro_f1"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def default_rows() -> list[dict]:
    tasks = json.loads(BENCH.read_text())["tasks"]
    return [
        {"config": "default", "task": name, "seed": seed, "macro_f1": r["macro_f1"]}
        for name in TASKS
        for seed, r in enumerate(tasks[name]["methods"]["spikgpt"])
    ]


def lodo(rows: list[dict]) -> str:
    dataset = {t: t.split("_")[0] for t in TASKS}
    configs = sorted({r["config"] for r in rows})

    def mean(config: str, datasets: set[str]) -> float:
        return float(
            np.mean(
                [
                    np.mean([r["macro_f1"] for r in rows if r["config"] == config and r["task"] == t])
                    for t in TASKS
                    if dataset[t] in datasets
                ]
            )
        )

    lines = ["| task | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for t in TASKS:
        cells = [np.array([r["macro_f1"] for r in rows if r["config"] == c and r["task"] == t]) for c in configs]
        lines.append(f"| {t} | " + " | ".join(f"{v.mean():.3f} ± {v.std():.3f}" for v in cells) + " |")
    lines += ["", "| left out | chosen on the others | held-out macro-F1 | default |", "|---|---|---|---|"]
    held, base = [], []
    for d in sorted(set(dataset.values())):
        others = set(dataset.values()) - {d}
        best = max(configs, key=lambda c: mean(c, others))
        held.append(mean(best, {d}))
        base.append(mean("default", {d}))
        lines.append(f"| {d} | {best} | {held[-1]:.3f} | {base[-1]:.3f} |")
    lines.append(f"| **mean** | | **{np.mean(held):.3f}** | **{np.mean(base):.3f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", required=True, help="NAME='{\"field\": value}'")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--reference-cells", type=int, default=None, help="subsample each reference to N cells")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    given = {spec.split("=", 1)[0] for spec in args.configs}
    rows = [] if args.reference_cells or "default" in given else default_rows()
    for spec in args.configs:
        name, network = spec.split("=", 1)
        cached = args.out / f"{name}.json"
        if cached.exists():
            rows += json.loads(cached.read_text())
            continue
        new = run(name, json.loads(network), args.data_dir, args.reference_cells)
        cached.write_text(json.dumps(new, indent=1))
        rows += new
    table = lodo(rows)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
