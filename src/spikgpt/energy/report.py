"""``spikgpt.energy``: operations, energy and firing rates of a model on real cells, vs its twin."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import anndata as ad
import numpy as np
import torch

from spikgpt.data import Cells, read
from spikgpt.energy.counting import E_AC_PJ, E_MAC_PJ, count_ops
from spikgpt.model.annotator import SpikGPTModel
from spikgpt.model.network import SpikingEnsemble

#: Average firing rate below which an SNN at T ≈ 5 beats an equally quantised ANN once memory
#: traffic is counted (published estimate; see the module docstring of ``counting``).
FIRING_RATE_LINE = 0.06


def _wall_time_per_cell(net: torch.nn.Module, Z: torch.Tensor, repeats: int = 3) -> float:
    best = np.inf
    with torch.inference_mode():
        net.eval()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in range(0, len(Z), 1024):
                net(Z[s : s + 1024])
            best = min(best, time.perf_counter() - t0)
    return best / max(len(Z), 1)


def energy_report(
    adata: ad.AnnData | str | os.PathLike,
    model: SpikGPTModel | str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    key_added: str = "spikgpt_energy",
) -> dict:
    """Estimate the energy of annotating ``adata`` with ``model`` and with its non-spiking twin.

    Writes ``uns[key_added]`` (when ``adata`` is an AnnData) and returns the same dict: per layer
    the MACs, ACs, energy (pJ per cell) and firing rates of the spiking model; per cell the
    totals of both and their ratio; the average firing rate against the ~6 % line; and the
    measured CPU wall-time per cell of both networks, which is *not* what the estimate predicts.
    """
    adata = read(adata)
    model = SpikGPTModel.coerce(model)
    E = model.embedder.transform(Cells(adata, layer=layer, use_raw=use_raw, gene_key=gene_key))
    Z = torch.as_tensor(model.standardise(E[np.isfinite(E).all(axis=1)]))
    snn = model.network
    twin = SpikingEnsemble(replace(snn.cfg, spiking=False), len(snn.members))
    c_snn, c_twin = count_ops(snn, Z), count_ops(twin, Z)
    n = max(len(Z), 1)
    rates = c_snn.firing_rates()
    e_snn, e_twin = c_snn.energy_pj(), c_twin.energy_pj()
    layers = {
        name: {
            "macs_per_cell": c_snn.macs.get(name, 0) / n,
            "acs_per_cell": c_snn.acs.get(name, 0) / n,
            "energy_pj_per_cell": e_snn.get(name, 0.0) / n,
            "twin_macs_per_cell": c_twin.macs.get(name, 0) / n,
            "twin_energy_pj_per_cell": e_twin.get(name, 0.0) / n,
        }
        for name in sorted(set(e_snn) | set(e_twin))
    }
    t_snn, t_twin = c_snn.total(), c_twin.total()
    mean_rate = t_snn["mean_firing_rate"]
    report = {
        "n_cells": int(len(Z)),
        "time_steps": snn.time_steps,
        "e_mac_pj": E_MAC_PJ,
        "e_ac_pj": E_AC_PJ,
        "spiking": t_snn,
        "twin": {k: v for k, v in t_twin.items() if k != "mean_firing_rate"},
        "energy_ratio_twin_over_spiking": t_twin["energy_pj_per_cell"] / max(t_snn["energy_pj_per_cell"], 1e-12),
        "mean_firing_rate": mean_rate,
        "below_firing_rate_line": bool(mean_rate < FIRING_RATE_LINE),
        "firing_rates": rates,
        "layers": layers,
        "cpu_seconds_per_cell": {"spiking": _wall_time_per_cell(snn, Z), "twin": _wall_time_per_cell(twin, Z)},
        "caveat": (
            "Operation counts at 45 nm (Horowitz 2014) for neuromorphic hardware, not a CPU measurement; "
            "memory traffic is ignored. At T≈5 an SNN must keep its average firing rate below ~6% to beat an "
            f"equally quantised ANN once data movement is counted; this model fires at {mean_rate:.1%}, "
            f"{'below' if mean_rate < FIRING_RATE_LINE else 'above'} that line."
        ),
    }
    adata.uns[key_added] = report
    return report


def markdown(report: dict) -> str:
    """A short human-readable energy report."""
    s, t = report["spiking"], report["twin"]
    lines = [
        f"# Energy estimate ({report['n_cells']} cells, T = {report['time_steps']})",
        "",
        "| | MACs / cell | ACs / cell | energy / cell (nJ) | CPU time / cell (µs) |",
        "|---|---|---|---|---|",
        f"| spiking | {s['macs_per_cell']:,.0f} | {s['acs_per_cell']:,.0f} | {s['energy_pj_per_cell'] / 1e3:.2f} | "
        f"{report['cpu_seconds_per_cell']['spiking'] * 1e6:.1f} |",
        f"| non-spiking twin | {t['macs_per_cell']:,.0f} | 0 | {t['energy_pj_per_cell'] / 1e3:.2f} | "
        f"{report['cpu_seconds_per_cell']['twin'] * 1e6:.1f} |",
        "",
        f"Estimated energy ratio twin / spiking: **{report['energy_ratio_twin_over_spiking']:.2f}×** at an average "
        f"firing rate of **{report['mean_firing_rate']:.1%}**.",
        "",
        report["caveat"],
        "",
        "| layer | firing rate | MACs / cell | ACs / cell | energy / cell (pJ) | twin energy / cell (pJ) |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in report["layers"].items():
        lines.append(
            f"| {name} | | {v['macs_per_cell']:,.0f} | {v['acs_per_cell']:,.0f} | {v['energy_pj_per_cell']:,.0f} | "
            f"{v['twin_energy_pj_per_cell']:,.0f} |"
        )
    for name, r in report["firing_rates"].items():
        lines.append(f"| {name} | {r:.3f} | | | | |")
    return "\n".join(lines) + "\n"
