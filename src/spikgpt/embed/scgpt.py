"""``scgpt:PATH``: scGPT cell embeddings from an official checkpoint folder, in our own PyTorch.

Reimplements ``scgpt.tasks.embed_data`` (scgpt 0.2.4, ``cls`` mode) as specified in
``shared/reference/scgpt_embedding.md``, without importing ``scgpt`` (it needs torchtext and
pins scvi-tools < 1.0):

* genes matched to ``vocab.json`` by exact symbol; per cell the expressed in-vocab genes,
  ``<cls>`` first (value ``pad_value``);
* values binned per cell into 1..50 with 50 quantile edges and the reference's random
  tie-breaking; cells with more than ``max_length - 1`` expressed genes keep a random subset;
* gene embedding + LayerNorm, continuous value encoder, post-norm transformer layers with a
  key-padding mask, the last layer's ``<cls>`` output, L2-normalised.

Differences from the reference, none of which changes a result:

* **Randomness is seeded and deterministic.** The reference draws tie-breaks and subsamples
  from global RNGs inside DataLoader workers, so its output changes run to run and with the
  CPU count. We replay its single-process protocol from one seed: a legacy NumPy stream for
  the tie-breaks (``np.random.rand(n)`` per cell, in obs order) and a torch generator (one
  int64 draw, then ``randperm`` per long cell). With the seed the fixture used, outputs match
  the reference on every cell. Results therefore depend on a cell's position in the input.
* **Speed.** Cells are binned chunk by chunk straight from the sparse matrix (never densified),
  sorted by length and batched with padding only to the longest cell of each batch (the
  reference pads every cell to ``max_length``); attention is
  ``scaled_dot_product_attention`` with the key-padding mask; the last layer is evaluated for
  the ``<cls>`` position only (the only output used); inference mode; GPU when present.
* **A cell with no expressed in-vocabulary gene** crashes the reference. Here it gets a row
  of NaN (logged, counted) and annotation calls it ``Unknown``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from spikgpt.data import Cells, gene_names
from spikgpt.embed.base import Embedder
from spikgpt.errors import GeneOverlapError, InputError, ModelFormatError
from spikgpt.genes import ENSEMBL, id_kind, to_symbols

logger = logging.getLogger("spikgpt")

N_BINS = 51  # hard-coded in the reference collator: 50 edges, bins 1..50
MAX_VALUE = 512.0  # value encoder clamp
FILES = ("args.json", "vocab.json", "best_model.pt")


# ---------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class ScGPTArgs:
    """The ``args.json`` keys the cell embedding reads."""

    embsize: int
    nheads: int
    d_hid: int
    nlayers: int
    pad_token: str = "<pad>"
    pad_value: float = -2.0


def _required_shapes(a: ScGPTArgs, n_vocab: int) -> dict[str, tuple[int, ...]]:
    E, F_ = a.embsize, a.d_hid
    shapes = {
        "encoder.embedding.weight": (n_vocab, E),
        "encoder.enc_norm.weight": (E,),
        "encoder.enc_norm.bias": (E,),
        "value_encoder.linear1.weight": (E, 1),
        "value_encoder.linear1.bias": (E,),
        "value_encoder.linear2.weight": (E, E),
        "value_encoder.linear2.bias": (E,),
        "value_encoder.norm.weight": (E,),
        "value_encoder.norm.bias": (E,),
    }
    for i in range(a.nlayers):
        p = f"transformer_encoder.layers.{i}."
        shapes |= {
            p + "self_attn.in_proj_weight": (3 * E, E),
            p + "self_attn.in_proj_bias": (3 * E,),
            p + "self_attn.out_proj.weight": (E, E),
            p + "self_attn.out_proj.bias": (E,),
            p + "linear1.weight": (F_, E),
            p + "linear1.bias": (F_,),
            p + "linear2.weight": (E, F_),
            p + "linear2.bias": (E,),
            p + "norm1.weight": (E,),
            p + "norm1.bias": (E,),
            p + "norm2.weight": (E,),
            p + "norm2.bias": (E,),
        }
    return shapes


@dataclass
class ScGPTCheckpoint:
    """A loaded and checked scGPT checkpoint folder."""

    path: Path
    args: ScGPTArgs
    vocab: dict[str, int]
    state: dict[str, torch.Tensor]
    sha256: str

    @property
    def pad_id(self) -> int:  # noqa: D102
        return self.vocab[self.args.pad_token]

    @property
    def cls_id(self) -> int:  # noqa: D102
        return self.vocab["<cls>"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> ScGPTCheckpoint:
    """Read and check an official scGPT checkpoint folder.

    Parameters
    ----------
    path
        Folder with ``args.json``, ``vocab.json`` and ``best_model.pt``.

    Returns
    -------
    The checkpoint, with attention weights renamed from flash-attention's ``Wqkv`` to
    ``in_proj_``. Heads the embedding does not use are dropped.
    """
    path = Path(path)
    if not path.is_dir():
        msg = f"scGPT checkpoint folder not found: {path}."
        raise ModelFormatError(msg)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        msg = (
            f"scGPT checkpoint folder {path} lacks {', '.join(missing)}. An official checkpoint "
            "(e.g. scGPT_human) has args.json, vocab.json and best_model.pt."
        )
        raise ModelFormatError(msg)
    try:
        raw_args = json.loads((path / "args.json").read_text())
        vocab = json.loads((path / "vocab.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"Could not parse the JSON files of {path}: {err}."
        raise ModelFormatError(msg) from err
    try:
        args = ScGPTArgs(
            embsize=int(raw_args["embsize"]),
            nheads=int(raw_args["nheads"]),
            d_hid=int(raw_args["d_hid"]),
            nlayers=int(raw_args["nlayers"]),
            pad_token=str(raw_args.get("pad_token", "<pad>")),
            pad_value=float(raw_args.get("pad_value", -2)),
        )
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{path / 'args.json'} lacks a valid {err} entry (needs embsize, nheads, d_hid, nlayers)."
        raise ModelFormatError(msg) from err
    if not isinstance(vocab, dict) or not vocab:
        msg = f"{path / 'vocab.json'} must be a JSON object mapping gene symbols to integer ids."
        raise ModelFormatError(msg)
    for token in (args.pad_token, "<cls>"):
        if token not in vocab:
            msg = f"{path / 'vocab.json'} has no {token!r} token; it is not an scGPT vocabulary."
            raise ModelFormatError(msg)
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        msg = f"{path / 'vocab.json'}: token ids must be contiguous from 0."
        raise ModelFormatError(msg)
    try:
        state = torch.load(path / "best_model.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or pickled-code files
        msg = f"Could not load {path / 'best_model.pt'} as a plain state dict: {type(err).__name__}: {err}."
        raise ModelFormatError(msg) from err
    if not isinstance(state, dict):
        msg = f"{path / 'best_model.pt'} is not a state dict (got {type(state).__name__})."
        raise ModelFormatError(msg)
    state = {k.replace("Wqkv.", "in_proj_"): v for k, v in state.items()}
    used = {}
    for key, shape in _required_shapes(args, len(vocab)).items():
        if key not in state:
            hint = key.replace("in_proj_", "Wqkv.")
            msg = f"{path / 'best_model.pt'} lacks {key!r} (stored as {hint!r} in official checkpoints)."
            raise ModelFormatError(msg)
        if tuple(state[key].shape) != shape:
            msg = (
                f"{path / 'best_model.pt'}: {key!r} has shape {tuple(state[key].shape)}, expected {shape} "
                f"from args.json (embsize={args.embsize}, d_hid={args.d_hid}) and {len(vocab)} vocab tokens."
            )
            raise ModelFormatError(msg)
        used[key] = state[key].float()
    return ScGPTCheckpoint(path, args, vocab, used, _sha256(path / "best_model.pt"))


# ---------------------------------------------------------------------------- the network
class ScGPTEncoder(nn.Module):
    """scGPT's embedding path: gene + value encoders and post-norm transformer layers."""

    def __init__(self, args: ScGPTArgs, n_vocab: int) -> None:
        super().__init__()
        E = args.embsize
        self.heads = args.nheads
        self.embedding = nn.Embedding(n_vocab, E)
        self.enc_norm = nn.LayerNorm(E)
        self.val1, self.val2, self.val_norm = nn.Linear(1, E), nn.Linear(E, E), nn.LayerNorm(E)
        self.layers = nn.ModuleList(_Layer(E, args.d_hid) for _ in range(args.nlayers))

    @classmethod
    def from_checkpoint(cls, ckpt: ScGPTCheckpoint) -> ScGPTEncoder:
        """Build the network and load the checkpoint's weights (strictly)."""
        net = cls(ckpt.args, len(ckpt.vocab))
        s = ckpt.state
        mapping = {
            "embedding.weight": "encoder.embedding.weight",
            "enc_norm.weight": "encoder.enc_norm.weight",
            "enc_norm.bias": "encoder.enc_norm.bias",
            "val1.weight": "value_encoder.linear1.weight",
            "val1.bias": "value_encoder.linear1.bias",
            "val2.weight": "value_encoder.linear2.weight",
            "val2.bias": "value_encoder.linear2.bias",
            "val_norm.weight": "value_encoder.norm.weight",
            "val_norm.bias": "value_encoder.norm.bias",
        }
        ours = {k: s[v] for k, v in mapping.items()}
        for i in range(ckpt.args.nlayers):
            p = f"transformer_encoder.layers.{i}."
            for name in _Layer.PARAMS:
                ours[f"layers.{i}.{name}"] = s[p + name]
        net.load_state_dict(ours, strict=True)
        return net.eval()

    def forward(self, ids: torch.Tensor, values: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``<cls>`` outputs ``[B, E]`` for token ids / binned values ``[B, L]`` (``pad``: True = padding)."""
        x = self.enc_norm(self.embedding(ids))
        v = values.clamp(max=MAX_VALUE).unsqueeze(-1)
        x = x + self.val_norm(self.val2(F.relu(self.val1(v))))
        keep = (~pad)[:, None, None, :]  # SDPA boolean mask: True = attend
        for i, layer in enumerate(self.layers):
            x = layer(x, keep, self.heads, cls_only=i == len(self.layers) - 1)
        return x[:, 0]


class _Layer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (post-norm, ReLU, eps 1e-5) in eval mode."""

    PARAMS = (
        "self_attn.in_proj_weight",
        "self_attn.in_proj_bias",
        "self_attn.out_proj.weight",
        "self_attn.out_proj.bias",
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
    )

    def __init__(self, E: int, F_: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * E, E))
        self.self_attn.in_proj_bias = nn.Parameter(torch.empty(3 * E))
        self.self_attn.out_proj = nn.Linear(E, E)
        self.linear1, self.linear2 = nn.Linear(E, F_), nn.Linear(F_, E)
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, heads: int, *, cls_only: bool) -> torch.Tensor:
        B, L, E = x.shape
        W, b = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        if cls_only:  # only position 0 is used downstream: one query, all keys
            q = F.linear(x[:, :1], W[:E], b[:E])
            k, v = F.linear(x, W[E:], b[E:]).chunk(2, dim=-1)
            x = x[:, :1]
        else:
            q, k, v = F.linear(x, W, b).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, -1, heads, E // heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, -1, E)
        x = self.norm1(x + self.self_attn.out_proj(a))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


