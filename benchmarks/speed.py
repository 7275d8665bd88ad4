"""Speed benchmark of Doloris: training step, prediction, FLOP rate and peak memory.

For every gene count (``--genes``) and training batch size (``--batch``) this measures, on synthetic
data with the default network sizes (n_hidden 512, 3 blocks; mask model 256, 2 blocks):

* training step time: forward ``DolorisModule.loss`` + backward + ``torch.optim.AdamW`` step on
  batches of real training rows prepared up front (data loading and Lightning are excluded),
  timed one step at a time with ``time.perf_counter``; median and quartiles over ``--steps`` steps
  after ``--warmup`` steps;
* training throughput: batch / median step time (cells/s);
* ``Doloris.train`` end to end, as a user runs it: wall time per step of ``--train-steps`` steps
  (trainer setup, data loading from the AnnData and per-epoch validation included);
* FLOPs of one training step (forward + backward, matrix products only) counted with
  ``torch.utils.flop_counter.FlopCounterMode`` and averaged over the prepared batches; the achieved
  rate is FLOPs / median step time, reported as a fraction of a plain fp32 ``torch.mm`` measured in
  the same process (square ``--mm-size`` and shaped like the denoiser's input layer);
* where the step's time goes: forward + backward and the AdamW update timed apart, the matrix
  products' own time from ``torch.profiler`` (their FLOP rate alone is the ceiling of the step's),
  memory bandwidth (``c = a + b``) and the roofline bound it implies (:func:`roofline_fraction`);
* prediction (once per gene count): ``Doloris.predict_perturbation`` of ``--conditions``
  perturbations x ``--cells`` cells with ``--n-steps`` DDIM steps each way, inversion of the shared
  control cells included; generated cells/s and denoiser evaluations per generated cell, counted
  with a forward hook on ``module.denoiser``;
* peak resident memory (``ru_maxrss``) of each configuration, each run in its own subprocess, and
  ``torch.cuda.max_memory_allocated`` on CUDA.

Results go to ``<out>/speed.json`` and ``<out>/speed.md``.

Examples
--------
Full run (long: tens of minutes on a 2-core CPU)::

    python benchmarks/speed.py --genes 500 2000 5000 --batch 32 256

Smoke test::

    OMP_NUM_THREADS=1 python benchmarks/speed.py --genes 200 --batch 32 --steps 5 --warmup 2 \\
        --conditions 2 --cells 10 --n-steps 5 --train-steps 10 --out /tmp/speed
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Synthetic data: 20 measured perturbed genes (+ 5 unmeasured ones, added by the generator), singles
# for training, doubles held out.
N_PERTURBED = 20
N_DOUBLES = 10
CELLS_PER_CONDITION = 40
N_CONTROL_CELLS = 300
# Distinct training batches prepared up front; the timed steps cycle through them.
MAX_DISTINCT_BATCHES = 8
# The operators whose FLOPs FlopCounterMode counts on this network (matrix products).
PRODUCT_OPERATORS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


# ---------------------------------------------------------------------------------------------- helpers
def _rss_mb() -> float:
    """Peak resident set size of this process so far.

    Returns
    -------
    float
        ``ru_maxrss`` in MB (Linux reports KiB).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on CPU), so that ``perf_counter`` brackets the real work.

    Parameters
    ----------
    device
        ``"cpu"`` or ``"cuda"``.
    """
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _quantiles(times: list[float]) -> dict:
    """Summary statistics of a list of durations in seconds.

    Parameters
    ----------
    times
        Durations in seconds.

    Returns
    -------
    dict
        ``median_ms``, ``q25_ms``, ``q75_ms``, ``iqr_ms``, ``min_ms``, ``mean_ms``, ``n``.
    """
    ms = np.asarray(times, dtype=np.float64) * 1e3
    q25, med, q75 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(med),
        "q25_ms": float(q25),
        "q75_ms": float(q75),
        "iqr_ms": float(q75 - q25),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
    }


def _cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere).

    Returns
    -------
    str
        The model name, or ``"unknown"``.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str:
    """Short commit of the checkout, with ``+dirty`` when tracked files are modified.

    Returns
    -------
    str
        The revision, or ``"unknown"`` outside a git checkout.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _setup_torch(args: argparse.Namespace):
    """Import torch, set its threads and seed, and check the device.

    Parameters
    ----------
    args
        Parsed command line.

    Returns
    -------
    module
        The ``torch`` module.
    """
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available.")
    if args.bf16 and args.device != "cuda":
        raise SystemExit("--bf16 uses CUDA autocast; it needs --device cuda.")
    return torch


