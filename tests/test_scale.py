"""Scale: sparse and backed (on-disk) AnnData without densifying, and DDP training in two CPU processes."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scdoloris as sd
import scdoloris.data._statistics as statistics_module
from scdoloris.data import summarize_training_data

SUMMARY_ARRAYS = [
    "control_mean",
    "control_std",
    "cell_type_expressed_mean",
    "cell_type_expressed_std",
    "node_features",
    "condition_frequencies",
    "condition_expressed_mean",
    "condition_expressed_std",
    "reference_masks",
    "reference_condition",
    "condition_perturbation",
    "condition_cell_type",
]


def _write(adata, path, storage: str):
    """Write ``adata`` with X stored dense or CSR, and open it backed (read-only, X stays on disk)."""
    adata = adata.copy()
    adata.X = sparse.csr_matrix(adata.X) if storage == "sparse" else np.asarray(adata.X)
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


def _summarize(adata, X):
    obs = adata.obs
    labels = list(obs["perturbation"].cat.categories)
    types = list(obs["cell_type"].cat.categories)
    return summarize_training_data(
        X,
        obs["perturbation"].cat.codes.to_numpy().astype(np.int64),
        obs["cell_type"].cat.codes.to_numpy().astype(np.int64),
        labels,
        types,
        ["control"],
        list(adata.var_names),
        gene_graph=None,
        reference_cells_per_condition=20,
    )


@pytest.fixture
def small_blocks(monkeypatch):
    """Read 64 rows at a time, so that the small data set spans many blocks."""
    monkeypatch.setattr(statistics_module, "BLOCK_VALUES", 1)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_backed_summary_equals_in_memory(synthetic_two_types, tmp_path, small_blocks, storage):
    adata = synthetic_two_types
    assert statistics_module.block_rows(adata.n_vars) < adata.n_obs / 5
    backed = _write(adata, tmp_path / "cells.h5ad", storage)
    assert backed.isbacked and not sd.data.is_in_memory(backed.X)
    dense = np.asarray(adata.X, dtype=np.float64)
    in_memory = _summarize(adata, dense)
    on_disk = _summarize(adata, backed.X)
    in_memory_sparse = _summarize(adata, sparse.csr_matrix(dense))
    assert on_disk.x_max == pytest.approx(in_memory.x_max, rel=1e-6)
    for name in SUMMARY_ARRAYS:
        for other in (on_disk, in_memory_sparse):
            np.testing.assert_allclose(
                getattr(other, name), getattr(in_memory, name), rtol=1e-5, atol=1e-6, err_msg=name
            )

    # The accumulators against a direct computation on the dense matrix.
    x_max = dense.max()
    perturbation, cell_type = adata.obs["perturbation"].to_numpy(), adata.obs["cell_type"].to_numpy()
    labels, types = list(adata.obs["perturbation"].cat.categories), list(adata.obs["cell_type"].cat.categories)
    for g, (p, c) in enumerate(zip(on_disk.condition_perturbation, on_disk.condition_cell_type, strict=True)):
        cells = (cell_type == types[c]) & (perturbation == labels[p])
        np.testing.assert_allclose(on_disk.condition_frequencies[g], (dense[cells] != 0).mean(axis=0), atol=1e-6)
    for c, name in enumerate(types):
        controls = dense[(cell_type == name) & (perturbation == "control")]
        np.testing.assert_allclose(on_disk.control_mean[c], controls.mean(axis=0) / x_max, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(on_disk.control_std[c], controls.std(axis=0) / x_max, rtol=1e-4, atol=1e-6)


def test_summary_rejects_negative_values_on_disk(synthetic_two_types, tmp_path):
    # setup_anndata samples rows of a backed matrix; the summary's full pass catches the rest.
    adata = synthetic_two_types.copy()
    X = np.asarray(adata.X).copy()
    X[-1, 0] = -1.0
    adata.X = X
    backed = _write(adata, tmp_path / "cells.h5ad", "dense")
    with pytest.raises(ValueError, match="negative"):
        _summarize(adata, backed.X)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_backed_training_and_prediction(synthetic_two_types, tmp_path, storage, small_model_kwargs, train_kwargs):
    backed = _write(synthetic_two_types, tmp_path / "cells.h5ad", storage)
    sd.Doloris.setup_anndata(
        backed, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type"
    )
    model = sd.Doloris(backed, gene_graph=None, **small_model_kwargs)
    model.train(max_steps=5, batch_size=32, seed=0, **train_kwargs)
    # Rows repeated and out of order: h5py alone refuses these.
    rows = np.array([5, 3, 3, 0, backed.n_obs - 1, 5])
    np.testing.assert_array_equal(
        model._expression_rows(backed, rows).numpy(), np.asarray(synthetic_two_types.X[rows], dtype=np.float32)
    )
    n_controls = int((backed.obs["perturbation"] == "control").sum())
    # More cells than controls: drawn with replacement, so the backed rows repeat.
    prediction = model.predict_perturbation(["G000", "G001"], n_cells=n_controls, n_steps=3, seed=0)
    assert prediction.n_obs == 2 * n_controls * len(model.cell_types)
    assert np.isfinite(prediction.X).all()

    # Counterfactuals of given control cells read from disk equal those of the same cells in memory.
    controls = synthetic_two_types[synthetic_two_types.obs["perturbation"] == "control"].copy()
    on_disk = _write(controls, tmp_path / "controls.h5ad", storage)
    from_disk = model.predict_perturbation("G000", adata=on_disk, n_steps=3, seed=1)
    from_memory = model.predict_perturbation("G000", adata=controls, n_steps=3, seed=1)
    np.testing.assert_allclose(from_disk.X, from_memory.X, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- mixed precision
def test_bf16_mixed_training_matches_fp32(synthetic_two_types, small_model_kwargs, train_kwargs, training_subset):
    """``train(precision="bf16-mixed")`` reaches Lightning: the products run in bf16, the weights stay fp32,
    and the losses follow the fp32 run's (CPU autocast; the CUDA path is the same Lightning plugin)."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        train = training_subset(synthetic_two_types)
        # The paper preset: one run without the calibration's fp32 predictions in the middle.
        model = sd.Doloris(
            train, gene_graph=synthetic_two_types.uns["synthetic"]["edges"], preset="paper", **small_model_kwargs
        )
        dtypes = set()
        record = lambda module, inputs, output, seen=dtypes: seen.add(output.dtype)  # noqa: E731
        model.module.denoiser.input.register_forward_hook(record)
        model.train(max_steps=40, seed=0, precision=precision, **train_kwargs)
        assert {p.dtype for p in model.module.parameters()} == {torch.float32}
        runs[precision] = (dtypes, model.history)
    assert runs["32-true"][0] == {torch.float32}
    assert runs["bf16-mixed"][0] == {torch.bfloat16}
    for key in ("train_diffusion_loss", "train_mask_loss", "validation_loss"):
        fp32, bf16 = (float(runs[p][1][key].iloc[-1, 0]) for p in ("32-true", "bf16-mixed"))
        assert np.isfinite(bf16) and abs(bf16 - fp32) < 0.02 * fp32, (key, fp32, bf16)


