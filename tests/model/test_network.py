import pytest
import torch

from spikgpt.model import NetworkConfig, SpikingEnsemble, SpikingTransformer, TrainConfig
from spikgpt.model.network import HostDropout
from spikgpt.snn import LIF


@pytest.mark.parametrize("tokenization", ["split", "repeat"])
def test_forward_shapes(tokenization):
    cfg = NetworkConfig(in_dim=50, n_classes=7, tokenization=tokenization, n_tokens=8, time_steps=3)
    net = SpikingTransformer(cfg).eval()
    assert net(torch.randn(5, 50)).shape == (3, 5, 7)
    assert net.features(torch.randn(5, 50)).shape == (3, 5, cfg.dim)


def test_readout_is_a_spike_rate():
    net = SpikingTransformer(NetworkConfig(in_dim=12, n_classes=3, time_steps=4)).eval()
    feats = net.features(torch.randn(6, 12))
    # Mean of 0/1 spikes over N=4 tokens: multiples of 1/4 in [0, 1].
    assert ((feats * 4) == (feats * 4).round()).all() and feats.min() >= 0 and feats.max() <= 1


def test_twin_has_no_spiking_neurons_and_one_step():
    net = SpikingTransformer(NetworkConfig(in_dim=12, n_classes=3, spiking=False)).eval()
    assert not any(isinstance(m, LIF) for m in net.modules())
    assert net(torch.randn(2, 12)).shape == (1, 2, 3)


def test_configs_round_trip_and_reject_unknown_keys():
    cfg = NetworkConfig(in_dim=5, n_classes=2, depth=3)
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown NetworkConfig keys"):
        NetworkConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="Unknown TrainConfig keys"):
        TrainConfig.from_dict({"lr": 1e-3, "epochs": 3})
    with pytest.raises(ValueError, match="tokenization"):
        NetworkConfig(in_dim=5, n_classes=2, tokenization="patch")


def test_host_dropout_is_torch_dropout_on_the_cpu():
    x = torch.randn(4, 8, 16, requires_grad=True)
    grad = torch.randn(4, 8, 16)
    torch.manual_seed(3)
    expected = torch.nn.Dropout(0.3).train()(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    torch.manual_seed(3)
    got = HostDropout(0.3).train()(x)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
    assert (got == 0).any()  # it did drop
    assert torch.equal(HostDropout(0.3).eval()(x), x)
    assert torch.equal(HostDropout(1.0).train()(x), torch.zeros_like(x))
    # The mask comes from the CPU generator: the next CPU draw is advanced by exactly one mask.
    torch.manual_seed(3)
    HostDropout(0.3).train()(x)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.empty(x.shape).bernoulli_(0.7)
    assert torch.equal(after, torch.rand(1))


def test_ensemble_averages_its_members_logits_and_its_head_reads_their_latents():
    cfg = NetworkConfig(in_dim=12, n_classes=3)
    net = SpikingEnsemble(cfg, 3).eval()
    x = torch.randn(5, 12)
    with torch.inference_mode():
        mean = torch.stack([m(x) for m in net.members]).mean(0)
        feats = net.features(x)
        assert feats.shape == (cfg.time_steps, 5, net.latent_dim) and net.latent_dim == 3 * cfg.dim
        torch.testing.assert_close(net(x), mean)
        torch.testing.assert_close(net.head(feats), mean)
    assert not torch.equal(net.members[0].head.weight, net.members[1].head.weight)  # initialised apart
    with pytest.raises(ValueError, match="at least one network"):
        SpikingEnsemble(cfg, 0)
    with pytest.raises(ValueError, match="the ensemble's NetworkConfig"):
        SpikingEnsemble(cfg, [SpikingTransformer(NetworkConfig(in_dim=12, n_classes=4))])
    with pytest.raises(ValueError, match="members must be >= 1"):
        TrainConfig(members=0)
