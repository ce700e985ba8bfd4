import numpy as np
import pytest
import torch

from spikgpt.snn import LIF, heaviside


def lif_by_hand(x, tau=2.0, v_th=1.0, v_reset=0.0):
    v, out = v_reset, []
    for x_t in x:
        h = v + (x_t - (v - v_reset)) / tau
        s = float(h >= v_th)
        v = h * (1 - s) + v_reset * s
        out.append(s)
    return out


def test_lif_matches_equations_step_by_step():
    x = torch.tensor([0.5, 1.5, 1.5, 0.0, 3.0, 2.1])[:, None]
    # h: 0.25, 0.875, 1.1875 (spike, reset 0), 0, 1.5 (spike), 1.05 (spike)
    assert LIF()(x).squeeze(1).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert LIF()(x).squeeze(1).tolist() == lif_by_hand(x.squeeze(1).tolist())


def test_membrane_decays_without_input():
    # Two pulses in a row charge 0.8 then 1.2 >= threshold: a spike.
    assert LIF(tau=2.0)(torch.tensor([1.6, 1.6])[:, None]).sum() == 1
    # With two silent steps between them the charge leaks (0.8 -> 0.4 -> 0.2) and the
    # second pulse only reaches 0.9: no spike.
    assert LIF(tau=2.0)(torch.tensor([1.6, 0.0, 0.0, 1.6])[:, None]).sum() == 0
    # A constant input below threshold converges to it from below and never fires.
    assert LIF(tau=2.0)(torch.full((50, 1), 0.99)).sum() == 0


@pytest.mark.parametrize("tau,v_th,v_reset", [(2.0, 1.0, 0.0), (3.0, 0.5, -0.2), (1.5, 2.0, 0.1)])
def test_lif_random_inputs(tau, v_th, v_reset):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.5, (16, 5)).astype(np.float32)
    got = LIF(tau=tau, v_threshold=v_th, v_reset=v_reset)(torch.as_tensor(x)).numpy()
    for j in range(5):
        assert got[:, j].tolist() == lif_by_hand(x[:, j].tolist(), tau, v_th, v_reset)


def test_spikes_are_binary_and_no_state_leaks_between_calls():
    lif = LIF()
    x = torch.randn(4, 3, 7) * 3
    first = lif(x)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(lif(x), first)


def test_surrogate_gradient_is_sigmoid_derivative():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    heaviside(x, alpha=4.0).sum().backward()
    smooth = torch.linspace(-2, 2, 41, requires_grad=True)
    torch.sigmoid(4.0 * smooth).sum().backward()
    torch.testing.assert_close(x.grad, smooth.grad)
    assert heaviside(torch.tensor([-1e-3, 0.0, 1e-3])).tolist() == [0.0, 1.0, 1.0]


def test_lif_passes_gradients():
    x = torch.full((4, 2), 1.5, requires_grad=True)
    LIF()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tau_must_exceed_one():
    with pytest.raises(ValueError, match="tau"):
        LIF(tau=1.0)


@pytest.mark.parametrize("tau,v_th,v_reset", [(2.0, 1.0, 0.0), (3.0, 0.5, -0.2)])
def test_inference_path_gives_the_training_paths_spikes_bit_for_bit(tau, v_th, v_reset):
    lif = LIF(tau=tau, v_threshold=v_th, v_reset=v_reset)
    x = torch.randn(6, 512, 4, 16, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        fast = lif(x)  # no autograd: preallocated buffers
    trained = lif(x.clone().requires_grad_())  # the autograd path training uses
    assert trained.requires_grad and not fast.requires_grad
    assert torch.equal(fast, trained.detach()) and 0.05 < fast.mean() < 0.95
