"""Gene identifiers: Ensembl IDs and gene symbols, matched offline.

A model trained on symbols annotates a query with Ensembl IDs and the reverse, for human and
mouse, through tables shipped with the package (``spikgpt/gene_tables``, see its README):

- human: GENCODE release 44 (Ensembl 110), 62,754 genes, then the 32,733 ID–symbol pairs of a
  GRCh37-era annotation that GENCODE 44 lacks (older datasets' symbols such as ``H2AFY``, ``IGJ``,
  ``RP11-…``; retired IDs), used only for genes the current pairs do not match;
- mouse: Ensembl BioMart export of January 2024, 56,655 genes with a symbol.

Rules: version suffixes (``ENSG00000141510.18``, ``…_PAR_Y``) are ignored; the species is read from
the Ensembl side's prefix (``ENSG`` human, ``ENSMUSG`` mouse); an Ensembl ID has one symbol; a
symbol held by several IDs (1,487 human symbols such as ``5S_rRNA`` or ``Y_RNA``, 233 mouse) takes
the first of its IDs, in the table's order, that the other side holds. Symbols are compared in
upper case, as everywhere in spikgpt.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ENSEMBL = "Ensembl IDs"
SYMBOLS = "gene symbols"
SPECIES_PREFIX = {"ENSG": "human", "ENSMUSG": "mouse"}
TABLE_SOURCE = {
    "human": "GENCODE v44 / Ensembl 110, then GRCh37-era names",
    "mouse": "Ensembl BioMart, January 2024",
}
_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+.*$")
_PREFIX = re.compile(r"^(ENS[A-Z]*G)\d+")


def id_kind(genes: np.ndarray) -> str:
    """``"Ensembl IDs"`` when most names start with ``ENS``, else ``"gene symbols"``."""
    sample = np.asarray(genes[:1000], dtype=str)
    return ENSEMBL if len(sample) and np.char.startswith(np.char.upper(sample), "ENS").mean() > 0.5 else SYMBOLS


def strip_version(ids: np.ndarray) -> np.ndarray:
    """Ensembl gene IDs without their version suffix; other names unchanged."""
    return np.array([_VERSION.sub(r"\1", str(g)) for g in ids], dtype=object)


def species(ids: np.ndarray) -> str | None:
    """The species of most Ensembl gene IDs in ``ids`` (``"human"``/``"mouse"``), or ``None``."""
    prefixes = pd.Series([m.group(1) if (m := _PREFIX.match(str(g))) else "" for g in ids[:1000]])
    counts = prefixes[prefixes != ""].value_counts()
    return SPECIES_PREFIX.get(str(counts.index[0])) if len(counts) else None


@functools.cache
def table(name: str) -> pd.DataFrame:
    """The shipped ID → symbol table of ``name`` (``"human"`` or ``"mouse"``), symbols upper-cased."""
    with resources.files("spikgpt").joinpath("gene_tables", f"{name}.tsv.gz").open("rb") as fh:
        df = pd.read_csv(fh, sep="\t", compression="gzip", dtype=str)
    df["key"] = df["symbol"].str.upper()
    return df


@dataclass(frozen=True)
class GeneMatch:
    """Where each target gene is in the input: ``index`` (-1 absent); how many came from the table."""

    index: np.ndarray
    n_translated: int = 0
    how: str = ""


def _positions(names: np.ndarray) -> pd.Series:
    """Name → first position."""
    s = pd.Series(np.arange(len(names)), index=pd.Index(names, dtype=object))
    return s[~s.index.duplicated()]


def _lookup(positions: pd.Series, keys: np.ndarray) -> np.ndarray:
    return positions.reindex(pd.Index(keys, dtype=object)).fillna(-1).to_numpy(np.int64)


def to_symbols(ids: np.ndarray) -> np.ndarray:
    """Symbol (original case) per Ensembl ID; ``""`` where the ID is unknown or the species unsupported."""
    ids = strip_version(np.char.upper(np.asarray(ids, dtype=str)))
    sp = species(ids)
    if sp is None:
        return np.full(len(ids), "", dtype=object)
    symbols = table(sp).drop_duplicates("ensembl_id").set_index("ensembl_id")["symbol"]  # current first
    return symbols.reindex(pd.Index(ids, dtype=object)).fillna("").to_numpy(object)


def _translate(targets: np.ndarray, names: np.ndarray, targets_are_ids: bool, tab: pd.DataFrame) -> np.ndarray:
    """Positions in ``names`` of ``targets`` through one set of ID–symbol pairs."""
    if targets_are_ids:
        # ID → its symbol → that symbol's column in the input.
        keys = tab.drop_duplicates("ensembl_id").set_index("ensembl_id")["key"]
        keys = keys.reindex(pd.Index(strip_version(targets), dtype=object)).fillna("")
        return _lookup(_positions(names), keys.to_numpy(object))
    # Symbol → the first of its IDs (table order) that the input holds.
    held = tab.assign(pos=tab["ensembl_id"].map(_positions(strip_version(names)))).dropna(subset=["pos"])
    held = held.drop_duplicates("key")
    return _lookup(pd.Series(held["pos"].to_numpy(np.int64), index=held["key"].to_numpy()), targets)


def match(targets: np.ndarray, names: np.ndarray) -> GeneMatch:
    """Position in ``names`` of each of ``targets`` (both upper case), through the tables if needed.

    Parameters
    ----------
    targets
        The genes wanted, e.g. a model's genes.
    names
        The input's gene names.

    Returns
    -------
    :class:`GeneMatch`; ``index[i] == -1`` where ``targets[i]`` is not in the input.
    """
    t_kind, n_kind = id_kind(targets), id_kind(names)
    if t_kind == ENSEMBL and n_kind == ENSEMBL:
        return GeneMatch(_lookup(_positions(strip_version(names)), strip_version(targets)))
    direct = _lookup(_positions(names), targets)
    if t_kind == n_kind:
        return GeneMatch(direct)
    ids = targets if t_kind == ENSEMBL else names
    sp = species(ids)
    if sp is None:
        return GeneMatch(direct)
    index = direct.copy()
    for release in ("current", "previous"):
        tab = table(sp)
        mapped = _translate(targets, names, t_kind == ENSEMBL, tab[tab["release"] == release])
        index = np.where(index >= 0, index, mapped)
    n = int(((direct < 0) & (index >= 0)).sum())
    how = f"{n} of {len(targets)} {t_kind} matched to the input's {n_kind} with the {sp} table ({TABLE_SOURCE[sp]})"
    return GeneMatch(index, n, how)