def _autocast(torch, bf16: bool):
    """A fresh bf16 CUDA autocast context, or a null context.

    Parameters
    ----------
    torch
        The torch module.
    bf16
        Whether to autocast.

    Returns
    -------
    context manager
        The context.
    """
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _build_model(n_genes: int, args: argparse.Namespace):
    """Synthetic data with ``n_genes`` genes and an untrained Doloris with the default sizes.

    Parameters
    ----------
    n_genes
        Number of measured genes.
    args
        Parsed command line (``seed``, ``cells``).

    Returns
    -------
    tuple
        ``(model, train, adata)``: the model, its registered training AnnData (controls and
        singles) and the full synthetic AnnData (doubles included).
    """
    import scvi

    import scdoloris as sd

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.seed = args.seed
    n_perturbed = min(N_PERTURBED, n_genes)
    adata = sd.datasets.synthetic_perturbations(
        n_genes=n_genes,
        n_perturbed_genes=n_perturbed,
        n_doubles=N_DOUBLES,
        n_cells_per_condition=CELLS_PER_CONDITION,
        n_control_cells=max(N_CONTROL_CELLS, args.cells),
        seed=args.seed,
    )
    keep = (adata.obs["condition_type"] != "double").to_numpy()
    train = adata[keep].copy()
    for column in ("perturbation", "cell_type", "condition_type"):
        train.obs[column] = train.obs[column].cat.remove_unused_categories()
    sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
    model = sd.Doloris(train, gene_graph=adata.uns["synthetic"]["edges"])
    return model, train, adata


def _matmul_rate(torch, m: int, k: int, n: int, device: str, repeats: int = 15, min_chunk_s: float = 0.02) -> dict:
    """Rate of a plain fp32 ``torch.mm`` of ``(m, k) @ (k, n)`` (``n, k`` weight transposed, as in Linear).

    Parameters
    ----------
    torch
        The torch module.
    m, k, n
        Matrix sizes.
    device
        ``"cpu"`` or ``"cuda"``.
    repeats
        Timed chunks; the median chunk gives the rate.
    min_chunk_s
        Each chunk repeats the product until it lasts at least this long (small products).

    Returns
    -------
    dict
        ``shape``, ``flop`` (``2 m k n``), ``median_ms`` per product and ``gflops``.
    """
    a = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device)
    for _ in range(3):
        torch.mm(a, w.t())
    _sync(device)
    start = time.perf_counter()
    torch.mm(a, w.t())
    _sync(device)
    inner = max(1, int(min_chunk_s / max(time.perf_counter() - start, 1e-6)))
    per_call = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, w.t())
        _sync(device)
        per_call.append((time.perf_counter() - start) / inner)
    median = float(np.median(per_call))
    flop = 2.0 * m * k * n
    return {"shape": [m, k, n], "flop": flop, "median_ms": median * 1e3, "gflops": flop / median / 1e9}


def _stream_bandwidth(torch, device: str, n_bytes: int = 256 * 2**20, repeats: int = 11) -> dict:
    """Memory bandwidth of ``c = a + b`` on ``n_bytes`` arrays (two reads and one write per element).

    Parameters
    ----------
    torch
        The torch module.
    device
        ``"cpu"`` or ``"cuda"``.
    n_bytes
        Size of each array; far above the caches.
    repeats
        Timed additions; the median gives the rate.

    Returns
    -------
    dict
        ``bytes`` moved per addition, ``median_ms`` and ``gb_per_s``.
    """
    n = n_bytes // 4
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    torch.add(a, b, out=c)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.add(a, b, out=c)
        _sync(device)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"bytes": 3 * n * 4, "median_ms": median * 1e3, "gb_per_s": 3 * n * 4 / median / 1e9}


