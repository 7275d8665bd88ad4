"""The command line and the package import stay light until something heavy is used."""

import subprocess
import sys

import pytest

import scdoloris
from scdoloris.cli import main

HEAVY = ("torch", "scvi", "scanpy", "lightning")


def _imported_after(code: str) -> set[str]:
    """Heavy libraries imported by a fresh interpreter that runs ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.splitlines()[-1].split()) if out.strip() else set()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"scdoloris {scdoloris.__version__}"


def test_help_and_import_load_nothing_heavy():
    assert _imported_after("import scdoloris") == set()
    help_run = "from scdoloris.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _imported_after(help_run) == set()
    # A name is loaded on first use, and the package lists its public names.
    assert "torch" in _imported_after("import scdoloris as sd\nsd.Doloris")
    assert set(scdoloris.__all__) <= set(dir(scdoloris))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        scdoloris.nope  # noqa: B018


def test_training_shows_no_lightning_noise(capfd):
    """No accelerator banners, logger advertisement or warnings about Lightning internals."""
    import logging
    import warnings

    adata = scdoloris.datasets.synthetic_perturbations(
        n_genes=10, n_perturbed_genes=2, n_cells_per_condition=5, n_control_cells=10, n_doubles=0, seed=0
    )
    scdoloris.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = scdoloris.Doloris(adata, gene_graph=None, n_hidden=16, n_hidden_mask=16, n_perturbation=8, n_blocks=1)
    level = logging.getLogger("lightning.pytorch").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_steps=2, enable_progress_bar=False)
    out, err = capfd.readouterr()
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "logging interval", "stepping batches"):
        assert noise not in out + err, noise
    assert not [w for w in caught if "lightning" in str(w.filename)], [str(w.message) for w in caught]
    assert logging.getLogger("lightning.pytorch").level == level  # restored after training


def test_threads_follow_the_environment_and_the_free_cores(monkeypatch):
    from scdoloris.cli import _threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 0.0, 0.0))
    assert _threads() == 1  # a machine busy with other work: one thread
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert 1 <= _threads() <= 4


@pytest.mark.slow
def test_demo_stopped_by_sigterm_exits_143(tmp_path):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "scdoloris.cli", "demo", "--max-steps", "2000", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(40)  # importing, loading the data and training a few steps
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "stopped by signal 15" in err