# ---------------------------------------------------------------- 10^5 cells on disk
MEMORY_SCRIPT = """
import json, re, sys
from pathlib import Path
import anndata, torch
import scdoloris as sd


def peak_rss_kib():
    # VmHWM: this process's peak RSS since its exec. (ru_maxrss would not do: Linux carries the forking
    # parent's peak over exec, and the parent here is pytest with torch loaded.)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))


torch.set_num_threads(1)
sd.Doloris, sd.baselines  # the package loads these on first use: import them before the baseline
baseline = peak_rss_kib()  # after the imports
adata = anndata.read_h5ad(sys.argv[1], backed="r")
sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
model = sd.Doloris(adata, gene_graph=None, n_hidden=32, n_hidden_mask=32, n_perturbation=16, n_blocks=1)
model.train(max_steps=5, batch_size=64, accelerator="cpu", enable_progress_bar=False)
prediction = model.predict_perturbation(["P0", "P1"], n_cells=100, n_steps=5)
print(json.dumps({
    "baseline_kib": baseline,
    "peak_kib": peak_rss_kib(),
    "backed": adata.isbacked,
    "n_predicted": prediction.n_obs,
}))
"""


def _write_large(path, n_cells: int, n_genes: int, density: float, seed: int = 0) -> None:
    """Log1p-like CSR data with a control label, 20 perturbations and 2 cell types, built in row blocks."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 10_000):
        n = min(10_000, n_cells - start)
        r, c = np.nonzero(rng.random((n, n_genes), dtype=np.float32) < density)
        values = np.log1p(rng.gamma(2.0, 1.0, len(r))).astype(np.float32)
        blocks.append(sparse.csr_matrix((values, (r, c)), shape=(n, n_genes)))
    labels = np.array(["control"] + [f"P{i}" for i in range(20)])
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(labels[rng.integers(0, 21, n_cells) * (rng.random(n_cells) > 0.2)]),
            "cell_type": pd.Categorical(np.array(["A", "B"])[rng.integers(0, 2, n_cells)]),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    ad.AnnData(sparse.vstack(blocks, format="csr"), obs=obs, var=var).write_h5ad(path)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux's /proc")
def test_backed_1e5_cells_peak_memory(tmp_path):
    n_cells, n_genes = 100_000, 2_000
    dense_bytes = n_cells * n_genes * 4  # float32: 800 MB
    path = tmp_path / "cells.h5ad"
    _write_large(path, n_cells, n_genes, density=0.05)
    assert path.stat().st_size < dense_bytes / 5
    script = tmp_path / "work.py"
    script.write_text(MEMORY_SCRIPT)
    # A fresh process: its peak RSS is that of this work alone, torch's allocations included.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backed"] and report["n_predicted"] == 2 * 2 * 100
    growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
    print(f"peak RSS growth {growth / 1e6:.0f} MB for a {dense_bytes / 1e6:.0f} MB dense matrix")
    assert 0 < growth < 0.5 * dense_bytes  # 0 would mean the measure missed this work


# ---------------------------------------------------------------- two CPU processes (DDP, gloo)
DDP_SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

import scdoloris as sd

torch.set_num_threads(1)
out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
if len(sys.argv) > 4:  # a backed file: every process opens it read-only and reads the rows it needs
    import anndata as ad
    from scdoloris.data import read_rows

    adata = ad.read_h5ad(sys.argv[4], backed="r")
    rows = read_rows(adata.X, np.arange(adata.n_obs), np.float32)
else:
    adata = sd.datasets.synthetic_perturbations(**json.loads(sys.argv[3]))
    rows = np.asarray(adata.X, dtype=np.float32)
sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
# Cells are told apart by their expression row (continuous values: no two alike).
cell_of_row = {row.tobytes(): i for i, row in enumerate(rows)}
assert len(cell_of_row) == adata.n_obs


class SeenCells(Callback):
    def __init__(self):
        self.per_epoch = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cells = [cell_of_row[r.tobytes()] for r in batch["X"].cpu().numpy().astype(np.float32)]
        self.per_epoch.setdefault(str(trainer.current_epoch), []).extend(cells)


def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def state_digest(model):
    return digest(t.detach().cpu().numpy() for t in model.module.state_dict().values())


model = sd.Doloris(adata, gene_graph=None, n_hidden=32, n_hidden_mask=32, n_perturbation=16, n_blocks=1)
summary = model.summary_
summary_digest = digest(np.asarray(summary[k]) for k in sorted(summary) if isinstance(summary[k], np.ndarray))
init_digest = state_digest(model)
seen = SeenCells()
model.train(
    max_steps=max_steps, batch_size=32, accelerator="cpu", devices=2, strategy="ddp", callbacks=[seen],
    enable_progress_bar=False, seed=3,
)
rank = model.trainer.global_rank
(out / f"rank{rank}.json").write_text(json.dumps({
    "backed": bool(model.adata.isbacked),
    "world_size": model.trainer.world_size,
    "steps": model.trainer.global_step,
    "sampler_seed": getattr(model.trainer.train_dataloader.sampler, "seed", None),
    "seen": seen.per_epoch,
    "train_indices": [int(i) for i in model.train_indices],
    "summary": summary_digest,
    "init": init_digest,
    "trained": state_digest(model),
}))
if model.trainer.is_global_zero:
    model.save(str(out / "model"))
"""
DDP_DATA = {
    "n_genes": 30,
    "n_perturbed_genes": 6,
    "n_cells_per_condition": 30,
    "n_control_cells": 100,
    "n_doubles": 0,
    "seed": 2,
}


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["memory", "backed"])
def test_ddp_two_cpu_processes(tmp_path, storage):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    max_steps = 12
    # The launcher of the cluster recipe (docs/multi_device.md), on one machine with 2 CPU processes.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    command += [str(script), str(tmp_path), str(max_steps), json.dumps(DDP_DATA)]
    if storage == "backed":  # one h5ad file on disk, opened read-only by both processes
        _write(sd.datasets.synthetic_perturbations(**DDP_DATA), tmp_path / "cells.h5ad", "sparse").file.close()
        command.append(str(tmp_path / "cells.h5ad"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for record in ranks:
        assert record["backed"] == (storage == "backed")
        assert record["world_size"] == 2
        assert record["steps"] == max_steps  # epochs were counted per process, so max_steps is reached
        assert record["sampler_seed"] == 3  # the shards are shuffled by the run's seed
    # Same data summary, same initial weights, and replicas kept in sync by the gradient all-reduce.
    assert ranks[0]["summary"] == ranks[1]["summary"]
    assert ranks[0]["init"] == ranks[1]["init"]
    assert ranks[0]["trained"] == ranks[1]["trained"] != ranks[0]["init"]
    train_cells = set(ranks[0]["train_indices"])
    assert ranks[1]["train_indices"] == ranks[0]["train_indices"]

    # Each epoch, the two processes saw different cells of the training split: disjoint shards, up
    # to the cells the distributed sampler repeats to even out an odd split.
    padding = -len(train_cells) % 2
    epochs = sorted(set(ranks[0]["seen"]) & set(ranks[1]["seen"]), key=int)
    assert len(epochs) >= 2
    for epoch in epochs:
        first, second = (set(record["seen"][epoch]) for record in ranks)
        assert first and second and (first | second) <= train_cells
        assert len(first & second) <= padding
        if epoch != epochs[-1]:  # complete epochs cover the whole training split
            assert first | second == train_cells
    assert ranks[0]["seen"][epochs[0]] != ranks[0]["seen"][epochs[1]]  # reshuffled per epoch

    # The model saved by rank 0 loads here, holds the trained weights and predicts.
    adata = sd.datasets.synthetic_perturbations(**DDP_DATA)
    model = sd.Doloris.load(str(tmp_path / "model"), adata=adata)
    h = hashlib.sha256()
    for t in model.module.state_dict().values():
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    assert h.hexdigest() == ranks[0]["trained"]
    with torch.random.fork_rng(devices=[]):
        prediction = model.predict_perturbation(["G000", "G001"], n_cells=20, n_steps=3, seed=0)
    assert prediction.n_obs == 40 and np.isfinite(prediction.X).all()


def test_node_features_of_a_large_matrix_come_from_a_randomized_svd(monkeypatch):
    """Above EXACT_PCA_MAX the PCA is randomized: the same leading components (up to sign), seeded."""
    from scdoloris.data import _summary

    rng = np.random.default_rng(0)
    # Genes x conditions with a clear leading structure (rank 40 plus noise), as pseudobulk means are.
    pseudobulk = rng.normal(size=(300, 40)) @ (rng.normal(size=(40, 120)) * np.linspace(3, 0.1, 40)[:, None])
    pseudobulk += 0.01 * rng.normal(size=pseudobulk.shape)
    exact = _summary._pca_node_features(pseudobulk)
    monkeypatch.setattr(_summary, "EXACT_PCA_MAX", 100)
    randomized = _summary._pca_node_features(pseudobulk)
    assert randomized.shape == exact.shape == (300, _summary.N_NODE_FEATURES)
    signs = np.sign((randomized * exact).sum(axis=0))
    np.testing.assert_allclose(randomized * signs, exact, atol=2e-3)
    np.testing.assert_array_equal(randomized, _summary._pca_node_features(pseudobulk))  # seeded
