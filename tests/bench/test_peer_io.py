import anndata as ad
import numpy as np
import scipy.sparse as sp

from spikgpt.bench.peer_io import counts as peer_counts
from spikgpt.bench.peer_io import log1p_cp10k


def test_log1p_cp10k_takes_counts_or_log_values_to_the_same_genes_by_cells():
    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [2.0, 0.0, 2.0]]))
    a = ad.AnnData(counts)
    a.obs["cell_type"] = ["x", "y"]
    before = a.X.copy()
    out = log1p_cp10k(a, use_raw=False)
    assert out.shape == (2, 3) and list(out.var_names) == list(a.var_names) and (a.X != before).nnz == 0
    assert list(out.obs["cell_type"]) == ["x", "y"]
    np.testing.assert_allclose(out.X.toarray()[0], np.log1p([2500.0, 7500.0, 0.0]), rtol=1e-6)
    logged = ad.AnnData(np.log1p(counts.toarray()))
    np.testing.assert_allclose(log1p_cp10k(logged, use_raw=False).X.toarray(), out.X.toarray(), rtol=1e-5)
    # the counts a count-based peer (scANVI) reads: as given, or expm1 of log values
    np.testing.assert_allclose(peer_counts(logged, use_raw=False).X.toarray(), counts.toarray(), rtol=1e-5)
    assert (peer_counts(a, use_raw=False).X != counts).nnz == 0


def test_peer_job_reads_the_command_line_and_writes_what_run_peer_reads(tmp_path, capsys):
    import json

    import pandas as pd

    from spikgpt.bench.peer_io import PeerJob

    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [2.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))
    ref = ad.AnnData(counts, obs=pd.DataFrame({"t": ["A", "B", "NA"]}, index=["r1", "r2", "r3"]))
    query = ad.AnnData(counts[:2], obs=pd.DataFrame(index=["q1", "q2"]))
    ref.write_h5ad(tmp_path / "r.h5ad")
    query.write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / "pred.csv"
    job = PeerJob.from_argv([str(tmp_path / "r.h5ad"), str(tmp_path / "q.h5ad"), "t", str(out), "0", "3"])
    assert list(job.labels) == ["A", "B", "NA"] and job.seed == 3 and job.query.shape == (2, 3)
    assert job.options == ()
    argv = [str(tmp_path / "r.h5ad"), str(tmp_path / "q.h5ad"), "t", str(out), "0", "3", "majority"]
    assert PeerJob.from_argv(argv).options == ("majority",)
    assert PeerJob.from_argv(argv, values="counts").ref.X.toarray()[1].tolist() == [2.0, 0.0, 2.0]
    job.write(["A", "NA"], ["A", "Unknown"], [0.9, 0.1], 1.5, 0.5)
    df = pd.read_csv(out, index_col=0, keep_default_na=False)  # as run_peer reads it: "NA" stays a label
    assert list(df.index) == ["q1", "q2"] and list(df["raw_label"]) == ["A", "NA"]
    assert list(df["label"]) == ["A", "Unknown"] and df["confidence"].tolist() == [0.9, 0.1]
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["train_seconds"] == 1.5 and info["predict_seconds"] == 0.5 and info["peak_rss_mb"] > 0


def test_every_peer_has_a_runner_script():
    from pathlib import Path

    import spikgpt.bench.baselines as baselines

    here = Path(baselines.__file__).parent
    for peer in baselines.PEERS:
        assert (here / f"{baselines.peer_runner(peer)}_runner.py").exists(), peer
    assert baselines.peer_runner("celltypist_majority") == "celltypist"


def test_bench_runs_every_peer_but_scanvi_unless_asked():
    from spikgpt.bench.baselines import DEFAULT_PEERS, PEERS, peer_runner

    assert set(PEERS) - set(DEFAULT_PEERS) == {"scanvi"} and "singler" in DEFAULT_PEERS
    assert "torch==2.13.0" in PEERS["scanvi"].pins  # its own CPU torch, never an unpinned CUDA build
    assert peer_runner("scanvi") == "scanvi" and peer_runner("celltypist_majority") == "celltypist"
