"""Count the operations of a forward pass and turn them into a 45 nm energy estimate.

Conventions (those of Spikformer, Zhou et al. 2023):

* a ``Linear`` whose input is real-valued costs ``rows × in × out`` multiply-accumulates (MACs);
* a ``Linear`` whose input is spikes (all 0/1) costs one accumulate (AC) per emitted spike and
  output neuron: ``nnz(input) × out`` — the spikes actually emitted, over all T time steps;
* in spiking self-attention, ``Q Kᵀ`` costs ``nnz(Q) × N`` ACs (each query spike reads a key
  column) and ``(Q Kᵀ) V`` costs ``nnz(V) × N`` ACs; the twin's real-valued products cost
  ``N × N × d`` MACs each, plus its softmax, which we do not count;
* BatchNorm is folded into the preceding linear layer at inference and costs nothing;
* energy = MACs × 4.6 pJ + ACs × 0.9 pJ (45 nm CMOS, 32-bit float; Horowitz 2014).

This is an estimate for neuromorphic hardware, not a measurement of any CPU: it ignores memory
traffic, which published analyses find dominant — an SNN at T ≈ 5 must keep its average firing
rate below roughly 6 % to beat an equally quantised conventional network once data movement is
counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from spikgpt.snn import LIF, SpikingSelfAttention

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def is_spike(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def linear_ops(x: torch.Tensor, layer: nn.Linear) -> tuple[int, int]:
    """(MACs, ACs) of ``layer`` applied to ``x``."""
    if is_spike(x):
        return 0, int(torch.count_nonzero(x)) * layer.out_features
    rows = x.numel() // layer.in_features
    return rows * layer.in_features * layer.out_features, 0


@dataclass
class OpCounter:
    """Operations and spikes per layer, accumulated over forward passes."""

    macs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    acs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spikes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    neurons: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # neuron × time steps seen
    n_cells: int = 0

    def energy_pj(self) -> dict[str, float]:
        """Energy per layer (pJ, all cells)."""
        layers = set(self.macs) | set(self.acs)
        return {k: self.macs.get(k, 0) * E_MAC_PJ + self.acs.get(k, 0) * E_AC_PJ for k in sorted(layers)}

    def firing_rates(self) -> dict[str, float]:
        """Spikes per neuron per time step, per spiking layer."""
        return {k: self.spikes[k] / max(self.neurons[k], 1) for k in sorted(self.spikes)}

    def total(self) -> dict[str, float]:
        """Totals per cell: MACs, ACs, energy (pJ), and the average firing rate."""
        n = max(self.n_cells, 1)
        spikes, neurons = sum(self.spikes.values()), sum(self.neurons.values())
        return {
            "macs_per_cell": sum(self.macs.values()) / n,
            "acs_per_cell": sum(self.acs.values()) / n,
            "energy_pj_per_cell": sum(self.energy_pj().values()) / n,
            "mean_firing_rate": spikes / neurons if neurons else 0.0,
        }


def count_ops(net: nn.Module, x: torch.Tensor, counter: OpCounter | None = None, batch_size: int = 1024) -> OpCounter:
    """Run ``net`` on ``x`` (cells × features) and count operations and spikes per layer."""
    counter = counter or OpCounter()
    hooks = []
    names = {m: n for n, m in net.named_modules()}

    def on_linear(m, inp, _out):
        macs, acs = linear_ops(inp[0], m)
        counter.macs[names[m]] += macs
        counter.acs[names[m]] += acs

    def on_lif(m, _inp, out):
        counter.spikes[names[m]] += int(torch.count_nonzero(out))
        counter.neurons[names[m]] += out.numel()

    spikes_of: dict[nn.Module, torch.Tensor] = {}

    def keep_spikes(m, _inp, out):
        spikes_of[m] = out

    def on_attention(m: SpikingSelfAttention, inp, _out):
        T, B, N, D = inp[0].shape
        key = names[m] + ".qkv_product"
        if m.spiking:  # Q and V spikes as emitted in this very pass (recorded by keep_spikes)
            q, v = spikes_of.pop(m.q_lif), spikes_of.pop(m.v_lif)
            counter.acs[key] += (int(torch.count_nonzero(q)) + int(torch.count_nonzero(v))) * N
        else:
            counter.macs[key] += 2 * T * B * N * N * D

    for m in net.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
        elif isinstance(m, LIF):
            hooks.append(m.register_forward_hook(on_lif))
        elif isinstance(m, SpikingSelfAttention):
            hooks.append(m.register_forward_hook(on_attention))
            if m.spiking:
                hooks += [m.q_lif.register_forward_hook(keep_spikes), m.v_lif.register_forward_hook(keep_spikes)]
    try:
        with torch.inference_mode():
            net.eval()
            for s in range(0, len(x), batch_size):
                net(x[s : s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    counter.n_cells += len(x)
    return counter


def energy(counter: OpCounter) -> float:
    """Total energy (pJ) of the counted passes."""
    return sum(counter.energy_pj().values())
