# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inside the model: the mask, diversity, and the number of steps
#
# Three looks under the hood, on the Norman 2019 doubles held out as in the first tutorial:
#
# 1. **Is the mask model calibrated?** Its predicted probability that a gene is active, against the
#    fraction of real cells in which the gene is nonzero (paper Fig. 5).
# 2. **What does the mask do to the cells?** Zeros and per-gene variance with and without it
#    (paper Fig. 2).
# 3. **How many DDIM steps are needed?** Quality against the number of function evaluations
#    (paper Fig. 7).

# %% [markdown]
# > **Stored outputs** come from a run at real settings (`python tutorials/execute.py`; the commit, date
# > and run time are in the notebook's metadata). The test suite runs this notebook with
# > `SCDOLORIS_TUTORIAL_FAST=1`: a tiny model trained for a few hundred steps, a check that the code
# > runs, not results. Measured figures across seeds are in [BENCHMARKS.md](../BENCHMARKS.md).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scvi

import scdoloris as sd

# SCDOLORIS_TUTORIAL_FAST=1 (what the test suite sets) runs a tiny version of this notebook in about a
# minute; leave it unset for the real thing.
FAST = os.environ.get("SCDOLORIS_TUTORIAL_FAST") == "1"
scvi.settings.seed = 0

# %%
MODEL_KWARGS = {"n_hidden": 128, "n_hidden_mask": 64, "n_perturbation": 32} if FAST else {}
TRAIN_KWARGS = {"max_steps": 150, "batch_size": 128} if FAST else {"max_steps": 4000}
N_CELLS = 50 if FAST else 100  # the 100 training controls, each once (more would repeat cells)

adata = sd.datasets.norman2019_subset(k562_only=True)
split = sd.benchmark.singles_to_doubles(adata)
train = split.train_data(adata)
doubles = list(split.test["perturbation"])
control = split.controls(adata)
real = adata[adata.obs["perturbation"].isin(doubles)]

sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control")
model = sd.Doloris(train, **MODEL_KWARGS)
model.train(**TRAIN_KWARGS, enable_progress_bar=not FAST)
pred = model.predict_perturbation(doubles, n_cells=N_CELLS, seed=0)

# %% [markdown]
# ## 1. Mask calibration
#
# Each point is one gene in one held-out double: the mean of `obsm["doloris_activation_prob"]` over
# the predicted cells (x) and the fraction of real cells expressing it (y). On the identity line the
# mask is calibrated.

# %%
sd.pl.mask_calibration(pred, real)


# %% [markdown]
# A fair reference: the fraction of **control** cells expressing each gene, used as a guess for every
# double. A mask model that knows something about the perturbations must beat it.


# %%
def dense(m):
    """A dense array of a (possibly sparse) matrix."""
    return np.asarray(m.todense() if hasattr(m, "todense") else m)


table = sd.pl.mask_calibration_table(pred, real)
control_fraction = pd.Series((dense(control.X) > 0).mean(0), index=control.var_names)
table["control_fraction"] = control_fraction.reindex(table["gene"]).to_numpy()
pd.Series(
    {
        "mask model": np.corrcoef(table["predicted"], table["empirical"])[0, 1],
        "control fraction": np.corrcoef(table["control_fraction"], table["empirical"])[0, 1],
    },
    name="Pearson r with the real fraction expressing",
).round(3)

# %% [markdown]
# If the two correlations are close, as after a short training, the mask model has learned little
# beyond how often each gene is expressed in control cells; the difference shows on genes whose
# expression the perturbation switches on or off.

# %% [markdown]
# ## 2. The mask and the diversity of predicted cells
#
# `layers["doloris_continuous"]` is the bridge output before the mask; `X` is after it. Per gene:
# the fraction of zeros and the variance, predicted vs real, pooled over the held-out doubles.

# %%
real_x = dense(real.X)
versions = {"with mask (X)": dense(pred.X), "without mask (continuous)": dense(pred.layers["doloris_continuous"])}
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for name, x in versions.items():
    axes[0].scatter((real_x == 0).mean(0), (x == 0).mean(0), s=6, alpha=0.6, label=name)
    axes[1].scatter(real_x.var(0), x.var(0), s=6, alpha=0.6, label=name)
for ax, what in zip(axes, ["fraction of zeros", "variance"], strict=True):
    top = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([0, top], [0, top], "k--", linewidth=0.8)
    ax.set_xlabel(f"{what}, real cells")
    ax.set_ylabel(f"{what}, predicted cells")
    ax.legend(fontsize=7)
plt.show()

pd.DataFrame(
    {
        name: {
            "mean |zeros - real zeros|": np.abs((x == 0).mean(0) - (real_x == 0).mean(0)).mean(),
            "mean variance / real variance": x.var(0).sum() / real_x.var(0).sum(),
        }
        for name, x in versions.items()
    }
).round(3)

# %% [markdown]
# Without the mask, the diffusion output is almost never exactly zero: sparse genes get a cloud of
# small positive values instead of the real spike at zero. The mask restores the zeros.

# %% [markdown]
# ## 3. Number of DDIM steps vs quality
#
# `n_steps` sets the DDIM steps of both the inversion and the generation: fewer steps, faster
# predictions. E-distance to the real cells (lower is better), averaged over a few held-out doubles,
# and the time per call:

# %%
import time

steps = [2, 5, 10, 20] if FAST else [2, 5, 10, 20, 50, 100]
few = doubles[:3] if FAST else doubles
rows = []
for n_steps in steps:
    start = time.perf_counter()
    p = model.predict_perturbation(few, n_cells=N_CELLS, n_steps=n_steps, seed=0)
    seconds = time.perf_counter() - start
    distance = np.mean(
        [sd.metrics.e_distance(p[p.obs["perturbation"] == d].X, real[real.obs["perturbation"] == d].X) for d in few]
    )
    rows.append({"n_steps": n_steps, "e_distance": distance, "seconds": seconds})
nfe = pd.DataFrame(rows)

fig, ax = plt.subplots(figsize=(4.5, 3.2))
ax.plot(nfe["n_steps"], nfe["e_distance"], "o-")
ax.set_xscale("log")
ax.set_xlabel("DDIM steps (n_steps)")
ax.set_ylabel("E-distance to real cells")
plt.show()
nfe.round(3)

# %% [markdown]
# What to expect from a fully trained model is in [BENCHMARKS.md](../BENCHMARKS.md); the curve of a
# fast-mode run mostly reflects an undertrained model.
