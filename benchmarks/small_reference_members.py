"""``spikgpt bench --reference-cells 100`` (no peers, no leave-one-type-out, no composition variants) with the
classifier's member count set: the ensemble's effect on plate-sized references.

Usage: ``python benchmarks/small_reference_members.py MEMBERS OUT_DIR``
(``benchmarks/results/small_reference/v016_one_network/``: ``1``).
"""

import sys
from functools import partial
from pathlib import Path

import spikgpt.bench.run as run
from spikgpt.model.training import TrainConfig

if __name__ == "__main__":
    members, out = int(sys.argv[1]), Path(sys.argv[2])
    run.train = partial(run.train, train_config=TrainConfig(members=members))
    run.run_bench(out, tasks=None, seeds=[0, 1, 2], peers=(), loto=False, composition=False, reference_cells=100)
