"""Training loop of the classifier.

AdamW, class-balanced loss, early stopping on a stratified validation split, seeded, with a
progress bar.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from spikgpt.model.config import JSONConfig
from spikgpt.model.network import NetworkConfig, SpikingEnsemble, SpikingTransformer

logger = logging.getLogger("spikgpt")

#: Classes with fewer cells than this are never split off for validation or calibration.
MIN_SPLIT_CELLS = 5


@dataclass(frozen=True)
class TrainConfig(JSONConfig):
    """Optimisation settings. The defaults need no tuning from ~100 to ~500,000 cells.

    Attributes
    ----------
    lr
        AdamW learning rate (cosine decay to 0 over the run).
    weight_decay
        AdamW weight decay.
    batch_size
        Cells per step; ``None`` picks ``clip(n / 8, 32, 256)``.
    max_epochs
        Upper bound on epochs.
    max_steps
        Upper bound on optimiser steps (caps the epochs of large references).
    patience
        Epochs without a better validation loss before stopping.
    val_fraction
        Stratified share of the training cells held out for early stopping.
    label_smoothing
        Cross-entropy label smoothing.
    average_epochs
        Validate and keep an exponential moving average of the weights (and BatchNorm
        statistics) over about this many epochs instead of the raw weights; 0 keeps the raw
        weights of the best epoch. 2 was chosen leave-one-dataset-out over {0, 2, 5} (held-out
        macro-F1 0.868 vs 0.859 without; seed s.d. on mESC 3 → 2 0.013 vs 0.050).
    refit_min_steps
        Fewest optimiser steps of the refit on every reference cell (:func:`spikgpt.train`'s
        ``refit``), whatever epoch early stopping chose: on a 100-cell reference that epoch
        comes from ~11 validation cells and can stop a run after ~150 steps. 300 was chosen
        leave-one-dataset-out over {0, 300, 600} (README, "Design decisions").
    input_noise
        Standard deviation of Gaussian noise added to the standardised embedding of every
        training cell at every step (0: none). The embedding is scaled to unit variance per
        component on average, so 0.3 blurs the weakest components while the strongest stand.
    num_threads
        CPU threads (torch and BLAS) of training — the embedder's fit as well as the network's
        (:func:`cpu_settings`). 1 by default: the network is small, so a second
        thread gains little, while with more threads the result depends on the thread count
        (floating-point sums in another order) and training slows down many times over when
        other processes compete for the cores. Raise it for atlas-sized references on a
        dedicated machine.
    members
        Networks of the classifier (a :class:`~spikgpt.model.network.SpikingEnsemble`), each
        trained on its own from seed ``seed + i``; their logits are averaged. 3 was chosen over
        {1, 2, 3, 5} (README, "Design decisions", ensemble): macro-F1 rises with every member on
        every dataset, left out or not (5 is chosen leave-one-dataset-out on accuracy alone);
        3 keeps most of the gain at under twice a single network's training time.
    workers
        Processes that train the ensemble's members side by side, each on ``num_threads``
        threads (members are independent: seeds ``seed + i``). ``None``: as many as there are
        members and free CPU cores (:func:`free_cores`: those this process may use, less the
        1-minute load average of other work) for their threads; 1 trains them one after the
        other in this process. The networks are the same bit for bit whatever the number (a
        worker runs exactly this process's training loop; tested). CPU training only: on a GPU
        the members train one after the other.
    device
        Torch device of the training loop (``"cpu"``, ``"cuda"``, …); ``None`` takes the GPU when
        one is present. The trained network always comes back on the CPU. Results are
        bit-for-bit reproducible on the CPU only.
    """

    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int | None = None
    max_epochs: int = 150
    max_steps: int = 4000
    patience: int = 20
    val_fraction: float = 0.15
    label_smoothing: float = 0.05
    average_epochs: float = 2.0
    refit_min_steps: int = 300
    input_noise: float = 0.0
    num_threads: int = 1
    members: int = 3
    workers: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.input_noise >= 0:  # also refuses NaN
            msg = f"input_noise must be >= 0 (a standard deviation; 0 adds none), got {self.input_noise}."
            raise ValueError(msg)
        if self.members < 1:
            msg = f"members must be >= 1 (networks in the ensemble), got {self.members}."
            raise ValueError(msg)
        if self.workers is not None and self.workers < 1:
            msg = f"workers must be >= 1 (processes training members; None: one per free core), got {self.workers}."
            raise ValueError(msg)


def stratified_split(
    y: np.ndarray, fraction: float, *, min_cells: int, seed: int, minimum: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split cell indices into kept and held-out parts, stratified by class.

    Classes with fewer than ``min_cells`` cells go wholly to the kept part: a rare type is
    learned from every cell it has rather than dropped or split into nothing.

    Parameters
    ----------
    y
        Integer class codes ``[n]``.
    fraction
        Share of the splittable cells to hold out.
    min_cells
        Smallest class that is split.
    seed
        Seed of the split.
    minimum
        Smallest held-out size (raised to the number of splittable classes).

    Returns
    -------
    Sorted ``kept`` and ``held_out`` integer indices.
    """
    idx = np.arange(len(y))
    counts = np.bincount(y)
    splittable = counts[y] >= max(min_cells, 2)
    classes = np.unique(y[splittable])
    if fraction <= 0 or len(classes) < 1:
        return idx, np.array([], dtype=np.int64)
    n_held = max(int(round(fraction * splittable.sum())), minimum, len(classes))
    pool = idx[splittable]
    if len(classes) == 1:
        rng = np.random.default_rng(seed)
        held = rng.choice(pool, min(n_held, len(pool) - 1), replace=False)
    else:
        _, held = train_test_split(pool, test_size=n_held, stratify=y[pool], random_state=seed)
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return idx[~mask], idx[mask]


def stratified_folds(y: np.ndarray, k: int, *, min_cells: int, seed: int) -> np.ndarray:
    """Assign every cell to one of ``k`` folds, stratified by class.

    Classes with fewer than ``min_cells`` cells (or fewer than ``k``) get fold ``-1``: they are
    never held out, so every fold's model learns them (as in :func:`stratified_split`).

    Returns
    -------
    ``[n]`` fold index per cell, ``-1`` for cells of rare classes.
    """
    rng = np.random.default_rng(seed)
    fold = np.full(len(y), -1, dtype=np.int64)
    counts = np.bincount(y)
    offset = 0
    for c in np.flatnonzero(counts >= max(min_cells, k, 2)):
        members = rng.permutation(np.flatnonzero(y == c))
        # Consecutive classes continue the round robin, so fold sizes differ by at most one.
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return fold


def batch_size(n_train: int, cfg: TrainConfig) -> int:
    """Cells per optimiser step for ``n_train`` training cells (``cfg.batch_size`` or ``clip(n / 8, 32, 256)``)."""
    return cfg.batch_size or int(np.clip(n_train // 8, 32, 256))


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, square-root tempered so rare classes are not over-fitted."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    w = w / (w[counts > 0] * counts[counts > 0]).sum() * counts.sum()
    return torch.as_tensor(w, dtype=torch.float32)


@contextmanager
def cpu_settings(num_threads: int) -> Iterator[None]:
    """Run with ``num_threads`` torch and BLAS threads and denormals flushed to zero; restore after.

    Fixed thread counts make training independent of the machine: a BLAS product summed over
    another number of threads differs in the last bits, and training amplifies that (measured:
    pbmc68k at 100 reference cells, macro-F1 0.570 vs 0.609 for one seed with the embedder's
    PCA on 2 BLAS threads vs 1). Flushing denormals matters for speed: membrane potentials
    decay towards 0 geometrically, and arithmetic on denormal floats is many times slower on
    x86 CPUs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, num_threads))
    flushed = torch.set_flush_denormal(True)
    try:
        with threadpool_limits(limits=max(1, num_threads), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def fit_network(
    X: np.ndarray,
    y: np.ndarray,
    net_cfg: NetworkConfig,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SpikingEnsemble, dict]:
    """Train the ``cfg.members`` networks of a :class:`SpikingEnsemble` on standardised embeddings.

    Member ``i`` is trained on its own from seed ``seed + i`` (split, initialisation, batch
    order), so member 0 is the network a one-member ensemble trains.

    Parameters
    ----------
    X
        float32 ``[n, in_dim]``.
    y
        Integer class codes ``[n]``.
    net_cfg, cfg
        Architecture and optimisation settings.
    seed
        Seeds the split, initialisation and batch order.
    progress
        Show a progress bar.

    Returns
    -------
    The trained ensemble (eval mode, each member at its best validation epoch) and member 0's
    history dict, with ``"members"`` and every member's best epoch (``"member_best_epochs"``).
    """
    workers = member_workers(cfg)
    with cpu_settings(cfg.num_threads):
        fitted = None
        if workers > 1:
            fitted = _fit_in_workers(X, y, net_cfg, cfg, seed=seed, workers=workers, progress=progress)
        if fitted is None:
            fitted = []
            for i in range(cfg.members):
                desc = "training" if cfg.members == 1 else f"training {i + 1}/{cfg.members}"
                fitted.append(_fit(X, y, net_cfg, cfg, seed=seed + i, progress=progress, desc=desc))
    nets, histories = [f[0] for f in fitted], [f[1] for f in fitted]
    history = histories[0]
    history.update(members=cfg.members, member_best_epochs=[h["best_epoch"] for h in histories])
    return SpikingEnsemble(net_cfg, nets).eval(), history


def training_device(cfg: TrainConfig) -> torch.device:
    """The device :func:`fit_network` trains on."""
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def member_workers(cfg: TrainConfig) -> int:
    """How many processes train the members of ``cfg`` side by side (see ``TrainConfig.workers``)."""
    if cfg.members < 2 or training_device(cfg).type != "cpu":
        return 1
    if cfg.workers is not None:
        return min(cfg.workers, cfg.members)
    return max(1, min(cfg.members, free_cores() // max(1, cfg.num_threads)))


def free_cores() -> int:
    """CPU cores this process may use (``os.sched_getaffinity``) less those busy with other work.

    Busy = the 1-minute load average, this process's own core counted free (it waits while the
    workers train): two trainings side by side on two cores (tests run by pytest-xdist, or a
    user's parallel jobs) then train their members one after the other instead of starting
    processes that would only compete for the same cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return cores
    return max(1, min(cores, math.floor(cores - busy + 1)))


def _fit_in_workers(
    X: np.ndarray, y: np.ndarray, net_cfg: NetworkConfig, cfg: TrainConfig, *, seed: int, workers: int, progress: bool
) -> list[tuple[SpikingTransformer, dict]] | None:
    """Train the members in ``workers`` fresh Python processes (``python -m spikgpt.model.worker``).

    Worker ``j`` trains members ``j, j + workers, …`` one after the other (one interpreter start
    each: importing spikgpt takes seconds). A fresh interpreter, not a fork or a spawn of this
    one: forking a process whose OpenMP pool has run can hang, and a spawn re-imports the
    user's ``__main__`` script. ``None`` when no process could be started (an embedded Python
    without an executable, a sandbox): the caller then trains here.
    """
    if not sys.executable:
        return None
    with tempfile.TemporaryDirectory(prefix="spikgpt-members-") as tmp:
        job = Path(tmp)
        np.save(job / "X.npy", np.ascontiguousarray(X))
        np.save(job / "y.npy", np.ascontiguousarray(y))
        (job / "job.json").write_text(json.dumps({"network": net_cfg.to_dict(), "train": cfg.to_dict(), "seed": seed}))
        # the workers import this very spikgpt, also when it was put on sys.path at run time
        here = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        procs = []
        for j in range(workers):
            cmd = [sys.executable, "-m", "spikgpt.model.worker", str(job), *map(str, range(j, cfg.members, workers))]
            try:
                with (job / f"worker{j}.log").open("w") as log:  # a file, not a pipe: a full one blocks the worker
                    procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env))
            except OSError as err:
                for p in procs:
                    p.kill()
                    p.wait()
                logger.warning("Could not start worker processes (%s): training the networks one by one.", err)
                return None
        desc = f"training {cfg.members} networks, {workers} at a time"
        bar = tqdm(total=cfg.members, desc=desc, unit="network", disable=None if progress else True, leave=False)
        try:
            while any(p.poll() is None for p in procs):
                time.sleep(0.2)
                bar.update(len(list(job.glob("member*.json"))) - bar.n)
        finally:
            bar.close()
            for p in procs:  # on an interrupt or error here, no worker outlives the call
                if p.poll() is None:
                    p.kill()
                p.wait()
        failed = [(job / f"worker{j}.log").read_text()[-3000:] for j, p in enumerate(procs) if p.returncode != 0]
        if failed:
            msg = (
                "Training the ensemble in worker processes failed (TrainConfig(workers=1), `--workers 1`, "
                f"trains in this process instead); the worker's error:\n{failed[0]}"
            )
            raise RuntimeError(msg)
        fitted = []
        for i in range(cfg.members):
            net = SpikingTransformer(net_cfg)
            net.load_state_dict(load_file(job / f"member{i}.safetensors"), strict=True)
            fitted.append((net.eval(), json.loads((job / f"member{i}.json").read_text())))
        logger.info(
            "Trained %d networks in %d worker processes (epochs %s).",
            cfg.members,
            workers,
            ", ".join(str(h["epochs_run"]) for _, h in fitted),
        )
        return fitted


def fit_members(job: Path, members: list[int]) -> None:
    """Train ``members`` of the job :func:`_fit_in_workers` wrote to ``job``; write their weights and history there."""
    spec = json.loads((job / "job.json").read_text())
    net_cfg, cfg = NetworkConfig.from_dict(spec["network"]), TrainConfig.from_dict(spec["train"])
    X, y = np.load(job / "X.npy"), np.load(job / "y.npy")
    with cpu_settings(cfg.num_threads):
        for i in members:
            net, history = _fit(X, y, net_cfg, cfg, seed=spec["seed"] + i, progress=False, desc="")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, job / f"member{i}.safetensors")
            (job / f"member{i}.json").write_text(json.dumps(history))  # written last: the member is done


