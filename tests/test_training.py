"""Training: reproducible from its seed, resumed from checkpoints, unharmed by crashes, and what it records."""

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from anndata import AnnData

import scdoloris as sd


# ------------------------------------------------------------------------------------------ reproducible
@pytest.fixture(scope="module")
def tiny_data():
    return sd.datasets.synthetic_perturbations(
        n_genes=20, n_perturbed_genes=4, n_cells_per_condition=20, n_control_cells=60, n_doubles=1, seed=3
    )


@pytest.fixture(scope="module")
def train_tiny(training_subset, small_model_kwargs, train_kwargs):
    """A function training a small Doloris 25 steps on the controls and singles of ``tiny_data``."""

    def _train_tiny(tiny_data, seed):
        train = training_subset(tiny_data)
        model = sd.Doloris(train, gene_graph=tiny_data.uns["synthetic"]["edges"], **small_model_kwargs)
        model.train(max_steps=25, seed=seed, **train_kwargs)
        return model

    return _train_tiny


def _double(tiny_data):
    return str(tiny_data.obs.loc[tiny_data.obs["condition_type"] == "double", "perturbation"].iloc[0])


def test_training_reproducible_with_scvi_seed(tiny_data, monkeypatch, predict, train_tiny):
    """The scvi-tools way: ``scvi.settings.seed`` set before building and training."""
    monkeypatch.setattr(scvi.settings, "seed", 4)  # restored after the test
    predictions = []
    for seed in (4, 4, 5):
        scvi.settings.seed = seed
        predictions.append(predict(train_tiny(tiny_data, seed=None), [_double(tiny_data)], seed=0))
    a, b, c = predictions
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.obsm["doloris_latent"], b.obsm["doloris_latent"])
    assert not np.allclose(a.layers["doloris_continuous"], c.layers["doloris_continuous"])


def test_training_reproducible_with_train_seed(tiny_data, monkeypatch, predict, train_tiny):
    monkeypatch.setattr(scvi.settings, "seed", None)  # the scvi-tools default: only seed= is given
    first = predict(train_tiny(tiny_data, seed=4), [_double(tiny_data)], seed=0)
    second = predict(train_tiny(tiny_data, seed=4), [_double(tiny_data)], seed=0)
    np.testing.assert_array_equal(first.X, second.X)


def test_continued_training_runs_in_train_mode(tiny_data, train_kwargs, predict, train_tiny):
    """A second ``train`` after a prediction (which leaves the module in eval mode) trains with dropout on."""
    model = train_tiny(tiny_data, seed=0)
    predict(model, [_double(tiny_data)])
    assert not model.module.training
    modes = []
    record = lambda module, inputs: modes.append((torch.is_grad_enabled(), module.training))  # noqa: E731
    model.module.denoiser.register_forward_pre_hook(record)
    model.train(max_steps=5, seed=0, **train_kwargs)
    training_calls = [training for grad, training in modes if grad]
    assert len(training_calls) == 5 and all(training_calls)
    assert any(not training for grad, training in modes if not grad)  # validation still in eval mode


def test_training_does_not_depend_on_the_global_random_state(resume_data, train_kwargs, make_fresh_model):
    """Batches and noise come from the seed and the step only: the caller's torch/numpy state is irrelevant."""
    states = []
    for global_seed, seed in [(1, 3), (2, 3), (1, 4)]:
        model = make_fresh_model(resume_data)
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        model.train(max_steps=6, seed=seed, **train_kwargs)
        states.append(_state(model))
    _assert_same_weights(states[0], states[1])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # another seed, other weights


# ---------------------------------------------------------------------------------------- what it records
def test_model_summary_and_init_params(trained_model, small_model_kwargs):
    summary = trained_model._model_summary_string
    assert "40 genes" in summary and "2 cell type" in summary
    params = {**trained_model.init_params_.get("non_kwargs", {}), **trained_model.init_params_.get("kwargs", {})}
    assert (
        params["n_hidden"] == small_model_kwargs["n_hidden"]
        and params["n_perturbation"] == small_model_kwargs["n_perturbation"]
    )
    history = trained_model.history
    assert {"train_loss", "train_diffusion_loss", "train_mask_loss"} <= set(history)
    losses = history["train_diffusion_loss"].to_numpy(dtype=float).ravel()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]  # training makes progress


def test_train_without_validation_set(tiny_data, small_model_kwargs, train_kwargs, training_subset):
    model = sd.Doloris(training_subset(tiny_data), gene_graph=tiny_data.uns["synthetic"]["edges"], **small_model_kwargs)
    model.train(max_steps=3, train_size=1.0, **train_kwargs)
    assert model.is_trained_


def test_training_when_the_validation_share_rounds_to_no_cell(tiny_model_kwargs, train_kwargs):
    """train_size=0.9 of 9 cells keeps all 9 for training: no validation, no error (found by Hypothesis)."""
    rng = np.random.default_rng(0)
    labels = ["control"] * 5 + ["G0"] * 4
    adata = AnnData(
        np.log1p(rng.poisson(2.0, (9, 4))).astype(np.float32),
        obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(9)]),
    )
    sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = sd.Doloris(adata, gene_graph=None, n_timesteps=20, **tiny_model_kwargs)
    model.train(max_steps=2, train_size=0.9, seed=0, **train_kwargs)
    assert model.is_trained_ and "validation_loss" not in model.history_