def roofline_fraction(flop: float, n_parameters: int, mm_gflops: float, gb_per_s: float) -> float:
    """Upper bound on a training step's FLOP rate, as a fraction of the matmul rate, from memory traffic.

    Every fp32 parameter crosses memory at least 10 times per step when the parameters do not fit in
    the caches: read by the forward pass and by the backward input gradient, its gradient written
    (3), then read by AdamW with the gradient and both moments and written back with both moments
    (7). The optimizer runs after the backward pass, so its time adds; the products can at best
    overlap their own weight traffic.

    Parameters
    ----------
    flop
        Matrix-product FLOPs of one step.
    n_parameters
        Trained parameters.
    mm_gflops
        Rate of the matmul reference.
    gb_per_s
        Measured memory bandwidth.

    Returns
    -------
    float
        ``flop / mm_rate / bound_time``, ``bound_time = 7 B / bw + max(flop / mm_rate, 3 B / bw)``
        with ``B = 4 n_parameters`` bytes.

    Examples
    --------
    A step of 2.5 GFLOP over 13 M parameters, a 190 GFLOP/s matmul and 25 GB/s memory:

    >>> round(roofline_fraction(2.5e9, 13_000_000, 190.0, 25.0), 2)
    0.47
    """
    compute = flop / (mm_gflops * 1e9)
    param_bytes = 4.0 * n_parameters
    bound = 7 * param_bytes / (gb_per_s * 1e9) + max(compute, 3 * param_bytes / (gb_per_s * 1e9))
    return compute / bound


