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


# ------------------------------------------------------------------- arguments checked before any work
@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
    adata = scdoloris.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1, seed=0)
    path = tmp_path_factory.mktemp("data") / "tiny.h5ad"
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture
def cli(monkeypatch):
    """``main`` in this process, with the process-wide settings it changes put back afterwards."""
    import signal

    import numpy as np

    handler, printoptions = signal.getsignal(signal.SIGTERM), np.get_printoptions()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield main
    signal.signal(signal.SIGTERM, handler)
    np.set_printoptions(**printoptions)


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if a benchmark starts: argument errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran despite a bad argument")

    monkeypatch.setattr(scdoloris.benchmark, "run_benchmark", refuse)
    monkeypatch.setattr("scdoloris.benchmark._suite.run_suite", refuse)


def test_method_names_of_the_command_are_those_of_default_methods():
    from scdoloris.cli import METHOD_NAMES

    assert list(METHOD_NAMES) == [m.name for m in scdoloris.benchmark.default_methods(doses=True)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--out", "{file}/sub"], "cannot be made: '{file}' is a file, not a folder"),
        (["--out", "{file}"], "is a file, not a folder"),
        (["--perturbation-key", "nosuch"], "--perturbation-key='nosuch' is not a column of adata.obs"),
        (["--cell-type-key", "nosuch"], "--cell-type-key='nosuch' is not a column of adata.obs"),
        (["--control-value", "ctrl"], "--control-value 'ctrl' is not a label of adata.obs['perturbation']"),
        (["--methods", "nosuch"], "argument --methods: invalid choice: 'nosuch'"),
        (["--methods", "nearest_dose"], "No method of methods applies to split 'singles_to_doubles'"),
        (["--methods", "anchor", "--mask-variants", "bernoulli"], "add doloris to --methods"),
        (["--seeds", "0", "0"], "--seeds repeats [0]"),
        (["--seeds", "-1"], "--seeds must be integers from 0"),
        (["--n-cells", "0"], "--n-cells must be a positive integer, got 0"),
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--batch-size", "-2"], "--batch-size must be a positive integer"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1)"),
        (["--split", "unseen_cell_type"], "--split unseen_cell_type needs --cell-type"),
        (["--split", "unseen_cell_type", "--cell-type", "nosuch"], "Cell type 'nosuch' is not in adata.obs"),
        (["--cell-type", "ct0"], "--cell-type is only used by --split unseen_cell_type"),
        (["--split", "unseen_molecules"], "--split unseen_molecules (its dose column)='dose' is not a column"),
        (["--jobs", "2"], "--jobs and --no-summary are for --suite"),
        (["--dataset", "nosuch"], "Unknown dataset 'nosuch'"),
        (["--dataset", "{file}"], "--dataset '{file}'"),  # not an .h5ad
    ],
)
def test_benchmark_arguments_are_checked_before_any_work(cli, no_run, tiny_h5ad, tmp_path, capsys, arguments, message):
    file = tmp_path / "a_file"
    file.write_text("not a folder, not an .h5ad")
    out = tmp_path / "out"
    arguments = [a.format(file=file) for a in arguments]
    base = ["benchmark", "--dataset", tiny_h5ad, "--split", "singles_to_doubles", "--out", str(out)]
    with pytest.raises(SystemExit) as info:
        cli([*base, *arguments])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scdoloris benchmark: error: "), err  # one line
    assert message.format(file=file) in err
    assert "Traceback" not in err and not out.exists()  # nothing written


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--suite", "nosuch"], "unknown --suite name(s) ['nosuch']"),
        (["--suite", "all", "norman_doubles"], "unknown --suite name(s) ['all']"),
        (["--suite", "norman_doubles", "norman_doubles"], "names a split more than once"),
        (["--suite", "norman_doubles", "--dataset", "norman"], "--dataset cannot be used with it"),
        (["--suite", "norman_doubles", "--methods", "nosuch"], "invalid choice: 'nosuch'"),
        (["--suite", "norman_doubles", "--seeds", "1", "1"], "--seeds repeats [1]"),
        (["--suite", "norman_doubles", "--jobs", "0"], "--jobs must be a positive integer"),
        (["--suite", "norman_doubles", "--out", "{file}/suite"], "is a file, not a folder"),
        (["--dataset", "norman"], "needs --dataset and --split (or --suite)"),
    ],
)
def test_suite_arguments_are_checked_before_any_work(cli, no_run, tmp_path, capsys, arguments, message):
    file = tmp_path / "a_file"
    file.write_text("")
    arguments = [a.format(file=file) for a in arguments]
    with pytest.raises(SystemExit) as info:
        cli(["benchmark", "--out", str(tmp_path / "out"), *arguments])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_demo_arguments_are_checked_before_any_work(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scdoloris.cli._demo", lambda args: pytest.fail("the demo ran despite a bad argument"))
    file = tmp_path / "a_file"
    file.write_text("")
    for arguments, message in (
        (["--out", str(file / "demo")], "is a file, not a folder"),
        (["--n-cells", "0"], "--n-cells must be a positive integer"),
        (["--seed", "-3"], "--seed must be integers from 0"),
    ):
        with pytest.raises(SystemExit) as info:
            cli(["demo", *arguments])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("scdoloris demo: error: ") and message in err


def test_benchmark_with_good_arguments_writes_its_tables(cli, tiny_h5ad, tmp_path, capsys):
    out = tmp_path / "new" / "folder"
    code = cli(
        ["benchmark", "--dataset", tiny_h5ad, "--split", "singles_to_doubles", "--out", str(out)]
        + ["--methods", "no_change", "mean_shift", "nearest_dose", "--n-cells", "10"]
    )
    assert code == 0
    scores = __import__("pandas").read_csv(out / "tiny_singles_to_doubles_scores.csv")
    assert set(scores["method"]) == {"no_change", "mean_shift"} and len(scores) > 0
    # A named method that does not apply to the split is said so, not dropped silently.
    assert "Not applicable: nearest_dose (needs conditions with doses)." in capsys.readouterr().out
