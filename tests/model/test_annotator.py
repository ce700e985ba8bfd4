import json

import numpy as np
import pytest

import spikgpt
from spikgpt.errors import ModelFormatError
from spikgpt.model import SpikGPTModel


def test_save_load_identical_predictions(trained, counts, tmp_path):
    path = trained.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == [
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
    assert loaded.threshold == trained.threshold and loaded.classes == trained.classes
    assert "3 cell types" in repr(loaded)
    # every novelty score survives the round trip
    from spikgpt.data import Cells

    ra = trained.novelty.raw_scores(trained.predict(Cells(counts)).outputs)
    rb = loaded.novelty.raw_scores(loaded.predict(Cells(counts)).outputs)
    for name in ra:
        np.testing.assert_allclose(ra[name], rb[name], rtol=1e-6, err_msg=name)  # BLAS rounding only
    for method in ("combined", "knn_latent", "energy"):
        assert loaded.unknown_threshold(method) == trained.unknown_threshold(method)
    with pytest.raises(FileExistsError, match="overwrite"):
        trained.save(path)


def test_model_folder_errors(trained, tmp_path):
    with pytest.raises(ModelFormatError, match="not a spikgpt model folder"):
        SpikGPTModel.load(tmp_path)
    path = trained.save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="format 99.*Upgrade spikgpt"):
        SpikGPTModel.load(path)

    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    with pytest.raises(ModelFormatError, match="format 1.*Re-train"):
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
