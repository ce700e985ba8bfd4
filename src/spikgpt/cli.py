"""The ``spikgpt`` command line: thin wrappers over the public API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from spikgpt.errors import SpikGPTError

app = typer.Typer(
    help="Annotate single-cell RNA-seq with a spiking transformer; low-confidence cells become 'Unknown'.\n\n"
    "Typical use: `spikgpt train ref.h5ad --label-key cell_type --out model/`, then "
    "`spikgpt annotate query.h5ad --model model/ --out annotated.h5ad`.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

Layer = Annotated[str | None, typer.Option(help="Read expression from this layer instead of X.")]
UseRaw = Annotated[bool, typer.Option("--use-raw", help="Read expression from .raw instead of X.")]
GeneKey = Annotated[str | None, typer.Option(help="var column with gene symbols (default: var_names).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log messages.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]


def _setup(quiet: bool) -> None:
    logging.getLogger("spikgpt").setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logging.getLogger("spikgpt").handlers):
        logging.getLogger("spikgpt").addHandler(RichHandler(console=console, show_path=False))


def _check_input(path: Path) -> None:
    """Fail before any work when an input file is missing or not an .h5ad."""
    from spikgpt.data import check_input_file

    check_input_file(path)


def _version(value: bool) -> None:
    if value:
        from spikgpt import __version__

        print(f"spikgpt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Annotate single-cell RNA-seq with a spiking transformer."""


def _fail(err: Exception) -> None:
    console.print(f"[bold red]Error:[/] {err}", soft_wrap=True)
    raise typer.Exit(2) from err


