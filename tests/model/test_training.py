from dataclasses import replace

import numpy as np
import pytest
import torch

from spikgpt.model.network import NetworkConfig
from spikgpt.model.training import TrainConfig, fit_network, stratified_folds, stratified_split

FIT = {"seed": 0, "progress": False}


def three_clusters(per_class: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """16-dimensional Gaussian cells of three classes, each moved along its own axis."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], per_class)
    return (rng.normal(size=(len(y), 16)) + np.eye(3, 16)[y] * separation).astype(np.float32), y


def accuracy(net, X: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((net(torch.as_tensor(X)).mean(0).argmax(1).numpy() == y).mean())


def test_folds_are_stratified_balanced_and_keep_rare_types_in_every_fold():
    y = np.repeat([0, 1, 2, 3], [50, 23, 4, 1])
    fold = stratified_folds(y, 5, min_cells=5, seed=0)
    assert (fold[y >= 2] == -1).all()  # the 4-cell and 1-cell types are never held out
    sizes = np.bincount(fold[fold >= 0])
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1
    for c in (0, 1):
        per_fold = np.bincount(fold[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    np.testing.assert_array_equal(fold, stratified_folds(y, 5, min_cells=5, seed=0))
    assert not np.array_equal(fold, stratified_folds(y, 5, min_cells=5, seed=1))


@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_split_holds_out_the_share_and_never_a_rare_type(fraction):
    y = np.repeat([0, 1, 2], [100, 50, 3])
    kept, held = stratified_split(y, fraction, min_cells=5, seed=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(y)
    assert len(held) == round(fraction * 150) and not (y[held] == 2).any()


def test_weight_averaging_keeps_an_average_that_differs_from_the_raw_weights_and_is_seeded():
    X, y = three_clusters(40, 2.0)
    net_cfg = NetworkConfig(in_dim=16, n_classes=3)
    raw, _ = fit_network(X, y, net_cfg, TrainConfig(max_epochs=30, patience=30, average_epochs=0, members=1), **FIT)
    avg, hist = fit_network(X, y, net_cfg, TrainConfig(max_epochs=30, patience=30, average_epochs=2, members=1), **FIT)
    again, _ = fit_network(X, y, net_cfg, TrainConfig(max_epochs=30, patience=30, average_epochs=2, members=1), **FIT)
    w = {k: v for k, v in avg.state_dict().items() if v.is_floating_point()}
    assert w.keys() == {k for k, v in raw.state_dict().items() if v.is_floating_point()}
    assert any(not torch.equal(v, raw.state_dict()[k]) for k, v in w.items())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in w.items())
    assert accuracy(avg, X, y) > 0.9 and hist["val_loss"][hist["best_epoch"]] == min(hist["val_loss"])


def test_without_validation_cells_the_whole_schedule_runs_and_its_final_weights_are_kept():
    X, y = three_clusters(30, 2.0)
    cfg = TrainConfig(max_epochs=40, patience=2, val_fraction=0.0, members=1)
    net, hist = fit_network(X, y, NetworkConfig(in_dim=16, n_classes=3), cfg, **FIT)
    # patience cannot stop a run that has nothing to validate on
    assert hist["epochs_run"] == 40 and hist["best_epoch"] == 39
    assert hist["n_train"] == 90 and hist["n_val"] == 0 and hist["val_loss"] == []
    assert accuracy(net, X, y) > 0.9


@pytest.mark.parametrize("max_epochs", [1, 2, 3])
def test_any_schedule_length_trains(max_epochs):
    """90 training cells are 3 steps per epoch at batch 32; 150 cells 5: 10 steps in all once tripped torch's
    one-cycle schedule (a division by zero where the warm-up ends at step 1)."""
    for per_class in (30, 50):
        X, y = three_clusters(per_class, 2.0)
        cfg = TrainConfig(max_epochs=max_epochs, val_fraction=0.0, members=1)
        _, hist = fit_network(X, y, NetworkConfig(in_dim=16, n_classes=3), cfg, **FIT)
        assert hist["epochs_run"] == max_epochs


def test_input_noise_changes_the_fit_is_seeded_and_is_checked():
    X, y = three_clusters(40, 3.0)
    net_cfg = NetworkConfig(in_dim=16, n_classes=3)

    def weights(noise: float) -> tuple[dict, torch.nn.Module]:
        cfg = TrainConfig(max_epochs=20, patience=20, input_noise=noise, members=1)
        net, _ = fit_network(X, y, net_cfg, cfg, **FIT)
        return {k: v for k, v in net.state_dict().items() if v.is_floating_point()}, net

    plain, _ = weights(0.0)
    noisy, net = weights(0.3)
    again, _ = weights(0.3)
    assert any(not torch.equal(v, plain[k]) for k, v in noisy.items())
    assert all(torch.equal(v, again[k]) for k, v in noisy.items())
    assert accuracy(net, X, y) > 0.9
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="input_noise"):
            TrainConfig(input_noise=bad)


def test_ensemble_member_i_is_the_network_of_seed_plus_i():
    X, y = three_clusters(30, 2.0)
    net_cfg, one = NetworkConfig(in_dim=16, n_classes=3), TrainConfig(max_epochs=8, patience=8, members=1)
    ens, hist = fit_network(X, y, net_cfg, replace(one, members=2), **FIT)
    first, _ = fit_network(X, y, net_cfg, one, seed=0, progress=False)
    second, _ = fit_network(X, y, net_cfg, one, seed=1, progress=False)
    for member, alone in ((ens.members[0], first.members[0]), (ens.members[1], second.members[0])):
        for (name, a), b in zip(member.state_dict().items(), alone.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert len(hist["member_best_epochs"]) == 2
    assert not torch.equal(ens.members[0].head.weight, ens.members[1].head.weight)


def test_members_trained_in_worker_processes_are_the_networks_trained_here():
    X, y = three_clusters(30, 2.0)
    net_cfg = NetworkConfig(in_dim=16, n_classes=3)
    cfg = TrainConfig(max_epochs=6, patience=6, members=3)
    here, here_hist = fit_network(X, y, net_cfg, replace(cfg, workers=1), **FIT)
    apart, apart_hist = fit_network(X, y, net_cfg, replace(cfg, workers=2), **FIT)
    for a, b in zip(here.members, apart.members, strict=True):
        for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), name
    assert here_hist == apart_hist and len(apart_hist["member_best_epochs"]) == 3
    assert not torch.equal(apart.members[0].head.weight, apart.members[2].head.weight)


def test_worker_count_follows_members_cores_and_device(monkeypatch):
    from spikgpt.model import training

    monkeypatch.setattr(training.os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    monkeypatch.setattr(training.os, "getloadavg", lambda: (6.5, 6.0, 6.0), raising=False)
    assert training.free_cores() == 2  # 8 cores, 6.5 busy, this process's own counted free
    assert training.member_workers(TrainConfig(members=3, device="cpu")) == 2
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.4, 0.0, 0.0), raising=False)
    assert training.member_workers(TrainConfig(members=3, device="cpu")) == 3
    assert training.member_workers(TrainConfig(members=3, num_threads=4, device="cpu")) == 2
    assert training.member_workers(TrainConfig(members=3, workers=1, device="cpu")) == 1
    assert training.member_workers(TrainConfig(members=1, device="cpu")) == 1
    assert training.member_workers(TrainConfig(members=3, device="meta")) == 1  # not the CPU: one at a time
    with pytest.raises(ValueError, match="workers"):
        TrainConfig(workers=0)


def test_a_failing_worker_process_raises_with_its_error():
    X, y = three_clusters(10, 2.0)
    bad = NetworkConfig(in_dim=16, n_classes=2)  # class 2 has no output
    with pytest.raises(RuntimeError, match="worker processes failed"):
        fit_network(X, y, bad, TrainConfig(max_epochs=2, members=2, workers=2), **FIT)


def test_without_a_python_executable_to_start_the_members_train_here(monkeypatch):
    from spikgpt.model import training

    X, y = three_clusters(10, 2.0)
    net_cfg, cfg = NetworkConfig(in_dim=16, n_classes=3), TrainConfig(max_epochs=2, members=2)
    here, _ = fit_network(X, y, net_cfg, replace(cfg, workers=1), **FIT)
    monkeypatch.setattr(training.sys, "executable", "")  # an embedded interpreter
    fallback, _ = fit_network(X, y, net_cfg, replace(cfg, workers=2), **FIT)
    pairs = zip(here.state_dict().values(), fallback.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_worker_that_cannot_start_stops_the_others_and_the_members_train_here(monkeypatch, caplog):
    from spikgpt.model import training

    X, y = three_clusters(10, 2.0)
    net_cfg, cfg = NetworkConfig(in_dim=16, n_classes=3), TrainConfig(max_epochs=2, members=2)
    here, _ = fit_network(X, y, net_cfg, replace(cfg, workers=1), **FIT)
    started, real_popen = [], training.subprocess.Popen

    def second_fails(cmd, **kw):  # e.g. a process limit reached after the first worker
        if started:
            raise OSError("Resource temporarily unavailable")
        started.append(real_popen([training.sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    monkeypatch.setattr(training.subprocess, "Popen", second_fails)
    with caplog.at_level("WARNING", logger="spikgpt"):
        fallback, _ = fit_network(X, y, net_cfg, replace(cfg, workers=2), **FIT)
    assert started[0].returncode is not None  # the worker already started was stopped, not left running
    assert "Could not start worker processes (Resource temporarily unavailable)" in caplog.text
    pairs = zip(here.state_dict().values(), fallback.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
