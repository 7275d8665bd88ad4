"""Saving and loading: round trip, nothing lost when a save is refused, interrupted or killed, clear load errors."""

import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import scdoloris as sd

N_STEPS = 5  # DDIM steps in predictions: enough to exercise the code, cheap


def test_save_load_round_trip(trained_model, held_out_doubles, held_out_gene, tmp_path, predict):
    perturbations = [held_out_doubles[0], f"G000+{held_out_gene}"]
    before = predict(trained_model, perturbations)
    path = tmp_path / "m"
    trained_model.save(path)
    loaded = sd.Doloris.load(path, adata=trained_model.adata)
    assert loaded.is_trained_
    assert loaded.cell_types == trained_model.cell_types
    assert loaded.summary_["graph"]["nodes"] == trained_model.summary_["graph"]["nodes"]
    after = predict(loaded, perturbations)
    np.testing.assert_array_equal(before.X, after.X)
    np.testing.assert_array_equal(before.obsm["doloris_latent"], after.obsm["doloris_latent"])
    pd.testing.assert_frame_equal(before.obs, after.obs)


def test_save_refuses_existing_dir(trained_model, tmp_path):
    path = tmp_path / "m"
    trained_model.save(path)
    files = sorted(p.name for p in path.iterdir())
    assert files
    with pytest.raises(ValueError, match="overwrite"):
        trained_model.save(path)
    assert sorted(p.name for p in path.iterdir()) == files  # untouched
    trained_model.save(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging leftovers
    sd.Doloris.load(path, adata=trained_model.adata)


def test_load_with_other_genes_raises(trained_model, tmp_path):
    path = tmp_path / "m"
    trained_model.save(path)
    other = trained_model.adata[:, 1:].copy()
    with pytest.raises(ValueError, match="genes"):
        sd.Doloris.load(path, adata=other)
    renamed = trained_model.adata.copy()
    renamed.var_names = [f"X{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="genes"):
        sd.Doloris.load(path, adata=renamed)


# ----------------------------------------------------------------------------------------- nothing lost
def test_save_refuses_to_replace_a_directory_that_is_not_a_model(trained_model, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a saved model"):
        trained_model.save(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_save_interrupted_midway_keeps_the_old_model(trained_model, tmp_path, monkeypatch):
    path = tmp_path / "model"
    trained_model.save(path)
    before = trained_model.predict_perturbation(["G000"], n_cells=4, n_steps=N_STEPS, seed=0)
    original = (path / "model.pt").read_bytes()

    def half_written_then_crash(obj, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"PK\x03\x04 half a model")
        raise OSError("disk full")

    import scvi.model.base._base_model as base_model

    monkeypatch.setattr(base_model.torch, "save", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        trained_model.save(path, overwrite=True)
    monkeypatch.undo()
    assert (path / "model.pt").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the staging directory is gone
    loaded = sd.Doloris.load(path, adata=trained_model.adata)
    after = loaded.predict_perturbation(["G000"], n_cells=4, n_steps=N_STEPS, seed=0)
    np.testing.assert_array_equal(before.X, after.X)


_KILLED_SAVE = """
import sys, time, torch
import scvi.model.base._base_model as base_model
import scdoloris as sd

model = sd.Doloris.load(sys.argv[1])
real_save = torch.save

def slow_save(obj, file, *args, **kwargs):
    with open(file, "wb") as handle:
        handle.write(b"PK\\x03\\x04 the first bytes")
        handle.flush()
        print("WRITING", flush=True)
        time.sleep(120)  # killed here, mid-write

base_model.torch.save = slow_save
model.save(sys.argv[1], overwrite=True, save_anndata=True)
"""


def test_save_killed_midway_keeps_the_old_model(trained_model, tmp_path):
    """SIGKILL while the model file is half written: the old model is still there and loads."""
    path = tmp_path / "model"
    trained_model.save(path, save_anndata=True)
    original = (path / "model.pt").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    ) as process:
        try:
            lines = iter(process.stdout.readline, b"")  # blocks until the file is half written (or the child dies)
            assert any(line.strip() == b"WRITING" for line in lines), "the save never started writing"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert (path / "model.pt").read_bytes() == original
    sd.Doloris.load(path)


# ------------------------------------------------------------------------------------------------- load
def _saved(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    return path


def _rewrite_attributes(path, change):
    content = torch.load(path / "model.pt", weights_only=False)
    change(content["attr_dict"])
    torch.save(content, path / "model.pt")


def test_load_reports_a_truncated_file(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.pt is corrupted or truncated"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_reports_a_corrupted_file(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    (path / "model.pt").write_bytes(b"\x80\x04 not a model at all")
    with pytest.raises(ValueError, match="model.pt is corrupted or truncated"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_reports_a_missing_model(tmp_path):
    with pytest.raises(ValueError, match="No saved model"):
        sd.Doloris.load(tmp_path / "nowhere")


def test_load_checks_the_class(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    _rewrite_attributes(path, lambda attrs: attrs["registry_"].update(model_name="SCVI"))
    with pytest.raises(ValueError, match="holds a SCVI model, not a Doloris"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_checks_the_version(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    _rewrite_attributes(path, lambda attrs: attrs.update(scdoloris_version_="999.0"))
    with pytest.warns(UserWarning, match="saved by scdoloris 999.0"):
        sd.Doloris.load(path, adata=trained_model.adata)
    _rewrite_attributes(path, lambda attrs: attrs["summary_"].update(field_of_a_future_version=1))
    with pytest.raises(ValueError, match="cannot read"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_refuses_raw_counts(trained_model, tmp_path):
    trained_model.save(tmp_path / "model")
    counts = trained_model.adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 5)
    with pytest.raises(ValueError, match="raw counts"):
        sd.Doloris.load(tmp_path / "model", adata=counts)
