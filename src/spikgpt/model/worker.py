"""A worker process that trains members of an ensemble: ``python -m spikgpt.model.worker JOB I [I ...]``.

Started by :func:`spikgpt.model.training.fit_network` when ``TrainConfig.workers`` allows more
than one; ``JOB`` is the folder it wrote the cells and settings to, ``I`` the members to train.
"""

import sys
from pathlib import Path

from spikgpt.model.training import fit_members

if __name__ == "__main__":
    fit_members(Path(sys.argv[1]), [int(i) for i in sys.argv[2:]])