def _product_time(torch, step, batches: list, device: str) -> dict:
    """Own time of the matrix products in a training step, from ``torch.profiler``.

    The products' FLOPs over this time is the rate the step would reach if every other operation
    (elementwise, indexing, GAT message passing, optimizer, Python) took no time: the ceiling of the
    step's FLOP rate with these products, at these shapes, as they run inside the step.

    Parameters
    ----------
    torch
        The torch module.
    step
        One training step of a batch.
    batches
        The prepared batches; each is stepped once, profiled, after one unprofiled pass.
    device
        ``"cpu"`` (operator self CPU time) or ``"cuda"`` (kernel time of the operators).

    Returns
    -------
    dict
        ``product_ms`` and ``profiled_step_ms`` per step (the profiler slows the rest of the step).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for b in batches:
        step(b)
    with profile(activities=activities) as profiler:
        _sync(device)
        start = time.perf_counter()
        for b in batches:
            step(b)
        _sync(device)
        wall = time.perf_counter() - start
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    product_us = sum(getattr(e, attribute) for e in profiler.key_averages() if e.key in PRODUCT_OPERATORS)
    return {"product_ms": product_us / 1e3 / len(batches), "profiled_step_ms": wall * 1e3 / len(batches)}


def _train_end_to_end(model, batch: int, args: argparse.Namespace) -> dict:
    """Wall time of ``Doloris.train`` as a user runs it: Lightning, data loading and validation included.

    Parameters
    ----------
    model
        The benchmark's model (trained further by this call).
    batch
        Training batch size.
    args
        Parsed command line (``train_steps``, ``device``, ``bf16``, ``seed``).

    Returns
    -------
    dict
        ``steps``, ``wall_s`` and ``ms_per_step`` (the trainer's setup spread over the steps).
    """
    kwargs = {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1}
    if args.bf16:
        kwargs["precision"] = "bf16-mixed"
    start = time.perf_counter()
    model.train(max_steps=args.train_steps, batch_size=batch, seed=args.seed, enable_progress_bar=False, **kwargs)
    _sync(args.device)
    wall = time.perf_counter() - start
    return {"steps": args.train_steps, "wall_s": wall, "ms_per_step": wall / args.train_steps * 1e3}


# ---------------------------------------------------------------------------------------------- training
def run_train(args: argparse.Namespace) -> dict:
    """Time the training step of one (genes, batch) configuration in this process.

    Parameters
    ----------
    args
        Parsed command line; ``genes`` and ``batch`` hold one value each.

    Returns
    -------
    dict
        Step times, throughput, FLOPs and rates, matmul reference rates and peak memory.
    """
    torch = _setup_torch(args)
    from torch.utils.flop_counter import FlopCounterMode

    from scdoloris._constants import REGISTRY_KEYS
    from scdoloris.train._training_plan import fused_adamw_supported

    n_genes, batch = args.genes[0], args.batch[0]
    device = args.device
    rss_import = _rss_mb()
    model, train, _ = _build_model(n_genes, args)
    module = model.module.to(device)
    module.train()
    manager = model.adata_manager
    x_all = np.asarray(train.X, dtype=np.float32)
    pert_all = np.asarray(manager.get_from_registry(REGISTRY_KEYS.PERTURBATION_KEY)).reshape(-1).astype(np.int64)
    type_all = np.asarray(manager.get_from_registry(REGISTRY_KEYS.CELL_TYPE_KEY)).reshape(-1).astype(np.int64)
    n_cells = x_all.shape[0]

    # Batches of real rows, on the device before timing: data loading is not measured.
    rng = np.random.default_rng(args.seed)
    n_distinct = min(args.warmup + args.steps, MAX_DISTINCT_BATCHES)
    batches = []
    for _ in range(n_distinct):
        rows = rng.choice(n_cells, size=batch, replace=batch > n_cells)
        batches.append(
            (
                torch.as_tensor(x_all[rows], device=device),
                torch.as_tensor(pert_all[rows], device=device),
                torch.as_tensor(type_all[rows], device=device),
            )
        )
    target_fraction = float(np.mean([(~module.is_control[b[1]]).float().mean().item() for b in batches]))
    del x_all
    # The training plan's optimizer (its learning-rate schedule costs nothing measurable).
    parameters = list(module.parameters())
    fused = fused_adamw_supported(parameters) and not args.unfused_adamw
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-4, fused=fused)

    def step(b):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(torch, args.bf16):
            loss = module.loss(*b)["loss"]
        loss.backward()
        optimizer.step()

    rss_setup = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times = []
    for i in range(args.warmup + args.steps):
        b = batches[i % n_distinct]
        _sync(device)
        start = time.perf_counter()
        step(b)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    stats = _quantiles(times)
    median_s = stats["median_ms"] / 1e3
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    rss_train = _rss_mb()

    # The same steps split: forward + backward alone, then the AdamW update alone (on the last gradients).
    backward_times, optimizer_times = [], []
    for i in range(args.steps):
        b = batches[i % n_distinct]
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        with _autocast(torch, args.bf16):
            loss = module.loss(*b)["loss"]
        loss.backward()
        _sync(device)
        backward_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        optimizer_times.append(time.perf_counter() - start)

    # FLOPs (after timing: the counter slows the step down), averaged over the distinct batches.
    # The split by network comes from the forward pass alone (the counter's attribution of backward
    # products to modules is not reliable); both perturbation encoders count as "PerturbationEncoder".
    flops, forward_flops, by_module = [], [], {}
    for b in batches:
        with FlopCounterMode(display=False) as counter:
            step(b)
        flops.append(counter.get_total_flops())
        optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter, _autocast(torch, args.bf16):
            module.loss(*b)
        forward_flops.append(counter.get_total_flops())
        for name, ops in counter.get_flop_counts().items():
            if name != "Global" and "." not in name:
                by_module[name] = by_module.get(name, 0) + sum(ops.values()) / len(batches)
    flop_step = float(np.mean(flops))
    achieved = flop_step / median_s / 1e9

    rss_peak = _rss_mb()  # before the profiler's buffers and the references (bandwidth arrays: 768 MB)
    products = _product_time(torch, step, batches, device)
    mm_square = _matmul_rate(torch, args.mm_size, args.mm_size, args.mm_size, device)
    mm_shaped = _matmul_rate(torch, batch, n_genes, module.denoiser.n_hidden, device)
    bandwidth = _stream_bandwidth(torch, device)
    n_parameters = sum(p.numel() for p in module.parameters())
    end_to_end = _train_end_to_end(model, batch, args) if args.train_steps > 0 else None
    forward_backward_s = float(np.median(backward_times))
    return {
        "kind": "train",
        "genes": n_genes,
        "batch": batch,
        "device": device,
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "n_parameters": n_parameters,
        "n_training_cells": n_cells,
        "target_fraction": target_fraction,
        "warmup": args.warmup,
        "step": stats,
        "step_times_ms": [t * 1e3 for t in times],
        "train_cells_per_s": batch / median_s,
        "flop_per_step": flop_step,
        "forward_flop_per_step": float(np.mean(forward_flops)),
        "forward_flop_by_module": by_module,
        "achieved_gflops": achieved,
        "mm_square": mm_square,
        "mm_shaped": mm_shaped,
        "fraction_of_mm_square": achieved / mm_square["gflops"],
        "fraction_of_mm_shaped": achieved / mm_shaped["gflops"],
        "forward_backward_ms": forward_backward_s * 1e3,
        "optimizer_ms": float(np.median(optimizer_times)) * 1e3,
        "fraction_of_mm_forward_backward": flop_step / forward_backward_s / 1e9 / mm_square["gflops"],
        "product_ms": products["product_ms"],
        "profiled_step_ms": products["profiled_step_ms"],
        "fraction_of_mm_products_only": flop_step / (products["product_ms"] / 1e3) / 1e9 / mm_square["gflops"],
        "bandwidth": bandwidth,
        "end_to_end": end_to_end,
        "roofline_fraction": roofline_fraction(flop_step, n_parameters, mm_square["gflops"], bandwidth["gb_per_s"]),
        "rss_mb": {"after_import": rss_import, "after_setup": rss_setup, "after_train": rss_train, "peak": rss_peak},
        "cuda_max_allocated_mb": cuda_peak,
    }


# ---------------------------------------------------------------------------------------------- prediction
def _conditions(adata, n: int) -> list[str]:
    """``n`` double perturbations to predict: the held-out doubles, then other pairs of perturbed genes.

    Parameters
    ----------
    adata
        The full synthetic AnnData.
    n
        Number of conditions.

    Returns
    -------
    list of str
        Perturbation labels ``"A+B"``.
    """
    import itertools

    doubles = [str(p) for p in adata.obs["perturbation"].cat.categories if "+" in str(p)]
    genes = sorted(adata.uns["synthetic"]["effects"].index)
    pairs = doubles + [f"{a}+{b}" for a, b in itertools.combinations(genes, 2)]
    chosen = list(dict.fromkeys(pairs))[:n]
    if len(chosen) < n:
        raise SystemExit(f"--conditions {n}: only {len(chosen)} pairs of perturbed genes exist.")
    return chosen


def run_predict(args: argparse.Namespace) -> dict:
    """Time ``predict_perturbation`` for one gene count in this process.

    Parameters
    ----------
    args
        Parsed command line; ``genes`` holds one value.

    Returns
    -------
    dict
        Wall time (inversion, generation, rest), generated cells/s, denoiser evaluations per
        generated cell and peak memory.
    """
    torch = _setup_torch(args)

    n_genes = args.genes[0]
    device = args.device
    import scdoloris  # noqa: F401  (its imports are most of the baseline memory)

    rss_import = _rss_mb()
    model, _, adata = _build_model(n_genes, args)
    module = model.module.to(device)
    # Untrained weights cost the same as trained ones.
    model.is_trained_ = True
    conditions = _conditions(adata, args.conditions)

    counts = {"denoiser_calls": 0, "denoiser_rows": 0, "mask_calls": 0, "mask_rows": 0}

    def counter(prefix):
        def hook(_module, inputs):
            counts[f"{prefix}_calls"] += 1
            counts[f"{prefix}_rows"] += inputs[0].shape[0]

        return hook

    module.denoiser.register_forward_pre_hook(counter("denoiser"))
    module.mask_model.register_forward_pre_hook(counter("mask"))
    seconds = {"inversion_s": 0.0, "generation_s": 0.0}

    def timed(function, key):
        def wrapper(*a, **kw):
            _sync(device)
            start = time.perf_counter()
            out = function(*a, **kw)
            _sync(device)
            seconds[key] += time.perf_counter() - start
            return out

        return wrapper

    # Instance attributes shadow the methods: the split of the wall time into its parts.
    module.encode_latent = timed(module.encode_latent, "inversion_s")
    module.bridge = timed(module.bridge, "generation_s")

    # Warm-up call (lazy initialisation, first-call allocations), not counted.
    with _autocast(torch, args.bf16):
        model.predict_perturbation(conditions[:1], n_cells=2, n_steps=2, seed=args.seed)
    counts.update(dict.fromkeys(counts, 0))
    seconds.update(dict.fromkeys(seconds, 0.0))
    rss_setup = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    _sync(device)
    start = time.perf_counter()
    with _autocast(torch, args.bf16):
        result = model.predict_perturbation(
            conditions,
            n_cells=args.cells,
            n_steps=args.n_steps,
            seed=args.seed,
            batch_size=args.predict_batch,
            anchored_cells=args.anchored_cells,
            model_layers=not args.x_only,
        )
    _sync(device)
    wall = time.perf_counter() - start

    n_generated = result.n_obs
    n_sources = args.cells * len(model.cell_types)
    return {
        "kind": "predict",
        "genes": n_genes,
        "device": device,
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "conditions": len(conditions),
        "cells_per_condition": args.cells,
        "n_control_cells_inverted": n_sources,
        "n_generated": n_generated,
        "n_steps": args.n_steps,
        "predict_batch": args.predict_batch,
        "anchored_cells": args.anchored_cells,
        "model_layers": not args.x_only,
        "wall_s": wall,
        "inversion_s": seconds["inversion_s"],
        "generation_s": seconds["generation_s"],
        "other_s": wall - seconds["inversion_s"] - seconds["generation_s"],
        "generated_cells_per_s": n_generated / wall,
        **counts,
        "denoiser_rows_per_generated_cell": counts["denoiser_rows"] / n_generated,
        "expected_rows_per_generated_cell": args.n_steps * (n_sources + n_generated) / n_generated,
        "mask_rows_per_generated_cell": counts["mask_rows"] / n_generated,
        "rss_mb": {"after_import": rss_import, "after_setup": rss_setup, "peak": _rss_mb()},
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }


# ---------------------------------------------------------------------------------------------- driver
def _child_command(args: argparse.Namespace, kind: str, genes: int, batch: int, result: str) -> list[str]:
    """Command line that re-invokes this script for one configuration.

    Parameters
    ----------
    args
        Parsed command line of the parent.
    kind
        ``"train"`` or ``"predict"``.
    genes, batch
        The configuration.
    result
        JSON file the child writes.

    Returns
    -------
    list of str
        The command.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--single", kind, "--result", result]
    command += ["--genes", str(genes), "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--conditions", str(args.conditions), "--cells", str(args.cells), "--n-steps", str(args.n_steps)]
    command += ["--predict-batch", str(args.predict_batch), "--threads", str(args.threads), "--device", args.device]
    command += ["--anchored-cells", args.anchored_cells]
    command += ["--mm-size", str(args.mm_size), "--seed", str(args.seed), "--train-steps", str(args.train_steps)]
    command += ["--x-only"] if args.x_only else []
    return command + (["--bf16"] if args.bf16 else []) + (["--unfused-adamw"] if args.unfused_adamw else [])


def _run_child(args: argparse.Namespace, kind: str, genes: int, batch: int) -> dict:
    """Run one configuration in a fresh subprocess (its own peak RSS) and read its result.

    Parameters
    ----------
    args
        Parsed command line of the parent.
    kind
        ``"train"`` or ``"predict"``.
    genes, batch
        The configuration.

    Returns
    -------
    dict
        The child's result, or ``{"kind", "genes", "batch", "error"}`` when it failed.
    """
    env = dict(os.environ)
    # Native thread pools (OpenMP, MKL, OpenBLAS) sized like torch's intra-op pool.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        start = time.perf_counter()
        process = subprocess.run(_child_command(args, kind, genes, batch, path), env=env)
        elapsed = time.perf_counter() - start
        if process.returncode != 0 or not os.path.exists(path):
            return {"kind": kind, "genes": genes, "batch": batch, "error": f"exit status {process.returncode}"}
        with open(path) as handle:
            result = json.load(handle)
    result["process_wall_s"] = elapsed
    return result


def _fmt(value, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, ``"-"`` for missing values.

    Parameters
    ----------
    value
        Number or ``None``.
    digits
        Significant digits.

    Returns
    -------
    str
        The formatted number.
    """
    if value is None:
        return "-"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _parts(result: dict) -> str:
    """Forward + backward and optimizer medians, and the former's FLOP rate (older reports: ``-``)."""
    if "forward_backward_ms" not in result:
        return "-"
    return (
        f"{result['forward_backward_ms']:.1f} / {result['optimizer_ms']:.1f} "
        f"({result['fraction_of_mm_forward_backward']:.2f})"
    )


def _products(result: dict) -> str:
    """The products' own time per step, its share of the profiled step and their FLOP rate (older reports: ``-``)."""
    if "product_ms" not in result:
        return "-"
    share = 100 * result["product_ms"] / result["profiled_step_ms"]
    return f"{result['product_ms']:.1f} ({share:.0f}%; {result['fraction_of_mm_products_only']:.2f})"


def _split(result: dict) -> str:
    """Shares of the forward FLOPs of a training step: denoiser, mask model, perturbation encoders (GAT).

    Parameters
    ----------
    result
        A training result.

    Returns
    -------
    str
        E.g. ``"17/4/79"`` (percent).
    """
    parts = result["forward_flop_by_module"]
    total = result["forward_flop_per_step"]
    names = ("Denoiser", "MaskModel", "PerturbationEncoder")
    return "/".join(f"{100 * parts.get(name, 0.0) / total:.0f}" for name in names)


def _peak(result: dict) -> str:
    """Peak RSS of a configuration, with its rise above the imports and the CUDA peak.

    Parameters
    ----------
    result
        A child's result.

    Returns
    -------
    str
        E.g. ``"740 (+118)"`` or ``"2,050 (+1,430; CUDA 812)"``.
    """
    rss = result["rss_mb"]
    text = f"{_fmt(rss['peak'])} (+{_fmt(rss['peak'] - rss['after_import'])}"
    if result.get("cuda_max_allocated_mb") is not None:
        text += f"; CUDA {_fmt(result['cuda_max_allocated_mb'])}"
    return text + ")"


def markdown(report: dict) -> str:
    """The markdown table of a report.

    Parameters
    ----------
    report
        The JSON report written by :func:`main`.

    Returns
    -------
    str
        Header line, table and notes.
    """
    meta, settings = report["meta"], report["settings"]
    lines = [
        "# Doloris speed benchmark",
        "",
        f"{meta['date']}; torch {meta['torch']}; threads {meta['threads']}; CPU {meta['cpu']} "
        f"({meta['logical_cpus']} logical); device {meta['device']}{' (bf16 autocast)' if settings['bf16'] else ''}; "
        f"scdoloris {meta['revision']}; load average at start {meta['load_average']}.",
        "",
        f"Training: {settings['steps']} timed steps after {settings['warmup']} warm-up steps. Prediction: "
        f"{settings['conditions']} conditions x {settings['cells']} cells, {settings['n_steps']} + "
        f"{settings['n_steps']} DDIM steps, network batch {settings['predict_batch']}. Matmul reference: "
        f"fp32 {settings['mm_size']}^3 `torch.mm`.",
        "",
    ]
    if settings["steps"] < 20:
        lines += [f"**Fewer than 20 timed steps ({settings['steps']}): a smoke test, not a measurement.**", ""]
    header = [
        "genes",
        "batch",
        "step ms median [q25, q75]",
        "train cells/s",
        "`Doloris.train` ms/step",
        "GFLOP/step",
        "GFLOP/s",
        "frac. of mm",
        "frac. of shaped mm",
        "fwd+bwd / AdamW ms (fwd+bwd frac. of mm)",
        "products ms (% of step; frac. of mm)",
        "memory GB/s",
        "roofline bound frac.",
        "fwd FLOP % denoiser/mask/GAT",
        "train peak RSS MB (+ above imports)",
        "predict s",
        "predict cells/s",
        "denoiser evals / gen. cell",
        "predict peak RSS MB (+ above imports)",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    predictions = {p["genes"]: p for p in report["predict"]}
    for row in report["train"]:
        p = predictions.get(row["genes"], {})
        if "error" in row:
            cells = [str(row["genes"]), str(row["batch"]), f"failed: {row['error']}"] + ["-"] * (len(header) - 3)
        else:
            s = row["step"]
            cells = [
                str(row["genes"]),
                str(row["batch"]),
                f"{s['median_ms']:.1f} [{s['q25_ms']:.1f}, {s['q75_ms']:.1f}]",
                _fmt(row["train_cells_per_s"]),
                f"{row['end_to_end']['ms_per_step']:.1f}" if row.get("end_to_end") else "-",
                f"{row['flop_per_step'] / 1e9:.3f}",
                _fmt(row["achieved_gflops"]),
                f"{row['fraction_of_mm_square']:.2f}",
                f"{row['fraction_of_mm_shaped']:.2f}",
                _parts(row),
                _products(row),
                _fmt(row["bandwidth"]["gb_per_s"]) if "bandwidth" in row else "-",
                f"{row['roofline_fraction']:.2f}" if "roofline_fraction" in row else "-",
                _split(row),
                _peak(row),
            ]
            if not p or "error" in p:
                cells += [p.get("error", "-") if p else "-", "-", "-", "-"]
            else:
                cells += [
                    _fmt(p["wall_s"]),
                    _fmt(p["generated_cells_per_s"]),
                    f"{p['denoiser_rows_per_generated_cell']:.1f}",
                    _peak(p),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Step: forward `DolorisModule.loss` + backward + AdamW step on batches prepared up front (no data "
        "loading, no Lightning). `Doloris.train` ms/step: wall time of `model.train(max_steps=--train-steps, "
        "batch_size=batch)` per step, as a user runs it (trainer setup, data loading, per-epoch validation "
        "included), after the step measurements. GFLOP/step: matrix products of forward + backward counted by "
        "`FlopCounterMode` (elementwise ops, GAT message passing and the optimizer not counted). "
        "GFLOP/s = GFLOP/step / median step. frac. of mm: that rate / fp32 `torch.mm` rate of the "
        "square reference; shaped mm: (batch x genes) @ (genes x n_hidden), the denoiser's input layer. "
        "fwd+bwd / AdamW: the same steps timed in two parts (medians; the FLOP rate of the first part alone in "
        "brackets). products: own time of the matrix products per step (`torch.profiler`, operator self time), "
        "its share of the profiled step, and the FLOP rate of the products alone as a fraction of mm: the "
        "step's rate if everything else took no time. memory GB/s: `c = a + b` on 256 MB arrays. "
        "roofline bound: the highest FLOP rate the step can "
        "reach at that bandwidth, as a fraction of mm, when every fp32 parameter crosses memory 10 times per "
        "step (forward read, backward read, gradient write; AdamW reads parameter, gradient and two moments and "
        "writes three) and the optimizer cannot overlap the products. "
        "fwd FLOP %: split of the forward pass's matrix-product FLOPs between the denoiser, the mask model and "
        "the two perturbation encoders (GAT over the 2-hop in-neighbourhood of the batch's genes, its last layer "
        "only into those genes, plus the pooling MLP). "
        "Prediction (measured once per gene count, shown on each of its rows): wall time of "
        "`predict_perturbation` including the shared inversion of the control cells; denoiser evals / gen. "
        "cell: rows through the denoiser (counted) / generated cells = n_steps (controls + generated) / "
        "generated. Peak RSS: `ru_maxrss` of the configuration's own process (data, model, optimizer, "
        "Python and torch included).",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The command-line parser.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[500, 2000, 5000], help="gene counts")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256], help="training batch sizes")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (>= 20 for a measurement)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--conditions", type=int, default=30, help="perturbations predicted (0: no prediction)")
    parser.add_argument("--cells", type=int, default=100, help="generated cells per perturbation")
    parser.add_argument("--n-steps", type=int, default=50, help="DDIM steps of the inversion and of the sampling")
    parser.add_argument("--predict-batch", type=int, default=1024, help="cells per network call in prediction")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (and OMP/MKL threads)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument(
        "--unfused-adamw", action="store_true", help="per-tensor AdamW instead of the training plan's fused one"
    )
    parser.add_argument("--mm-size", type=int, default=1024, help="size of the square fp32 matmul reference")
    parser.add_argument(
        "--anchored-cells",
        choices=["sources", "generated", "shifted"],
        default="sources",
        help="how the anchored default makes its cells (predict_perturbation's anchored_cells)",
    )
    parser.add_argument(
        "--x-only",
        action="store_true",
        help="predict_perturbation(..., model_layers=False): X only (no network where every gate is 0)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=200,
        help="steps of an end-to-end Doloris.train (Lightning, data loading, validation included; 0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for speed.json and speed.md")
    parser.add_argument("--single", choices=["train", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark (or, with ``--single``, one configuration of it).

    Parameters
    ----------
    argv
        Command-line arguments; ``sys.argv[1:]`` by default.

    Returns
    -------
    dict or None
        The report (``None`` in a child process).
    """
    args = _parser().parse_args(argv)
    if min(args.steps, *args.genes, *args.batch, args.cells, args.n_steps, args.threads) < 1 or args.warmup < 0:
        raise SystemExit("--steps, --genes, --batch, --cells, --n-steps, --threads must be >= 1, --warmup >= 0.")
    if args.single:
        result = run_train(args) if args.single == "train" else run_predict(args)
        with open(args.result, "w") as handle:
            json.dump(result, handle)
        return None

    import torch

    import scdoloris

    device_name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    report = {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "scdoloris": scdoloris.__version__,
            "revision": _git_revision(),
            "threads": args.threads,
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "device": device_name,
            "load_average": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("single", "result")},
        "train": [],
        "predict": [],
    }
    for genes in args.genes:
        for batch in args.batch:
            print(f"[speed] train: {genes} genes, batch {batch}", file=sys.stderr, flush=True)
            row = _run_child(args, "train", genes, batch)
            report["train"].append(row)
            if "error" not in row:
                print(
                    f"[speed]   step {row['step']['median_ms']:.1f} ms, {row['achieved_gflops']:.1f} GFLOP/s "
                    f"({row['fraction_of_mm_square']:.2f} of mm), peak RSS {row['rss_mb']['peak']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
        if args.conditions > 0:
            print(f"[speed] predict: {genes} genes", file=sys.stderr, flush=True)
            row = _run_child(args, "predict", genes, args.batch[0])
            report["predict"].append(row)
            if "error" not in row:
                print(
                    f"[speed]   {row['wall_s']:.3g} s, {row['generated_cells_per_s']:.0f} cells/s",
                    file=sys.stderr,
                    flush=True,
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "speed.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