# ---------------------------------------------------------------------------- tokenisation
def bin_values(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Bin one cell's non-zero values into 1..50 (reference ``binning`` with tie-breaking draws ``u``)."""
    edges = np.quantile(x, np.linspace(0, 1, N_BINS - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    return np.ceil(u * (right - left) + left).astype(np.float32)


class Tokenizer:
    """Turns sparse rows into token ids and binned values, replaying the reference RNG protocol.

    Parameters
    ----------
    gene_ids
        Vocabulary id of every input column, -1 for genes not in the vocabulary.
    cls_id, pad_value, max_length
        From the checkpoint / call.
    seed
        Seeds the tie-breaking and subsampling streams.
    """

    def __init__(self, gene_ids: np.ndarray, cls_id: int, pad_value: float, max_length: int, seed: int) -> None:
        if max_length < 2:
            msg = f"max_length must be >= 2 (it counts <cls>), got {max_length}."
            raise InputError(msg)
        self.in_vocab = np.flatnonzero(gene_ids >= 0)
        self.gene_ids = gene_ids[self.in_vocab]
        self.cls_id, self.pad_value, self.max_length = cls_id, pad_value, max_length
        self.np_rng = np.random.RandomState(seed)
        self.torch_rng = torch.Generator().manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_(generator=self.torch_rng)  # DataLoader base seed

    def __call__(self, X: sp.csr_matrix) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Tokens of every row of ``X`` (columns as the input), ``None`` for cells with no gene."""
        X = sp.csr_matrix(X[:, self.in_vocab], dtype=np.float32)
        X.sort_indices()
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for r in range(X.shape[0]):
            lo, hi = X.indptr[r], X.indptr[r + 1]
            vals, cols = X.data[lo:hi], X.indices[lo:hi]
            nz = vals != 0
            vals, cols = vals[nz], cols[nz]
            n = len(vals)
            if n == 0:
                out.append(None)
                continue
            bins = bin_values(vals, self.np_rng.rand(n))
            ids = self.gene_ids[cols]
            if n + 1 > self.max_length:
                pick = torch.randperm(n, generator=self.torch_rng)[: self.max_length - 1].numpy()
                ids, bins = ids[pick], bins[pick]
            out.append(
                (
                    np.concatenate([[self.cls_id], ids]).astype(np.int64),
                    np.concatenate([[self.pad_value], bins]).astype(np.float32),
                )
            )
        return out


def pad_batch(tokens: list[tuple[np.ndarray, np.ndarray]], pad_id: int, pad_value: float, width: int | None = None):
    """Right-pad token lists to ``width`` (default: the longest); returns ids, values, pad mask."""
    width = width or max(len(t[0]) for t in tokens)
    ids = np.full((len(tokens), width), pad_id, dtype=np.int64)
    vals = np.full((len(tokens), width), pad_value, dtype=np.float32)
    for i, (t_ids, t_vals) in enumerate(tokens):
        ids[i, : len(t_ids)], vals[i, : len(t_vals)] = t_ids, t_vals
    ids_t = torch.from_numpy(ids)
    return ids_t, torch.from_numpy(vals), ids_t == pad_id


# ---------------------------------------------------------------------------- the embedder
class ScGPTEmbedder(Embedder):
    """scGPT cell embeddings (L2-normalised ``<cls>`` output of the last layer).

    Parameters
    ----------
    path
        Official scGPT checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``).
    max_length
        Token cap including ``<cls>`` (reference default 1200).
    batch_size
        Cells per forward pass.
    chunk_size
        Cells read, tokenised and embedded at a time; bounds memory.
    seed
        Seed of tie-breaking and subsampling.
    min_genes_matched
        Smallest number of input genes that must be in the vocabulary.
    device
        ``"cpu"``, ``"cuda"``, or ``None`` for the GPU when present.
    progress
        Show a progress bar with cells/s.

    The model folder stores the checkpoint path and its sha256; loading checks both, so the
    checkpoint must stay where it was (it is not copied: official ones are ~200 MB).
    """

    kind = "scgpt"
    learns_from_reference = False

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = 1200,
        batch_size: int = 64,
        chunk_size: int = 4096,
        seed: int = 0,
        min_genes_matched: int = 20,
        device: str | None = None,
        progress: bool = True,
        expected_sha256: str | None = None,
    ) -> None:
        self.ckpt = load_checkpoint(path)
        if expected_sha256 is not None and expected_sha256 != self.ckpt.sha256:
            msg = f"The scGPT checkpoint in {path} changed since the model was trained (sha256 differs)."
            raise ModelFormatError(msg)
        self.max_length, self.batch_size, self.chunk_size = max_length, batch_size, chunk_size
        self.seed, self.min_genes_matched, self.progress = seed, min_genes_matched, progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = ScGPTEncoder.from_checkpoint(self.ckpt).to(self.device)
        self.gene_key: str | None = None

    @property
    def spec(self) -> str:  # noqa: D102
        return f"scgpt:{self.ckpt.path}"

    @property
    def dim(self) -> int:  # noqa: D102
        return self.ckpt.args.embsize

    def match_genes(self, symbols: np.ndarray) -> np.ndarray:
        """Vocabulary id per gene symbol (exact match), -1 where absent; checks the overlap.

        Human and mouse Ensembl IDs are first translated to symbols (:mod:`spikgpt.genes`).
        """
        if id_kind(symbols) == ENSEMBL:
            translated = to_symbols(symbols)
            logger.info(
                "Gene identifiers: %d of %d Ensembl IDs translated to symbols for the scGPT vocabulary.",
                int((translated != "").sum()),
                len(symbols),
            )
            symbols = np.where(translated != "", translated, symbols)
        ids = np.array([self.ckpt.vocab.get(g, -1) for g in symbols], dtype=np.int64)
        n = int((ids >= 0).sum())
        logger.info("%d of %d genes (%.0f%%) are in the scGPT vocabulary.", n, len(ids), 100 * n / max(len(ids), 1))
        if n < self.min_genes_matched:
            msg = (
                f"Only {n} of {len(ids)} genes are in the scGPT vocabulary (examples: "
                f"{', '.join(map(str, symbols[:3]))}). scGPT needs gene symbols such as 'CD3E': pass "
                "a var column with symbols via gene_key (--gene-key)."
            )
            raise GeneOverlapError(msg)
        return ids

    def fit(self, cells: Cells, *, seed: int = 0, labels: np.ndarray | None = None) -> ScGPTEmbedder:
        """Nothing to fit (a pretrained model); records the gene column used."""
        self.gene_key = cells.gene_key
        return self

    def transform(self, cells: Cells) -> np.ndarray:
        """Embed the cells; raw counts from the chosen source, as the reference does."""
        adata = cells.adata
        X = adata.raw.X if cells.use_raw else (adata.layers[cells.layer] if cells.layer else adata.X)
        return self.embed_matrix(X, gene_names(adata, cells.gene_key, use_raw=cells.use_raw))

    @torch.inference_mode()
    def embed_matrix(self, X, symbols: np.ndarray) -> np.ndarray:
        """Embed the rows of a cells × genes matrix (sparse, dense or backed) with gene ``symbols``."""
        tok = Tokenizer(
            self.match_genes(np.asarray(symbols, dtype=str)),
            self.ckpt.cls_id,
            self.ckpt.args.pad_value,
            self.max_length,
            self.seed,
        )
        n = X.shape[0]
        out = np.full((n, self.dim), np.nan, dtype=np.float32)
        bar = tqdm(total=n, desc="scGPT embedding", unit="cells", disable=None if self.progress else True)
        for start in range(0, n, self.chunk_size):
            chunk = X[start : start + self.chunk_size]
            tokens = tok(sp.csr_matrix(chunk, dtype=np.float32))
            ok = [i for i, t in enumerate(tokens) if t is not None]
            order = sorted(ok, key=lambda i: len(tokens[i][0]))
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                ids, vals, pad = pad_batch([tokens[i] for i in idx], self.ckpt.pad_id, self.ckpt.args.pad_value)
                cls = self.net(ids.to(self.device), vals.to(self.device), pad.to(self.device)).float().cpu()
                out[start + np.asarray(idx)] = F.normalize(cls, dim=1, eps=0.0).numpy()
            bar.update(len(tokens))
        bar.close()
        n_bad = int(np.isnan(out[:, 0]).sum())
        if n_bad:
            logger.warning(
                "%d cells have no expressed gene in the scGPT vocabulary: their embedding is NaN and "
                "annotation calls them Unknown.",
                n_bad,
            )
        return out

    def config(self) -> dict:  # noqa: D102
        return {
            "kind": self.kind,
            "path": str(self.ckpt.path),
            "sha256": self.ckpt.sha256,
            "max_length": self.max_length,
            "seed": self.seed,
            "gene_key": self.gene_key,
        }

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> ScGPTEmbedder:  # noqa: D102
        emb = cls(
            config["path"], max_length=config["max_length"], seed=config["seed"], expected_sha256=config["sha256"]
        )
        emb.gene_key = config.get("gene_key")
        return emb


def cosine_to_mean(x: np.ndarray, draws: np.ndarray) -> float:
    """Cosine similarity of ``x`` to the mean direction of ``draws`` (used to check sampled cells)."""
    m = draws.mean(axis=0)
    return float(x @ m / (np.linalg.norm(x) * np.linalg.norm(m) + 1e-12))
