import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from spikgpt.cli import app

runner = CliRunner()
# One network, not the default ensemble of three: CI time (the ensemble's save/load is tested in model/).
ONE = ["--members", "1"]


@pytest.fixture(scope="module")
def pbmc_files(tmp_path_factory, pbmc):
    """Real data: pbmc68k_reduced's log-normalised values, split into reference and query."""
    d = tmp_path_factory.mktemp("cli")
    adata = ad.AnnData(pbmc.raw.X.copy(), obs=pbmc.obs[["bulk_labels"]].copy(), var=pbmc.raw.var[[]].copy())
    rng = np.random.default_rng(0)
    is_ref = rng.uniform(size=adata.n_obs) < 0.7
    adata[is_ref].write_h5ad(d / "ref.h5ad")
    adata[~is_ref].write_h5ad(d / "query.h5ad")
    return d


def test_train_annotate_round_trip_on_real_data(pbmc_files):
    d = pbmc_files
    r = runner.invoke(
        app, ["train", str(d / "ref.h5ad"), "--label-key", "bulk_labels", "--out", str(d / "model"), *ONE, "-q"]
    )
    assert r.exit_code == 0, r.output
    assert (d / "model" / "config.json").exists()
    args = ["annotate", str(d / "query.h5ad"), "--model", str(d / "model"), "--out", str(d / "out.h5ad")]
    r = runner.invoke(app, [*args, "--csv", str(d / "pred.csv"), "-q"])
    assert r.exit_code == 0, r.output
    out = ad.read_h5ad(d / "out.h5ad")
    truth = out.obs["bulk_labels"].astype(str)
    assert (out.obs["spikgpt_raw_label"].astype(str) == truth).mean() > 0.65
    csv = pd.read_csv(d / "pred.csv", index_col=0)
    assert list(csv.columns) == [
        "spikgpt_label",
        "spikgpt_raw_label",
        "spikgpt_confidence",
        "spikgpt_pvalue",
        "spikgpt_qvalue",
        "spikgpt_unknown_reason",
    ]
    assert len(csv) == out.n_obs
    # existing outputs and the input itself are never overwritten without --overwrite
    r = runner.invoke(app, [*args, "-q"])
    assert r.exit_code == 2 and "exists" in r.output
    r = runner.invoke(app, [*args[:-1], str(d / "query.h5ad"), "-q"])
    assert r.exit_code == 2 and "is the input file" in r.output
    r = runner.invoke(
        app, [*args[:-1], str(d / "out2.h5ad"), "--novelty", "knn_embedding", "--fdr", "0.05", "--no-mapping", "-q"]
    )
    assert r.exit_code == 0
    uns = ad.read_h5ad(d / "out2.h5ad").uns["spikgpt"]
    assert uns["novelty"] == "knn_embedding" and uns["fdr"] == 0.05 and not uns["mapping"]["applied"]
    # cross-fitted without fold networks (the default since 0.23): a network's score was never calibrated
    r = runner.invoke(app, [*args[:-1], str(d / "out5.h5ad"), "--novelty", "max_prob", "-q"])
    assert r.exit_code == 2 and "calibrated without" in r.output and not (d / "out5.h5ad").exists()
    r = runner.invoke(app, [*args[:-1], str(d / "out3.h5ad"), "--novelty", "bogus", "-q"])
    assert r.exit_code == 2 and "Unknown novelty score" in r.output
    # the per-cell rule, through the chunked path the CLI runs
    r = runner.invoke(app, [*args[:-1], str(d / "out4.h5ad"), "--false-unknown", "0.02", "-q"])
    assert r.exit_code == 0, r.output
    per_cell = ad.read_h5ad(d / "out4.h5ad")
    assert per_cell.uns["spikgpt"]["unknown_rule"] == "false_unknown"
    called = per_cell.obs["spikgpt_label"] == "Unknown"
    assert (called == (per_cell.obs["spikgpt_pvalue"] <= 0.02)).all()
    np.testing.assert_array_equal(per_cell.obs["spikgpt_pvalue"], out.obs["spikgpt_pvalue"])