@app.command()
def train(
    reference: Annotated[Path, typer.Argument(help="Labelled reference .h5ad.")],
    label_key: Annotated[str, typer.Option(help="obs column with cell types.")],
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    embedder: Annotated[
        str,
        typer.Option(
            help="'default' (marker + variable genes, per-cell ranks), 'default:log', 'default:hvg', "
            "'default:log,hvg' (spikgpt 0.5), 'obsm:KEY' or 'scgpt:PATH'."
        ),
    ] = "default",
    layer: Layer = None,
    use_raw: UseRaw = False,
    gene_key: GeneKey = None,
    fdr: Annotated[
        float, typer.Option(help="False discovery rate of Unknown calls (share allowed to be known cells).")
    ] = 0.1,
    no_mapping: Annotated[
        bool, typer.Option("--no-mapping", help="Do not map query embeddings onto the reference by default.")
    ] = False,
    calibration_fraction: Annotated[
        float, typer.Option(help="Share of cells held out to calibrate Unknown when not cross-fitting (0: none).")
    ] = 0.2,
    calibration_folds: Annotated[
        int | None,
        typer.Option(
            help="1: hold --calibration-fraction out to calibrate; k >= 2: cross-fit with k folds, whose "
            "models score the query. Default: 5 on references of up to 50,000 cells when the novelty "
            "score reads no network (the default's), else 5 only up to ~400 cells; otherwise 1.",
            show_default=False,
        ),
    ] = None,
    no_refit: Annotated[
        bool,
        typer.Option(
            "--no-refit", help="Keep the classifier trained without the calibration cells (no second training)."
        ),
    ] = False,
    min_cells_per_class: Annotated[
        int,
        typer.Option(help="Types with fewer cells train on all their cells (none held out to calibrate).", min=2),
    ] = 5,
    members: Annotated[
        int,
        typer.Option(help="Networks in the classifier's ensemble, trained from seeds seed, seed + 1, …", min=1),
    ] = 3,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Processes training the ensemble's networks side by side (same networks for any number); "
            "default: one per free CPU core, up to --members.",
            min=1,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a model on a labelled reference and save it to a folder."""
    from spikgpt.api import check_calibration_folds, check_calibration_fraction
    from spikgpt.api import train as train_
    from spikgpt.model.annotator import check_model_destination
    from spikgpt.model.training import TrainConfig
    from spikgpt.openset import check_fdr

    _setup(quiet)
    try:
        _check_input(reference)
        check_model_destination(out, overwrite=overwrite)
        check_fdr(fdr)
        check_calibration_fraction(calibration_fraction)
        check_calibration_folds(calibration_folds)
        model = train_(
            reference,
            label_key,
            embedder=embedder,
            layer=layer,
            use_raw=use_raw,
            gene_key=gene_key,
            fdr=fdr,
            mapping=not no_mapping,
            calibration_fraction=calibration_fraction,
            calibration_folds=calibration_folds,
            refit=not no_refit,
            min_cells_per_class=min_cells_per_class,
            train_config=TrainConfig(members=members, workers=workers),
            seed=seed,
            progress=not quiet,
        )
        model.save(out, overwrite=overwrite)
    except (SpikGPTError, FileExistsError, ValueError) as err:
        _fail(err)
    console.print(f"{model}\nSaved to [bold]{out}[/]")


def _dask_client(address: str):
    """A client of the Dask scheduler at ``address``, or a clear error."""
    try:
        from distributed import Client
    except ImportError as err:
        msg = "--dask-scheduler needs dask.distributed: pip install 'spikgpt[dask]'."
        raise ValueError(msg) from err
    try:
        return Client(address, timeout=30)
    except OSError as err:
        raise ValueError(f"Cannot reach the Dask scheduler at {address}: {err}") from err


@app.command()
def annotate(
    query: Annotated[Path, typer.Argument(help="Query .h5ad file or .zarr store to annotate.")],
    model: Annotated[Path, typer.Option(help="Model folder from `spikgpt train`.")],
    out: Annotated[Path, typer.Option(help="Annotated copy to write, .h5ad (or .zarr for a .zarr query).")],
    csv: Annotated[Path | None, typer.Option(help="Also write predictions as CSV.")] = None,
    novelty: Annotated[
        str | None,
        typer.Option(
            help="Novelty score(s) tested: combined (the model's default), max_prob, energy, knn_latent, "
            "knn_embedding, mahalanobis_latent, mahalanobis_embedding, gaussian_embedding, firing, pca_residual "
            "or scaled_mahalanobis_embedding."
        ),
    ] = None,
    fdr: Annotated[
        float | None, typer.Option(help="False discovery rate of Unknown calls (default: the model's, 0.1).")
    ] = None,
    false_unknown: Annotated[
        float | None,
        typer.Option(
            help="Instead of --fdr: the share of known cells you accept to see called Unknown (e.g. 0.01); "
            "every cell is tested on its own at that level."
        ),
    ] = None,
    no_mapping: Annotated[bool, typer.Option("--no-mapping", help="Do not map the query onto the reference.")] = False,
    shift: Annotated[
        str | None,
        typer.Option(
            help="Global-shift correction of p-values: gated_by_type (default: scale when the shift is large, "
            "then each predicted type on its own), gated (the query as a whole only), scale, none (more power "
            "within one study), location or quartile; MODE@matched estimates it on the query cells the mapping "
            "matched to reference cells only."
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(help="Cells read and classified at once (memory grows with it; results do not).")
    ] = 20_000,
    dask_scheduler: Annotated[
        str | None,
        typer.Option(
            help="Address of a Dask scheduler (e.g. tcp://10.0.0.5:8786): chunks are classified on its workers, "
            "which must see the query and the model folder at the same paths. Needs spikgpt[dask]."
        ),
    ] = None,
    layer: Layer = None,
    use_raw: UseRaw = False,
    gene_key: GeneKey = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Annotate a query with a trained model; writes obs['spikgpt_label'] and friends.

    The query is read in chunks of --chunk-size cells: memory does not grow with the query.
    """
    from spikgpt.data import check_output_file, write_atomic
    from spikgpt.model import SpikGPTModel
    from spikgpt.openset import check_false_unknown, check_fdr
    from spikgpt.openset.decision import check_shift
    from spikgpt.streaming import annotate_file, check_output_store

    _setup(quiet)
    try:
        _check_input(query)
        if query.suffix == ".zarr":
            check_output_store(out, ".zarr", overwrite=overwrite)
        else:
            check_output_file(out, ".h5ad", overwrite=overwrite, source=query)
        if csv is not None:
            check_output_file(csv, ".csv", overwrite=overwrite, source=query)
        if shift is not None:
            check_shift(shift)
        if fdr is not None:
            check_fdr(fdr)
        if false_unknown is not None:
            check_false_unknown(false_unknown)
        loaded = SpikGPTModel.load(model)
        if novelty is not None:
            loaded.score_names(novelty)
        if chunk_size < 1:
            raise ValueError(f"--chunk-size must be at least 1 (got {chunk_size}).")
        client = _dask_client(dask_scheduler) if dask_scheduler else None
        result = annotate_file(
            query,
            loaded,
            out,
            layer=layer,
            use_raw=use_raw,
            gene_key=gene_key,
            novelty=novelty,
            fdr=fdr,
            mapping=False if no_mapping else None,
            shift=shift,
            false_unknown=false_unknown,
            chunk_size=chunk_size,
            client=client,
            overwrite=overwrite,
            progress=not quiet,
        )
        if client is not None:
            client.close()
        if csv is not None:
            write_atomic(csv, result.to_csv, overwrite=overwrite)
    except (SpikGPTError, FileExistsError, ValueError) as err:
        _fail(err)
    counts = result["spikgpt_label"].value_counts()
    table = Table("cell type", "cells")
    for name, n in counts.items():
        table.add_row(str(name), str(n))
    console.print(table)
    console.print(f"Wrote [bold]{out}[/]" + (f" and [bold]{csv}[/]" if csv else ""))


@app.command()
def embed(
    query: Annotated[Path, typer.Argument(help="Input .h5ad with raw counts.")],
    scgpt: Annotated[
        Path, typer.Option(help="Official scGPT checkpoint folder (args.json, vocab.json, best_model.pt).")
    ],
    out: Annotated[Path, typer.Option(help="Output .h5ad; the embedding goes to obsm['X_scGPT'].")],
    gene_key: GeneKey = None,
    layer: Layer = None,
    use_raw: UseRaw = False,
    max_length: Annotated[int, typer.Option(help="Token cap per cell, <cls> included.")] = 1200,
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of tie-breaking and gene subsampling.")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Compute scGPT cell embeddings (then train with --embedder obsm:X_scGPT or scgpt:PATH)."""
    from spikgpt.api import embed_scgpt
    from spikgpt.data import check_output_file, write_h5ad_atomic

    _setup(quiet)
    try:
        _check_input(query)
        check_output_file(out, ".h5ad", overwrite=overwrite, source=query)
        adata = embed_scgpt(
            query,
            scgpt,
            layer=layer,
            use_raw=use_raw,
            gene_key=gene_key,
            max_length=max_length,
            batch_size=batch_size,
            seed=seed,
            progress=not quiet,
        )
        write_h5ad_atomic(adata, out, overwrite=overwrite)
    except (SpikGPTError, FileExistsError) as err:
        _fail(err)
    info = adata.uns["X_scGPT"]
    console.print(
        f"Embedded {adata.n_obs} cells in {info['seconds']:.1f} s ({info['n_not_embedded']} without vocabulary "
        f"genes); wrote obsm['X_scGPT'] to [bold]{out}[/]"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("demo_out"),
    held_out: Annotated[str, typer.Option(help="Cell type kept out of training.")] = "CD34+",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Train and annotate on scanpy's bundled pbmc68k_reduced (700 PBMCs), one type held out."""
    from spikgpt.demo import run_demo

    _setup(quiet)
    r = run_demo(out, held_out=held_out, seed=seed, progress=not quiet)
    table = Table("method (query cells of known types)", "accuracy", "macro-F1", title="pbmc68k_reduced")
    for name, m in [
        ("spikgpt (before rejection)", r.spikgpt),
        ("spikgpt (Unknown counted as error)", r.spikgpt_after_rejection),
        ("logistic regression, same embedding", r.logistic_regression),
    ]:
        table.add_row(name, f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}")
    Console().print(table)
    o = r.open_set
    Console().print(
        f"Held-out type {r.held_out!r}: {o['unseen_called_unknown']:.0%} of its {o['n_unseen']} cells "
        f"called Unknown (novelty AUROC {o['unseen_auroc']:.3f}); false Unknown on known types: "
        f"{o['false_unknown_known']:.1%}.\n"
        f"Training {r.train_seconds:.1f} s, annotation "
        f"{r.annotate_seconds:.2f} s.\nFiles: " + ", ".join(f"{k}: {v}" for k, v in r.files.items())
    )


@app.command()
def explain(
    query: Annotated[Path, typer.Argument(help="Cells to explain (.h5ad).")],
    model: Annotated[Path, typer.Option(help="Model folder from `spikgpt train`.")],
    out: Annotated[Path, typer.Option(help="Folder for top_genes.csv, figures and summary.md.")],
    n_top: Annotated[int, typer.Option(help="Genes kept per class.")] = 20,
    cell: Annotated[
        list[str] | None, typer.Option(help="obs_name whose attributions/raster to keep (repeatable).")
    ] = None,
    layer: Layer = None,
    use_raw: UseRaw = False,
    gene_key: GeneKey = None,
    quiet: Quiet = False,
) -> None:
    """Gene attributions per class, spike-attention maps, firing rates and a spike raster."""
    from spikgpt.explain import explain as explain_

    _setup(quiet)
    try:
        explain_(query, model, layer=layer, use_raw=use_raw, gene_key=gene_key, n_top=n_top, cells=cell, out=out)
    except SpikGPTError as err:
        _fail(err)
    Console().print((out / "summary.md").read_text())


@app.command()
def energy(
    query: Annotated[Path, typer.Argument(help="Cells to run (.h5ad).")],
    model: Annotated[Path, typer.Option(help="Model folder from `spikgpt train`.")],
    out: Annotated[Path | None, typer.Option(help="Also write the report (Markdown) and energy.json here.")] = None,
    layer: Layer = None,
    use_raw: UseRaw = False,
    gene_key: GeneKey = None,
    quiet: Quiet = False,
) -> None:
    """Synaptic operations and estimated energy (45 nm) vs the non-spiking twin, with CPU time."""
    import json

    from spikgpt.energy import energy_report, markdown

    _setup(quiet)
    try:
        report = energy_report(query, model, layer=layer, use_raw=use_raw, gene_key=gene_key)
    except SpikGPTError as err:
        _fail(err)
    text = markdown(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "energy.md").write_text(text)
        (out / "energy.json").write_text(json.dumps(report, indent=1, default=float))
    Console().print(text)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Folder for results.json, results.md and figures/.")] = Path("bench_out"),
    task: Annotated[list[str] | None, typer.Option(help="Task to run (repeatable); all by default.")] = None,
    seeds: Annotated[int, typer.Option(help="Number of seeds (0..n-1).")] = 3,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            help="Peer to run (repeatable): celltypist, celltypist_majority, singler, symphony, scanvi; "
            "all but scanvi by default (each in its own venv)."
        ),
    ] = None,
    no_peers: Annotated[bool, typer.Option("--no-peers", help="Run no peer (spikgpt, twin, LR and kNN only).")] = False,
    loto: Annotated[bool, typer.Option(help="Leave-one-type-out open-set evaluation.")] = True,
    composition: Annotated[
        bool, typer.Option(help="Also score queries with their largest type removed / kept at 10 %.")
    ] = True,
    reference_cells: Annotated[
        int | None,
        typer.Option(help="Train every method on a seeded, stratified sample of this many reference cells."),
    ] = None,
    members: Annotated[
        int | None,
        typer.Option(help="Networks of spikgpt's and the twin's classifiers (default: the TrainConfig default, 3)."),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            "--data-root",
            help="Folder with the datasets (default: shared/data beside the repository); see README 'Benchmark data'.",
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Benchmark spikgpt against its non-spiking twin, LR/kNN on its embedding, CellTypist, SingleR, Symphony."""
    from spikgpt.bench.baselines import DEFAULT_PEERS
    from spikgpt.bench.run import run_bench

    _setup(quiet)
    try:
        results = run_bench(
            out,
            tasks=task,
            seeds=list(range(seeds)),
            peers=() if no_peers else tuple(peer or DEFAULT_PEERS),
            loto=loto,
            composition=composition,
            data_root=data_root,
            reference_cells=reference_cells,
            members=members,
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    Console().print((out / "results.md").read_text())
    console.print(f"{len(results['tasks'])} tasks in {results['seconds']:.0f} s; wrote [bold]{out}[/]")


def main() -> None:  # pragma: no cover
    """Entry point."""
    app()
