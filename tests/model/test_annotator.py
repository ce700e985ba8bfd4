import json

import numpy as np
import pytest

import spikgpt
from spikgpt.errors import ModelFormatError
from spikgpt.model import SpikGPTModel


def test_save_load_identical_predictions(trained, counts, tmp_path):
    path = trained.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == [
        "calibration_network.safetensors",  # refitted: the network that scored the calibration cells
        "config.json",
        "embedder.safetensors",
        "novelty.safetensors",
        "weights.safetensors",
    ]
    loaded = spikgpt.load_model(path)
    a = spikgpt.annotate(counts, trained, copy=True)
    b = spikgpt.annotate(counts, loaded, copy=True)
    assert (a.obs["spikgpt_label"] == b.obs["spikgpt_label"]).all()
    np.testing.assert_array_equal(a.obs["spikgpt_confidence"], b.obs["spikgpt_confidence"])
    np.testing.assert_allclose(a.obs["spikgpt_pvalue"], b.obs["spikgpt_pvalue"], rtol=1e-5)
    ma, mb = a.uns["spikgpt"]["mapping"], b.uns["spikgpt"]["mapping"]  # the mapping survives the round trip
    assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], rel=1e-5) for k in ma)  # BLAS rounding
    np.testing.assert_allclose(a.obsm["X_spikgpt_embedding"], b.obsm["X_spikgpt_embedding"], atol=1e-5)
    assert (loaded.fdr, loaded.shift, loaded.mapping) == (trained.fdr, trained.shift, trained.mapping)
    assert loaded.classes == trained.classes
    assert "3 cell types" in repr(loaded) and f"×{trained.train_config.members}" in repr(loaded)
    assert len(loaded.network.members) == len(trained.network.members) == trained.train_config.members
    # every novelty score survives the round trip
    from spikgpt.data import Cells

    ra = trained.raw_scores(trained.predict(Cells(counts)).outputs)
    rb = loaded.raw_scores(loaded.predict(Cells(counts)).outputs)
    for name in ra:
        np.testing.assert_allclose(ra[name], rb[name], rtol=1e-6, err_msg=name)  # BLAS rounding only
    assert "cal_embedding" in trained.novelty.state  # the neighbourhood test's positions travel too
    for name in trained.novelty.state:
        np.testing.assert_array_equal(trained.novelty.state[name], loaded.novelty.state[name], err_msg=name)
    with pytest.raises(FileExistsError, match="overwrite"):
        trained.save(path)


def test_fold_models_travel_with_the_model_and_a_missing_one_is_named(crossfitted, counts, tmp_path):
    path = crossfitted.save(tmp_path / "m")
    assert sorted(p.name for p in (path / "folds").iterdir()) == ["0", "1", "2", "3", "4"]
    assert (path / "folds" / "0" / "embedder.safetensors").exists()
    loaded = spikgpt.load_model(path)
    assert len(loaded.fold_models) == 5 and loaded.cross_fitted
    a = spikgpt.annotate(counts, crossfitted, copy=True)
    b = spikgpt.annotate(counts, loaded, copy=True)
    np.testing.assert_allclose(a.obs["spikgpt_pvalue"], b.obs["spikgpt_pvalue"], rtol=1e-5)
    assert (a.obs["spikgpt_label"] == b.obs["spikgpt_label"]).all()
    for fold, back in zip(crossfitted.fold_models, loaded.fold_models, strict=True):
        assert fold.network is None and back.network is None  # the default scores need no fold network (0.23)
        assert "cal_embedding" in back.novelty.state  # its held-out cells' positions (0.22)
        for name in fold.novelty.state:
            np.testing.assert_array_equal(fold.novelty.state[name], back.novelty.state[name], err_msg=name)
    import shutil

    # a fold folder without a network configuration that holds network weights is damaged, not read
    fold_weights = path / "folds" / "2" / "weights.safetensors"
    kept = fold_weights.read_bytes()
    shutil.copy(path / "weights.safetensors", fold_weights)
    with pytest.raises(ModelFormatError, match="network weights but no network configuration"):
        SpikGPTModel.load(path)
    fold_weights.write_bytes(kept)
    shutil.rmtree(path / "folds" / "3")
    with pytest.raises(ModelFormatError, match="lacks its fold model folds/3"):
        SpikGPTModel.load(path)


def test_fold_mappings_side_by_side_equal_one_after_the_other(crossfitted, counts, monkeypatch):
    import threading

    from spikgpt.data import Cells
    from spikgpt.model import annotator

    cells = Cells(counts)
    E = crossfitted.embedder.transform(cells)
    seen, real, calls = {}, annotator.translation, []

    def counted(*job):
        calls.append(threading.current_thread() is threading.main_thread())
        return real(*job)

    monkeypatch.setattr(annotator, "translation", counted)
    for workers in (1, 3):
        monkeypatch.setattr(annotator, "blas_threads", lambda w=workers: w)
        calls.clear()
        seen[workers] = crossfitted.map_query(E, cells=cells)
        # the model's own translation and its five fold models', in worker threads where cores are free
        assert calls == [workers == 1] * 6
    one, three = seen[1], seen[3]
    for a, b in zip((one, *one.folds), (three, *three.folds), strict=True):
        np.testing.assert_array_equal(a.shift, b.shift)
        np.testing.assert_array_equal(a.matched, b.matched)
        assert a.n_pairs == b.n_pairs > 0