# ------------------------------------------------------------------------------- checkpoint and resume
@pytest.fixture(scope="module")
def resume_data():
    return sd.datasets.synthetic_perturbations(
        n_genes=20, n_perturbed_genes=4, n_cells_per_condition=20, n_control_cells=60, n_doubles=1, seed=3
    )


@pytest.fixture(scope="module")
def make_fresh_model(training_subset, small_model_kwargs):
    """A function building an untrained small Doloris on the controls and singles of ``data``."""

    def _fresh_model(data):
        return sd.Doloris(training_subset(data), gene_graph=data.uns["synthetic"]["edges"], **small_model_kwargs)

    return _fresh_model


RESUME_STEPS = 30  # 3 training batches per epoch: 10 epochs, validation in between


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(resume_data, train_kwargs, make_fresh_model):
    """Weights after RESUME_STEPS steps without any checkpointing."""
    model = make_fresh_model(resume_data)
    model.train(max_steps=RESUME_STEPS, seed=7, **train_kwargs)
    return _state(model)


@pytest.mark.parametrize(("every", "crash_at"), [(5, 12), (6, 8)], ids=["mid-epoch checkpoint", "epoch-end checkpoint"])
def test_resumed_training_equals_uninterrupted(
    resume_data, uninterrupted, tmp_path, every, crash_at, train_kwargs, make_fresh_model, crash_at_step
):
    crashed = make_fresh_model(resume_data)
    with pytest.raises(crash_at_step.error):
        crashed.train(
            max_steps=RESUME_STEPS,
            seed=7,
            checkpoint_dir=tmp_path,
            checkpoint_every_n_steps=every,
            callbacks=[crash_at_step(crash_at)],
            **train_kwargs,
        )
    assert (tmp_path / "last.ckpt").exists()
    resumed = make_fresh_model(resume_data)
    resumed.train(
        max_steps=RESUME_STEPS, seed=7, checkpoint_dir=tmp_path, checkpoint_every_n_steps=every, **train_kwargs
    )
    assert resumed.trainer.global_step == RESUME_STEPS
    _assert_same_weights(_state(resumed), uninterrupted)


def test_a_failed_training_leaves_the_starting_weights(
    resume_data, uninterrupted, train_kwargs, make_fresh_model, crash_at_step
):
    """A run that dies midway restores the weights it started from; a same-seed retry equals a clean run."""
    model = make_fresh_model(resume_data)
    start = _state(model)
    with pytest.raises(crash_at_step.error):
        model.train(max_steps=RESUME_STEPS, seed=7, callbacks=[crash_at_step(8)], **train_kwargs)
    assert not model.is_trained
    _assert_same_weights(_state(model), start)
    model.train(max_steps=RESUME_STEPS, seed=7, **train_kwargs)
    _assert_same_weights(_state(model), uninterrupted)


_KILLED_TRAINING = """
import sys, time, scvi, torch
from lightning.pytorch.callbacks import Callback
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
scvi.settings.seed = 0
import scdoloris as sd
from conftest import SMALL, training_subset

class Slow(Callback):  # slow enough to be killed between checkpoints
    def on_train_batch_end(self, trainer, *args):
        time.sleep(0.3)

data = sd.datasets.synthetic_perturbations(
    n_genes=20, n_perturbed_genes=4, n_cells_per_condition=20, n_control_cells=60, n_doubles=1, seed=3
)
model = sd.Doloris(training_subset(data), gene_graph=data.uns["synthetic"]["edges"], **SMALL)
model.train(max_steps=int(sys.argv[3]), seed=7, checkpoint_dir=sys.argv[1], checkpoint_every_n_steps=5,
            enable_progress_bar=False, callbacks=[Slow()])
"""


def test_training_killed_then_resumed_equals_uninterrupted(
    resume_data, uninterrupted, tmp_path, train_kwargs, make_fresh_model
):
    """SIGKILL a training process after its first checkpoint; resuming ends with the uninterrupted weights."""
    tests_dir = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", _KILLED_TRAINING, str(tmp_path), tests_dir, str(RESUME_STEPS)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) as process:
        try:
            deadline = time.monotonic() + 300
            while not (tmp_path / "last.ckpt").exists():
                assert process.poll() is None, "training ended before writing a checkpoint"
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.05)
            time.sleep(0.5)  # a step or two past the checkpoint, before the next one
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert 0 < checkpoint["global_step"] < RESUME_STEPS
    resumed = make_fresh_model(resume_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(
            max_steps=RESUME_STEPS, seed=7, checkpoint_dir=tmp_path, checkpoint_every_n_steps=5, **train_kwargs
        )
    _assert_same_weights(_state(resumed), uninterrupted)


def test_truncated_checkpoint_is_reported(resume_data, tmp_path, train_kwargs, make_fresh_model):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    model = make_fresh_model(resume_data)
    with pytest.raises(ValueError, match="last.ckpt is corrupted or truncated"):
        model.train(max_steps=2, checkpoint_dir=tmp_path, **train_kwargs)


@pytest.mark.parametrize("every", [0, -5, 2.5])
def test_bad_checkpoint_interval(resume_data, tmp_path, every, train_kwargs, make_fresh_model):
    model = make_fresh_model(resume_data)
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        model.train(max_steps=2, checkpoint_dir=tmp_path, checkpoint_every_n_steps=every, **train_kwargs)