def one_cycle(opt: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule: 10 % of ``total_steps`` warming up to ``lr``, then annealing."""
    pct_start = 0.1
    # torch divides by zero where the warm-up ends exactly at step 1 (10 steps in all): end it halfway into step 2
    if math.isclose(pct_start * total_steps, 1.0):
        pct_start = 1.5 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=pct_start)


def _fit(
    X: np.ndarray, y: np.ndarray, net_cfg: NetworkConfig, cfg: TrainConfig, *, seed: int, progress: bool, desc: str
) -> tuple[SpikingTransformer, dict]:
    """One network of :func:`fit_network`."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tr, va = stratified_split(y, cfg.val_fraction, min_cells=MIN_SPLIT_CELLS, seed=seed)
    device = training_device(cfg)
    Xt, yt = torch.as_tensor(X[tr]).to(device), torch.as_tensor(y[tr], dtype=torch.long).to(device)
    Xv, yv = torch.as_tensor(X[va]).to(device), torch.as_tensor(y[va], dtype=torch.long).to(device)
    bs = batch_size(len(tr), cfg)
    steps_per_epoch = math.ceil(len(tr) / bs)
    epochs = max(1, min(cfg.max_epochs, cfg.max_steps // steps_per_epoch))

    net = SpikingTransformer(net_cfg).to(device)
    ema = None
    if cfg.average_epochs > 0:
        decay = 1.0 - 1.0 / max(cfg.average_epochs * steps_per_epoch, 1.0)
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    scored = ema.module if ema is not None else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = one_cycle(opt, cfg.lr, epochs * steps_per_epoch)
    weights = class_weights(y[tr], net_cfg.n_classes)
    weights = weights.to(device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    val_loss_fn = torch.nn.CrossEntropyLoss(weight=weights)

    best, best_loss, stale = None, math.inf, 0
    history: dict = {"train_loss": [], "val_loss": [], "val_acc": []}
    bar = tqdm(range(epochs), desc=desc, disable=None if progress else True, leave=False)
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(tr), generator=gen)
        total = 0.0
        for start in range(0, len(tr), bs):
            b = perm[start : start + bs].to(device)
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            xb = Xt[b]
            if cfg.input_noise > 0:  # drawn on the CPU generator: same noise on every device
                xb = xb + cfg.input_noise * torch.randn(xb.shape, generator=gen).to(device)
            loss = loss_fn(net(xb).mean(0), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            total += loss.item() * len(b)
        history["train_loss"].append(total / len(tr))
        if len(va) == 0:  # no validation cells: the whole schedule, its final weights
            bar.set_postfix(train_loss=f"{history['train_loss'][-1]:.3f}")
            best, history["best_epoch"] = scored.state_dict(), epoch
            continue
        scored.eval()
        with torch.inference_mode():
            logits = torch.cat([scored(Xv[s : s + 4096]).mean(0) for s in range(0, len(va), 4096)])
            vloss = val_loss_fn(logits, yv).item()
            vacc = (logits.argmax(1) == yv).float().mean().item()
        history["val_loss"].append(vloss)
        history["val_acc"].append(vacc)
        bar.set_postfix(val_loss=f"{vloss:.3f}", val_acc=f"{vacc:.3f}")
        if vloss < best_loss - 1e-4:
            best, best_loss, stale = copy.deepcopy(scored.state_dict()), vloss, 0
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    net.load_state_dict(best)
    net = net.cpu().eval()
    history.update(epochs_run=epoch + 1, batch_size=bs, n_train=len(tr), n_val=len(va))
    if len(va):
        logger.info(
            "Trained %d epochs (best %d): val loss %.3f, val accuracy %.3f.",
            epoch + 1,
            history["best_epoch"] + 1,
            best_loss,
            history["val_acc"][history["best_epoch"]],
        )
    else:
        logger.info("Trained %d epochs without validation cells.", epoch + 1)
    return net, history