def test_models_of_formats_3_and_4_load(counts, tmp_path, caplog):
    from dataclasses import replace

    from safetensors.torch import load_file, save_file
    from synthetic import FAST

    cfg = replace(FAST, max_epochs=5, members=1)
    model = spikgpt.train(counts, "cell_type", train_config=cfg, calibration_folds=1, progress=False)
    path = model.save(tmp_path / "m")
    # what spikgpt 0.16–0.17 wrote: format 4, no "workers", no calibration network beside the refit
    cfg = json.loads((path / "config.json").read_text())
    del cfg["train"]["workers"]
    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 4}))
    (path / "calibration_network.safetensors").unlink()
    old = spikgpt.load_model(path)
    assert old.calibration_network is None and model.calibration_network is not None
    with caplog.at_level("WARNING", logger="spikgpt"):
        spikgpt.annotate(counts, old, novelty="max_prob", copy=True)
    assert any("max_prob: the calibration cells were scored by another network" in r.message for r in caplog.records)
    # what spikgpt 0.15 wrote: format 3, no "members", weights without the ensemble's prefix
    del cfg["train"]["members"]
    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 3}))
    state = load_file(path / "weights.safetensors")
    save_file({k.removeprefix("members.0."): v for k, v in state.items()}, path / "weights.safetensors")
    loaded = spikgpt.load_model(path)
    assert len(loaded.network.members) == 1 and loaded.train_config.members == 1
    a = spikgpt.annotate(counts, model, copy=True)
    b = spikgpt.annotate(counts, loaded, copy=True)
    np.testing.assert_array_equal(a.obs["spikgpt_confidence"], b.obs["spikgpt_confidence"])


def test_model_folder_errors(trained, tmp_path):
    with pytest.raises(ModelFormatError, match="not a spikgpt model folder"):
        SpikGPTModel.load(tmp_path)
    path = trained.save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="format 99.*Upgrade spikgpt"):
        SpikGPTModel.load(path)

    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 2}))
    with pytest.raises(ModelFormatError, match="format 2.*Re-train"):
        SpikGPTModel.load(path)

    (path / "config.json").write_text(json.dumps({"model_type": "celltypist"}))
    with pytest.raises(ModelFormatError, match="foreign"):
        SpikGPTModel.load(path)

    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="corrupted"):
        SpikGPTModel.load(path)

    (path / "config.json").write_text(json.dumps(cfg))
    data = (path / "weights.safetensors").read_bytes()
    (path / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="damaged or incomplete"):
        SpikGPTModel.load(path)


def test_overwrite_only_replaces_a_model_folder(trained, tmp_path):
    precious = tmp_path / "results"
    (precious / "sub").mkdir(parents=True)
    (precious / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a spikgpt model folder"):
        trained.save(precious, overwrite=True)
    assert (precious / "important.txt").read_text() == "keep me" and (precious / "sub").is_dir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        trained.save(afile, overwrite=True)
    assert afile.read_text() == "x"
    trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="holds a spikgpt model"):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)  # a model folder is replaced
    assert SpikGPTModel.load(tmp_path / "m").classes == trained.classes


def test_model_folder_permissions_follow_umask(trained, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        trained.save(tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m" / "config.json").stat().st_mode & 0o777 == 0o644


def test_missing_folder_and_nan_weights_are_clear_errors(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ModelFormatError, match="does not exist"):
        SpikGPTModel.load(tmp_path / "nope")
    trained.save(tmp_path / "m")
    w = load_file(tmp_path / "m" / "weights.safetensors")
    key = next(k for k, v in w.items() if v.is_floating_point() and v.numel() > 1)
    w[key][0] = float("nan")
    save_file(w, tmp_path / "m" / "weights.safetensors")
    with pytest.raises(ModelFormatError, match="NaN"):
        SpikGPTModel.load(tmp_path / "m")


@pytest.mark.parametrize("spiking", [True, False])
def test_firing_rates_are_each_cells_share_of_active_units(trained, counts, spiking):
    import copy
    from dataclasses import replace

    import torch

    from spikgpt.data import Cells
    from spikgpt.model.network import SpikingEnsemble
    from spikgpt.snn import LIF

    model = copy.copy(trained)
    if not spiking:  # the twin's ReLUs, untrained: rates come from the same hooks
        model.network = SpikingEnsemble(replace(trained.network.cfg, spiking=False), members=2)
    E = model.embedder.transform(Cells(counts))
    acts = [m for m in model.network.modules() if isinstance(m, LIF | torch.nn.ReLU)]
    seen = {i: [] for i in range(len(acts))}
    hooks = [m.register_forward_hook(lambda _m, _i, o, i=i: seen[i].append(o.clone())) for i, m in enumerate(acts)]
    try:
        firing = model.outputs(E, batch_size=7).firing  # several batches, the last one short
    finally:
        for h in hooks:
            h.remove()
    for i, outs in seen.items():  # [T, B, ...] per batch → each cell's share of units > 0
        expected = torch.cat([(o > 0).float().transpose(0, 1).flatten(1).mean(1) for o in outs]).numpy()
        np.testing.assert_allclose(firing[:, i], expected, rtol=1e-6, err_msg=f"layer {i}")
    assert 0 < firing.mean() < 1
