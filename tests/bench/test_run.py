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
            "--no-celltypist",
            "--no-loto",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
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
    res = {"tasks": {}, "seeds": [0], "seconds": 1.0, "leave_one_type_out": {"t": loto}, "hardware": hw}
    md = markdown(res)
    assert "| X | 0.900 | 0.500" in md and "| **mean** | **0.900**" in md


def test_task_specs_are_complete():
    for t in TASKS.values():
        assert t.sources and t.description and t.label_key
        assert t.query or t.batch_key or t.reference.startswith("scanpy:")
