import torch
from torch import nn

from spikgpt.energy import E_AC_PJ, E_MAC_PJ, OpCounter, count_ops, linear_ops
from spikgpt.model import NetworkConfig, SpikingTransformer
from spikgpt.snn import LIF


def test_linear_ops_by_hand():
    layer = nn.Linear(3, 5)
    spikes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # 3 spikes × 5 outputs
    assert linear_ops(spikes, layer) == (0, 15)
    real = torch.tensor([[0.5, 0.0, 1.0], [2.0, 0.1, 1.0]])  # 2 rows × 3 × 5
    assert linear_ops(real, layer) == (30, 0)


def test_energy_arithmetic():
    c = OpCounter()
    c.macs["a"], c.acs["b"], c.n_cells = 10, 100, 2
    assert c.energy_pj() == {"a": 10 * E_MAC_PJ, "b": 100 * E_AC_PJ}
    assert c.total()["energy_pj_per_cell"] == (46 + 90) / 2


class Tiny(nn.Module):
    """One spiking linear layer after a real-valued one: counts worked out by hand."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 3, bias=False)
        self.lif = LIF(tau=2.0, v_threshold=1.0)
        self.out = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.inp.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))

    def forward(self, x):  # x [B, 2]; T = 2 steps of the same current
        cur = self.inp(x).unsqueeze(0).expand(2, -1, -1)
        return self.out(self.lif(cur))


def test_counts_on_a_hand_built_network():
    x = torch.tensor([[1.0, 0.5]])
    # currents: neuron0 = 4 (t0: h=2 spike, reset; t1: h=2 spike), neuron1 = 0 (never),
    # neuron2 = 1.5 (t0: h=0.75; t1: h=0.75+(1.5-0.75)/2=1.125 spike). 3 spikes × 4 outputs = 12 ACs.
    c = count_ops(Tiny(), x)
    assert c.macs["inp"] == 1 * 2 * 3 and c.acs.get("inp", 0) == 0
    assert c.acs["out"] == 12 and c.macs.get("out", 0) == 0
    assert c.spikes["lif"] == 3 and c.neurons["lif"] == 6
    assert c.firing_rates()["lif"] == 3 / 6


def test_twin_macs_match_the_architecture():
    cfg = NetworkConfig(in_dim=8, n_classes=3, n_tokens=2, dim=4, depth=1, heads=2, mlp_ratio=2.0)
    twin = SpikingTransformer(NetworkConfig(**{**cfg.to_dict(), "spiking": False}))
    c = count_ops(twin, torch.randn(5, 8))
    N, D, H = 2, 4, 8
    per_cell = (
        N * 8 * D  # tokenizer (repeat: whole embedding per token)
        + 3 * N * D * D  # q, k, v
        + N * D * D  # proj
        + 2 * N * N * D  # two attention products
        + N * D * H
        + N * H * D  # MLP
        + D * 3  # head
    )
    assert c.total()["macs_per_cell"] == per_cell and c.total()["acs_per_cell"] == 0


def test_spiking_model_uses_accumulates_after_the_input_projection():
    net = SpikingTransformer(NetworkConfig(in_dim=8, n_classes=3, n_tokens=2, dim=8, depth=1, heads=2))
    c = count_ops(net, torch.randn(20, 8) * 3)
    assert c.macs["tokenizer.proj"] > 0 and c.acs.get("tokenizer.proj", 0) == 0
    for name in ("blocks.0.attn.q", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
        assert c.macs.get(name, 0) == 0, name
    assert 0 <= c.total()["mean_firing_rate"] <= 1


def test_q_k_v_see_the_same_input_spikes():
    """Q, K and V read the same input spikes: their accumulate counts must be equal (no double counting)."""
    net = SpikingTransformer(NetworkConfig(in_dim=8, n_classes=3, n_tokens=2, dim=8, depth=1, heads=2))
    c = count_ops(net, torch.randn(30, 8) * 3)
    assert c.acs["blocks.0.attn.q"] == c.acs["blocks.0.attn.k"] == c.acs["blocks.0.attn.v"]
    assert c.spikes["blocks.0.attn.q_lif"] + c.spikes["blocks.0.attn.v_lif"] == c.acs["blocks.0.attn.qkv_product"] // 2