def test_annotate_zarr_in_chunks_matches_h5ad(pbmc_files):
    d = pbmc_files
    if not (d / "model").exists():
        train = ["train", str(d / "ref.h5ad"), "--label-key", "bulk_labels", "--out", str(d / "model"), *ONE, "-q"]
        assert runner.invoke(app, train).exit_code == 0
    ad.read_h5ad(d / "query.h5ad").write_zarr(d / "query.zarr")
    base = ["annotate", "--model", str(d / "model"), "--chunk-size", "50", "-q"]
    r = runner.invoke(app, [*base, str(d / "query.zarr"), "--out", str(d / "out.zarr")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, str(d / "query.h5ad"), "--out", str(d / "chunked.h5ad")])
    assert r.exit_code == 0, r.output
    z, h = ad.read_zarr(d / "out.zarr"), ad.read_h5ad(d / "chunked.h5ad")
    assert (z.obs["spikgpt_label"] == h.obs["spikgpt_label"]).all()
    r = runner.invoke(app, [*base, str(d / "query.zarr"), "--out", str(d / "out_wrong.h5ad")])
    assert r.exit_code == 2 and "must end in .zarr" in r.output
    r = runner.invoke(app, [*base, str(d / "missing.zarr"), "--out", str(d / "x.zarr")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, [*base, str(d / "query.h5ad"), "--out", str(d / "c0.h5ad"), "--chunk-size", "0"])
    assert r.exit_code == 2 and "chunk-size" in r.output


def test_cli_errors_are_one_clear_line(pbmc_files, tmp_path):
    d = pbmc_files
    r = runner.invoke(app, ["train", str(d / "ref.h5ad"), "--label-key", "nope", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "Label column 'nope' not found" in r.output
    r = runner.invoke(
        app, ["annotate", str(d / "query.h5ad"), "--model", str(tmp_path), "--out", str(tmp_path / "o.h5ad")]
    )
    assert r.exit_code == 2 and "not a spikgpt model folder" in r.output


def test_embed_then_train_on_obsm(tmp_path):
    from synthetic import SCGPT_FIXTURE as fix

    out = tmp_path / "emb.h5ad"
    r = runner.invoke(app, ["embed", str(fix / "query.h5ad"), "--scgpt", str(fix / "checkpoint"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    emb = ad.read_h5ad(out)
    assert emb.obsm["X_scGPT"].shape == (60, 32)
    np.testing.assert_allclose(np.linalg.norm(emb.obsm["X_scGPT"], axis=1), 1, atol=1e-5)
    r = runner.invoke(
        app, ["embed", str(fix / "query.h5ad"), "--scgpt", str(tmp_path), "--out", str(tmp_path / "x.h5ad")]
    )
    assert r.exit_code == 2 and "lacks args.json" in r.output


def test_outputs_and_options_are_checked_before_any_work(pbmc_files, tmp_path, monkeypatch):
    """Each bad output path or option fails at once, before training or annotation starts."""
    import spikgpt.api

    def boom(*_a, **_k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(spikgpt.api, "train", boom)
    monkeypatch.setattr(spikgpt.api, "annotate", boom)
    d = pbmc_files
    afile = tmp_path / "afile"
    afile.write_text("x")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("keep")
    train = ["train", str(d / "ref.h5ad"), "--label-key", "bulk_labels", "-q"]
    cases = [
        ([*train, "--out", str(afile), "--overwrite"], "is a file"),
        ([*train, "--out", str(precious), "--overwrite"], "not a spikgpt model folder"),
        ([*train, "--out", str(tmp_path / "m"), "--fdr", "1.5"], "fdr must be in [0, 1)"),
        (["train", str(tmp_path / "nope.h5ad"), "--label-key", "x", "--out", str(tmp_path / "m")], "File not found"),
    ]
    model_dir = tmp_path / "model"
    annotate = ["annotate", str(d / "query.h5ad"), "--model", str(model_dir), "-q"]
    cases += [
        ([*annotate, "--out", str(tmp_path / "o.txt")], "must end in .h5ad"),
        ([*annotate, "--out", str(tmp_path / "o.h5ad"), "--csv", str(tmp_path / "p.tsv")], "must end in .csv"),
        ([*annotate, "--out", str(afile / "o.h5ad")], "not a writable folder"),
        ([*annotate, "--out", str(tmp_path / "o.h5ad")], "does not exist"),
        ([*annotate, "--out", str(tmp_path / "o.h5ad"), "--shift", "bogus"], "shift must be one of"),
        ([*annotate, "--out", str(tmp_path / "o.h5ad"), "--false-unknown", "2"], "false_unknown must be in"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert (precious / "important.txt").read_text() == "keep" and afile.read_text() == "x"


def test_version_flag():
    from spikgpt import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_bench_names_an_unknown_peer_before_running_anything(tmp_path):
    r = runner.invoke(app, ["bench", "--peer", "nope", "--out", str(tmp_path / "b"), "-q"])
    assert r.exit_code != 0 and "Unknown peer(s) ['nope']" in r.output and "symphony" in r.output
    assert not (tmp_path / "b" / "results.json").exists()


def test_train_options_reach_the_api(pbmc_files, tmp_path, monkeypatch):
    import spikgpt.api

    seen = {}

    def capture(*_a, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(spikgpt.api, "train", capture)
    base = ["train", str(pbmc_files / "ref.h5ad"), "--label-key", "bulk_labels", "--out", str(tmp_path / "m"), "-q"]
    assert runner.invoke(app, base).exit_code != 0 and seen["refit"] is True and seen["calibration_folds"] is None
    assert runner.invoke(app, [*base, "--calibration-folds", "1"]).exit_code != 0 and seen["calibration_folds"] == 1
    assert seen["train_config"].members == 3 and seen["train_config"].workers is None
    assert runner.invoke(app, [*base, "--members", "2"]).exit_code != 0 and seen["train_config"].members == 2
    assert runner.invoke(app, [*base, "--workers", "1"]).exit_code != 0 and seen["train_config"].workers == 1
    assert runner.invoke(app, [*base, "--no-refit"]).exit_code != 0 and seen["refit"] is False
