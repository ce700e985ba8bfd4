import json

from typer.testing import CliRunner

from spikgpt.bench.run import markdown
from spikgpt.bench.tasks import TASKS
from spikgpt.cli import app


def test_bench_smoke_writes_results_tables_and_figures(tmp_path):
    """Fast version of `spikgpt bench`: one real task shipped with scanpy (no data folder needed), one seed."""
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--out",
            str(tmp_path),
            "--task",
            "pbmc68k_split",
            "--seeds",
            "1",
            "--no-peers",
            "--no-loto",
            # a stratified 200-cell reference (>= 2 cells of every type): the option tested, CI time halved
            "--reference-cells",
            "200",
            # one network per classifier: the option tested (the ensemble is tested in tests/model)
            "--members",
            "1",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["members"] == 1 and "1 network(s)" in (tmp_path / "results.md").read_text()
    # the query and its two composition-shifted variants, scored by the same models
    variants = sorted(res["tasks"])
    assert len(variants) == 3 and all(v.startswith("pbmc68k_split") for v in variants)
    assert {v[len("pbmc68k_split") :].split()[-1] for v in variants[1:]} >= {"10%"}
    methods = res["tasks"]["pbmc68k_split"]["methods"]
    assert set(methods) == {"spikgpt", "non-spiking twin", "logreg_embedding", "knn_embedding"}
    for runs in methods.values():
        assert 0 <= runs[0]["macro_f1"] <= 1 and runs[0]["predict_cells_per_s"] > 0
        assert len(runs[0]["per_class_f1"]) == 10 and "CD19+ B" in runs[0]["per_class_f1"]
    assert "| pbmc68k_split |" in (tmp_path / "results.md").read_text()
    figs = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figs == [f"pbmc68k_split_{k}.png" for k in ("confusion", "per_class_f1", "umap")]


def test_markdown_open_set_and_loto_sections():
    from spikgpt.openset.novelty import SCORES

    auroc = {"decision": 0.9, **dict.fromkeys(SCORES, 0.5)}
    loto = {
        "X": {
            "auroc": auroc,
            "unseen_called_unknown": 0.5,
            "false_unknown_known": 0.05,
            "macro_f1_before": 0.8,
            "macro_f1_after": 0.78,
        }
    }
    hw = {"cpu_count": 2, "machine": "m", "torch": "2", "torch_threads": 2, "spikgpt": "0"}
    peer = {"auroc": [0.97], "unknown": [0.2], "false_unknown": [0.01]}
    open_set = {"scores": {"decision": [0.95]}, "spikgpt_unknown": [0.5], "spikgpt_false_unknown": [0.02]}
    run = {"macro_f1": 0.9, "accuracy": 0.9, "macro_f1_after_rejection": 0.88, "false_unknown": 0.02}
    run |= {"train_seconds": 1.0, "predict_cells_per_s": 100.0}
    task = {"methods": {"spikgpt": [run], "singler": [run]}, "open_set": {**open_set, "peers": {"singler": peer}}}
    res = {"tasks": {"T": task}, "seeds": [0], "seconds": 1.0, "leave_one_type_out": {"t": loto}, "hardware": hw}
    md = markdown(res)
    assert "| X | 0.900 | 0.500" in md and "| **mean** | **0.900**" in md
    assert "singler confidence | spikgpt Unknown (unseen / known) | singler Unknown (unseen / known) |" in md
    assert "| T | 0.950 |" in md and "| 0.970 | 0.500 / 0.020 | 0.200 / 0.010 |" in md
    assert "pruneScores" in md
    assert "| T | 0.020; 0.900 → 0.880 |" in md  # one seed: no worst seed
    two = {**task, "methods": {"spikgpt": [run, {**run, "false_unknown": 0.3}]}}
    assert "| T | 0.160 ± 0.140 (worst 0.300); 0.900 → 0.880 |" in markdown({**res, "tasks": {"T": two}})


def test_task_specs_are_complete():
    for t in TASKS.values():
        assert t.sources and t.description and t.label_key
        assert t.query or t.batch_key or t.reference.startswith("scanpy:")


def test_query_variants_remove_and_thin_the_largest_known_type():
    import anndata as ad
    import numpy as np
    import pandas as pd

    from spikgpt.bench.run import query_variants

    labels = ["A"] * 50 + ["B"] * 20 + ["new"] * 30
    q = ad.AnnData(np.zeros((100, 2)), obs=pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(100)]))
    v = dict(query_variants(q, "t", ["A", "B"], seed=0))
    assert set(v) == {"", " − A", " A 10%"} and v[""] is q
    assert list(v[" − A"].obs["t"].value_counts().sort_index()) == [20, 30]
    assert v[" A 10%"].obs["t"].value_counts().to_dict() == {"new": 30, "B": 20, "A": 5}
    assert dict(query_variants(q, "t", ["A"], seed=0)).keys() == {""}  # one known type: nothing to shift


def test_subsample_reference_is_stratified_seeded_and_keeps_two_cells_of_every_type():
    import anndata as ad
    import numpy as np
    import pandas as pd

    from spikgpt.bench.tasks import subsample_reference

    labels = ["A"] * 900 + ["B"] * 95 + ["rare"] * 5
    ref = ad.AnnData(np.zeros((1000, 2)), obs=pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(1000)]))
    small = subsample_reference(ref, "t", 100, seed=0)
    assert small.obs["t"].value_counts().to_dict() == {"A": 90, "B": 10, "rare": 2}
    assert small.obs_names.equals(subsample_reference(ref, "t", 100, seed=0).obs_names)
    assert not small.obs_names.equals(subsample_reference(ref, "t", 100, seed=1).obs_names)
    assert subsample_reference(ref, "t", 5000, seed=0) is ref and ref.n_obs == 1000


def test_bench_rejects_a_reference_size_below_two(tmp_path):
    import pytest

    from spikgpt.bench.run import run_bench

    with pytest.raises(ValueError, match="reference-cells"):
        run_bench(tmp_path, tasks=["pbmc68k_split"], reference_cells=0, peers=())
    with pytest.raises(ValueError, match="--members"):
        run_bench(tmp_path, tasks=["pbmc68k_split"], members=0, peers=())
