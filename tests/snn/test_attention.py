import torch

from spikgpt.snn import LIF, SpikingSelfAttention


def test_ssa_shapes_and_spike_form_qkv():
    torch.manual_seed(0)
    ssa = SpikingSelfAttention(16, 4).eval()
    spikes = (torch.rand(4, 3, 5, 16) > 0.5).float()
    captured = {}
    for name in ("q_lif", "k_lif", "v_lif", "attn_lif"):
        getattr(ssa, name).register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, o))
    ssa.record_attention = True
    out = ssa(spikes)
    assert out.shape == spikes.shape
    for name, value in captured.items():
        assert set(value.unique().tolist()) <= {0.0, 1.0}, name
    # No softmax: the map is the scaled product of spike counts, rows do not sum to 1.
    q, k = (captured[n].reshape(4, 3, 5, 4, 4).transpose(2, 3) for n in ("q_lif", "k_lif"))
    torch.testing.assert_close(ssa.last_attention, (q @ k.transpose(-2, -1)) * 0.125)
    assert ssa.last_attention.shape == (4, 3, 4, 5, 5)
    assert not torch.allclose(ssa.last_attention.sum(-1), torch.ones(4, 3, 4, 5))
    assert (ssa.last_attention * 8 == (ssa.last_attention * 8).round()).all()


def test_twin_uses_softmax_and_no_lif():
    ssa = SpikingSelfAttention(16, 4, spiking=False).eval()
    ssa.record_attention = True
    ssa(torch.randn(1, 2, 5, 16))
    torch.testing.assert_close(ssa.last_attention.sum(-1), torch.ones(1, 2, 4, 5))
    assert not any(isinstance(m, LIF) for m in ssa.modules())
