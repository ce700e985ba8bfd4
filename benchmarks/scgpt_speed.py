"""scGPT embedding throughput: a pad-to-max_length implementation of the reference vs ours.

Builds a full-size scGPT architecture from an args.json of the official shape (12 layers,
512 dims, 8 heads, d_hid 512; random weights: speed does not depend on them), with a
vocabulary made of the input's genes, and embeds real raw-count PBMCs
(shared/data/pbmc_raw_sample, tiled to --n-cells) twice, in one run:

(a) reference-style: every cell padded to max_length, ``torch.nn.TransformerEncoder`` as in
    scgpt 0.2.4 (``enable_nested_tensor=False``: the straightforward padded computation);
(b) ours: ``ScGPTEmbedder`` (length-bucketed batches, SDPA, ``<cls>``-only last layer).

Both use the same tokeniser and seed, so the outputs must agree (max |diff| printed).
Each runs in its own process so that peak memory (max RSS) is its own.

    python benchmarks/scgpt_speed.py --n-cells 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_raw_sample" / "pbmc_raw_sample.h5ad"
OFFICIAL_SHAPE = {
    "embsize": 512,
    "nheads": 8,
    "d_hid": 512,
    "nlayers": 12,
    "n_layers_cls": 3,
    "dropout": 0.2,
    "pad_token": "<pad>",
    "pad_value": -2,
    "n_bins": 51,
}


def make_checkpoint(genes: list[str], folder: Path, seed: int = 0) -> Path:
    """Write a random full-size checkpoint in the official layout (flash-attention key names)."""
    torch.manual_seed(seed)
    vocab = {g: i for i, g in enumerate(genes)}
    for tok in ("<pad>", "<cls>", "<eoc>"):
        vocab[tok] = len(vocab)
    E, F, V = 512, 512, len(vocab)
    s = {
        "encoder.embedding.weight": torch.randn(V, E),
        "value_encoder.linear1.weight": torch.randn(E, 1),
        "value_encoder.linear2.weight": torch.randn(E, E) / E**0.5,
    }
    for name in ("encoder.enc_norm", "value_encoder.norm"):
        s[f"{name}.weight"], s[f"{name}.bias"] = 1 + 0.1 * torch.randn(E), 0.1 * torch.randn(E)
    for name in ("value_encoder.linear1", "value_encoder.linear2"):
        s[f"{name}.bias"] = 0.1 * torch.randn(E)
    for i in range(12):
        p = f"transformer_encoder.layers.{i}."
        s |= {
            p + "self_attn.Wqkv.weight": torch.randn(3 * E, E) / E**0.5,
            p + "self_attn.Wqkv.bias": 0.1 * torch.randn(3 * E),
            p + "self_attn.out_proj.weight": torch.randn(E, E) / E**0.5,
            p + "self_attn.out_proj.bias": 0.1 * torch.randn(E),
            p + "linear1.weight": torch.randn(F, E) / E**0.5,
            p + "linear1.bias": 0.1 * torch.randn(F),
            p + "linear2.weight": torch.randn(E, F) / F**0.5,
            p + "linear2.bias": 0.1 * torch.randn(E),
        }
        for n in ("norm1", "norm2"):
            s[p + f"{n}.weight"], s[p + f"{n}.bias"] = 1 + 0.1 * torch.randn(E), 0.1 * torch.randn(E)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(OFFICIAL_SHAPE))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    torch.save(s, folder / "best_model.pt")
    return folder


def reference_style(ckpt: Path, X: sp.csr_matrix, genes: np.ndarray, max_length: int, batch_size: int, seed: int):
    """Pad every cell to max_length and run torch.nn.TransformerEncoder, as scgpt 0.2.4 does."""
    from torch import nn

    from spikgpt.embed.scgpt import ScGPTEmbedder, Tokenizer, pad_batch

    ours = ScGPTEmbedder(ckpt, progress=False, device="cpu")
    a = ours.ckpt.args
    layer = nn.TransformerEncoderLayer(a.embsize, a.nheads, a.d_hid, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, a.nlayers, enable_nested_tensor=False).eval()
    enc.load_state_dict(
        {
            k.removeprefix("transformer_encoder."): v
            for k, v in ours.ckpt.state.items()
            if k.startswith("transformer_encoder.")
        }
    )
    net = ours.net
    tok = Tokenizer(ours.match_genes(genes), ours.ckpt.cls_id, a.pad_value, max_length, seed)
    out = np.zeros((X.shape[0], a.embsize), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, X.shape[0], batch_size):
            tokens = tok(X[start : start + batch_size])
            ids, vals, pad = pad_batch(tokens, ours.ckpt.pad_id, a.pad_value, width=max_length)
            x = net.enc_norm(net.embedding(ids)) + net.val_norm(
                net.val2(torch.relu(net.val1(vals.clamp(max=512).unsqueeze(-1))))
            )
            cls = enc(x, src_key_padding_mask=pad)[:, 0]
            out[start : start + len(tokens)] = torch.nn.functional.normalize(cls, dim=1).numpy()
    return out


def ours_style(ckpt: Path, X, genes, max_length: int, batch_size: int, seed: int):
    from spikgpt.embed.scgpt import ScGPTEmbedder

    emb = ScGPTEmbedder(ckpt, max_length=max_length, batch_size=batch_size, seed=seed, progress=False, device="cpu")
    return emb.embed_matrix(X, genes)


def _worker(name, ckpt, X, genes, max_length, batch_size, seed, queue):
    torch.set_num_threads(torch.get_num_threads())
    fn = reference_style if name == "reference" else ours_style
    t0 = time.perf_counter()
    E = fn(ckpt, X, genes, max_length, batch_size, seed)
    seconds = time.perf_counter() - t0
    queue.put((E, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run(name, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(name, *args, q))
    p.start()
    E, seconds, rss = q.get()
    p.join()
    return E, seconds, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-cells", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    sample = ad.read_h5ad(SAMPLE)
    # Tile the sample, shuffled with the seed, so that any --n-cells has its length distribution.
    reps = int(np.ceil(args.n_cells / sample.n_obs))
    order = np.random.default_rng(args.seed).permutation(sample.n_obs * reps)[: args.n_cells] % sample.n_obs
    X = sp.csr_matrix(sample.X[order], dtype=np.float32)
    genes = sample.var_names.to_numpy().astype(str)
    n_genes = np.diff(X.indptr)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(list(genes), Path(tmp) / "scgpt_fullsize")
        common = (ckpt, X, genes, args.max_length, args.batch_size, args.seed)
        E_ref, t_ref, rss_ref = run("reference", *common)
        E_ours, t_ours, rss_ours = run("ours", *common)
    result = {
        "cells": args.n_cells,
        "expressed_genes_per_cell_mean": float(n_genes.mean()),
        "share_above_max_length": float((n_genes + 1 > args.max_length).mean()),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "reference_cells_per_s": args.n_cells / t_ref,
        "ours_cells_per_s": args.n_cells / t_ours,
        "speedup": t_ref / t_ours,
        "reference_peak_rss_mb": rss_ref,
        "ours_peak_rss_mb": rss_ours,
        "max_abs_diff": float(np.abs(E_ref - E_ours).max()),
    }
    for k, v in result.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scgpt_speed.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'scgpt_speed.json'}")


if __name__ == "__main__":
    main()
