"""Shared fixtures: small synthetic data sets, small trained Doloris models, and the suite's settings.

Trained models are session-scoped so that every test file reuses them; tests must not change them
(predicting, saving and in-place writes into *copies* of their data are fine). The settings and helpers
are fixtures too (``small_model_kwargs``, ``train_kwargs``, ``training_subset``, ...); the module-level
names they return stay importable for code that cannot take fixtures (a test's subprocess).
"""

import os

# Set before torch is imported, and so that Lightning, which raises torch's thread count to one per
# core when this variable is absent, leaves it alone: tests compare in-process runs with subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402

import scdoloris as sd

# The models here are tiny: extra intra-op threads only add contention on a busy 2-core machine
# (measured: 3 ms per training step with 1 thread, up to 100x slower with 2 under load).
torch.set_num_threads(1)
# A deterministic suite: scvi-tools' global seed also fixes the train/validation split.
scvi.settings.seed = 0

SMALL = {"n_hidden": 64, "n_hidden_mask": 64, "n_perturbation": 32}
TINY = {"n_hidden": 16, "n_hidden_mask": 16, "n_perturbation": 8, "n_blocks": 1, "n_blocks_mask": 1}
TRAIN_KWARGS = {"enable_progress_bar": False}
PREDICT_N_STEPS = 10  # DDIM steps in ``predict`` where the number does not matter


def subset_cells(adata, keep):
    """A copy of the cells where ``keep``, categorical ``obs`` columns without their unused levels."""
    out = adata[np.asarray(keep)].copy()
    for column in out.obs.columns:
        if isinstance(out.obs[column].dtype, pd.CategoricalDtype):
            out.obs[column] = out.obs[column].cat.remove_unused_categories()
    return out


def training_subset(adata, exclude=()):
    """Controls and singles of a synthetic data set (doubles held out), minus ``exclude``, registered."""
    keep = (adata.obs["condition_type"] != "double") & ~adata.obs["perturbation"].isin(list(exclude))
    train = adata[keep.to_numpy()].copy()
    for column in ("perturbation", "cell_type", "condition_type"):
        train.obs[column] = train.obs[column].cat.remove_unused_categories()
    sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
    return train


@pytest.fixture(scope="session")
def synthetic_two_types():
    """Small synthetic data with 2 cell types, 2 unmeasured perturbed genes (U000, U001) and 4 doubles."""
    return sd.datasets.synthetic_perturbations(
        n_genes=40,
        n_perturbed_genes=8,
        n_cells_per_condition=40,
        n_control_cells=120,
        n_doubles=4,
        n_cell_types=2,
        seed=1,
    )


@pytest.fixture(scope="session")
def held_out_gene(synthetic_two_types):
    """An unmeasured perturbed gene that the shared model never sees in training (but the prior links)."""
    unmeasured = sorted(g for g in synthetic_two_types.uns["synthetic"]["effects"].index if g.startswith("U"))
    assert len(unmeasured) == 2
    return unmeasured[-1]


@pytest.fixture(scope="session")
def trained_model(synthetic_two_types, held_out_gene):
    """Small Doloris trained briefly on controls + singles (without ``held_out_gene``), ground-truth graph."""
    train = training_subset(synthetic_two_types, exclude=[held_out_gene])
    model = sd.Doloris(train, gene_graph=synthetic_two_types.uns["synthetic"]["edges"], **SMALL)
    model.train(max_steps=100, seed=0, **TRAIN_KWARGS)
    return model


@pytest.fixture(scope="session")
def held_out_doubles(synthetic_two_types):
    obs = synthetic_two_types.obs
    return sorted(obs.loc[obs["condition_type"] == "double", "perturbation"].unique())


# ------------------------------------------------------------------------------- settings and helpers
@pytest.fixture(scope="session")
def small_model_kwargs():
    """Doloris arguments of a small model: quick to train, large enough to learn the synthetic data."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def tiny_model_kwargs():
    """Doloris arguments of the smallest model: for checks that need a model, not a good one."""
    return dict(TINY)


@pytest.fixture(scope="session")
def train_kwargs():
    """Keyword arguments every test's ``train`` call gets (no progress bar)."""
    return dict(TRAIN_KWARGS)


@pytest.fixture(name="training_subset", scope="session")
def _training_subset():
    """The function ``training_subset(adata, exclude=())``: controls and singles, registered."""
    return training_subset


@pytest.fixture(name="subset_cells", scope="session")
def _subset_cells():
    """The function ``subset_cells(adata, keep)``: a copy of some cells, without unused categories."""
    return subset_cells


@pytest.fixture(scope="session")
def make_small_adata():
    """A function making a small synthetic AnnData (10 genes, 2 perturbations, no doubles), not set up."""

    def _small_adata(n_cell_types: int = 1):
        return sd.datasets.synthetic_perturbations(
            n_genes=10,
            n_perturbed_genes=2,
            n_cells_per_condition=5,
            n_control_cells=10,
            n_doubles=0,
            n_cell_types=n_cell_types,
            seed=0,
        )

    return _small_adata


@pytest.fixture(scope="session")
def setup_adata():
    """``Doloris.setup_anndata`` with the synthetic data's keys; keyword arguments override them."""

    def _setup(adata, **kwargs):
        kwargs = {
            "perturbation_key": "perturbation",
            "control_value": "control",
            "cell_type_key": "cell_type",
            **kwargs,
        }
        sd.Doloris.setup_anndata(adata, **kwargs)

    return _setup


@pytest.fixture(scope="session")
def make_tiny_model(make_small_adata, setup_adata, tiny_model_kwargs, train_kwargs):
    """A function setting up ``adata`` (default: ``make_small_adata()``) and training a tiny Doloris 2 steps on it."""

    def _tiny_model(adata=None, **setup):
        adata = make_small_adata() if adata is None else adata
        setup_adata(adata, **setup)
        model = sd.Doloris(adata, gene_graph=None, **tiny_model_kwargs)
        model.train(max_steps=2, seed=0, **train_kwargs)
        return model

    return _tiny_model


@pytest.fixture(scope="session")
def predict():
    """A function ``predict(model, perturbations, **kwargs)``: 12 cells, 10 DDIM steps and seed 0 unless given."""

    def _predict(model, perturbations, **kwargs):
        kwargs = {"n_cells": 12, "n_steps": PREDICT_N_STEPS, "seed": 0, **kwargs}
        return model.predict_perturbation(perturbations, **kwargs)

    return _predict


class TrainingCrash(Exception):
    """What :func:`crash_at_step`'s callback raises: a run dying mid-training."""


@pytest.fixture
def crash_at_step():
    """``crash_at_step(n)``: a Lightning callback raising ``crash_at_step.error`` when training reaches step n."""
    from lightning.pytorch.callbacks import Callback

    class CrashAtStep(Callback):
        error = TrainingCrash

        def __init__(self, step: int):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                raise TrainingCrash()

    return CrashAtStep
