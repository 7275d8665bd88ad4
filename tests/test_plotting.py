import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

import scdoloris as sd  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _cells(n, n_genes, label, rng, scale=1.0, p_zero=0.3):
    x = rng.gamma(2.0, scale, size=(n, n_genes)) * (rng.random((n, n_genes)) > p_zero)
    obs = pd.DataFrame({"perturbation": label}, index=[f"{label}_{i}" for i in range(n)])
    return ad.AnnData(x.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.fixture
def cells():
    rng = np.random.default_rng(0)
    control = _cells(60, 12, "control", rng)
    real = ad.concat([_cells(50, 12, "A", rng, 2.0), _cells(50, 12, "B", rng, 0.5)])
    predicted = ad.concat([_cells(40, 12, "A", rng, 1.8), _cells(40, 12, "B", rng, 0.6)])
    predicted.obsm["doloris_activation_prob"] = rng.random(predicted.shape).astype(np.float32)
    return predicted, real, control


def test_prediction_pca_conventions(cells, tmp_path):
    predicted, real, control = cells
    ax = sd.pl.prediction_pca(predicted, real, control=control, show=False)
    assert isinstance(ax, plt.Axes)
    # control + (real, predicted) for each of 2 perturbations
    assert len(ax.collections) == 5
    fig = sd.pl.prediction_pca(predicted, real, return_fig=True)
    assert isinstance(fig, plt.Figure)
    path = tmp_path / "pca.png"
    assert isinstance(sd.pl.prediction_pca(predicted, real, save=str(path)), plt.Axes)  # saved, not shown
    assert path.stat().st_size > 0
    _, given = plt.subplots()
    assert sd.pl.prediction_pca(predicted, real, ax=given, show=False) is given


def test_prediction_pca_panels(cells):
    """Small multiples: one panel per perturbation with the controls, its real and its predicted cells."""
    predicted, real, control = cells
    axes = sd.pl.prediction_pca(predicted, real, control=control, panels=True, title="held out", show=False)
    assert axes.shape == (1, 2)
    assert [ax.get_title() for ax in axes.flat] == ["A", "B"]
    for ax, p in zip(axes.flat, ["A", "B"], strict=True):
        sizes = [len(c.get_offsets()) for c in ax.collections]
        assert sizes == [
            control.n_obs,
            (real.obs["perturbation"] == p).sum(),
            (predicted.obs["perturbation"] == p).sum(),
        ]
    figure = axes[0, 0].figure
    assert figure.get_suptitle() == "held out"
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["control", "real", "predicted"]
    with pytest.raises(ValueError, match="panels=True"):
        sd.pl.prediction_pca(predicted, real, panels=True, ax=axes[0, 0], show=False)
    plt.close("all")


def test_prediction_umap(cells):
    predicted, real, control = cells
    ax = sd.pl.prediction_pca(predicted, real, control=control, basis="umap", show=False)
    assert ax.get_xlabel() == "UMAP1"
    assert sum(len(c.get_offsets()) for c in ax.collections) == predicted.n_obs + real.n_obs + control.n_obs
    with pytest.raises(ValueError, match="basis"):
        sd.pl.prediction_pca(predicted, real, basis="tsne", show=False)


def test_save_true_uses_scanpy_figdir(cells, tmp_path):
    import scanpy as sc

    predicted, real, control = cells
    previous = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        sd.pl.de_gene_violins(predicted, real, control=control, perturbation="A", n_genes=3, save=True)
    finally:
        sc.settings.figdir = previous
    assert any(p.name.startswith("de_gene_violins") for p in tmp_path.iterdir())


def test_de_gene_violins(cells, tmp_path):
    predicted, real, control = cells
    ax = sd.pl.de_gene_violins(predicted, real, control=control, perturbation="A", n_genes=4, show=False)
    bodies = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bodies) == 4 * 3  # genes x (control, real, predicted)
    assert len(ax.get_xticklabels()) == 4
    # the zero fractions written above the violins
    zero_texts = [t.get_text() for t in ax.texts]
    assert len(zero_texts) == 12 and all(t.endswith("%") for t in zero_texts)

    genes = ["g0", "g5"]
    ax = sd.pl.de_gene_violins(predicted, real, genes=genes, perturbation="B", show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == genes
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2 * 2

    # an all-zero gene must not break the density estimate
    real_zero = real.copy()
    real_zero.X[:, 0] = 0
    sd.pl.de_gene_violins(predicted, real_zero, genes=["g0"], perturbation="A", show=False)

    with pytest.raises(ValueError, match="perturbation="):
        sd.pl.de_gene_violins(predicted, real, control=control, show=False)
    with pytest.raises(ValueError, match="empty"):
        sd.pl.de_gene_violins(predicted, real, genes=[], perturbation="A", show=False)
    with pytest.raises(ValueError, match="control="):
        sd.pl.de_gene_violins(predicted, real, perturbation="A", show=False)
    path = tmp_path / "violins.pdf"
    sd.pl.de_gene_violins(predicted, real, control=control, perturbation="A", save=path)
    assert path.stat().st_size > 0


def test_top_de_genes_picks_shifted_genes():
    from scdoloris.plotting._distributions import top_de_genes

    rng = np.random.default_rng(1)
    control = _cells(100, 10, "control", rng, p_zero=0.0)
    real = control.copy()
    real.X[:, 7] += 5.0
    real.X[:, 2] -= 1.5
    assert top_de_genes(real, control, 2) == ["g7", "g2"]


def _medians(ax):
    """Height of every violin's median line, in drawing order (control, real, predicted; genes within)."""
    from matplotlib.collections import LineCollection

    return [seg[0][1] for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]


def test_de_gene_violins_reads_a_layer_of_predicted_and_x_of_real(cells):
    """layer= is read from predicted; real and control cells without it from X, and the legend says so.

    The predicted AnnData is laid out as include_sources=True returns it: its source cells first (the
    control label, is_predicted False, the layer holding their own expression), which are not
    predictions: neither a second perturbation to choose from nor predicted violins.
    """
    predicted, real, control = cells
    predicted = predicted[(predicted.obs["perturbation"] == "A").to_numpy()].copy()
    predicted.layers["doloris_generated"] = predicted.X + 100.0  # unmistakable
    sources = control[:10].copy()
    sources.layers["doloris_generated"] = sources.X.copy()
    pred = ad.concat([sources, predicted])
    pred.obs["is_predicted"] = np.repeat([False, True], [sources.n_obs, predicted.n_obs])
    genes = ["g0", "g1"]

    ax = sd.pl.de_gene_violins(pred, real, control=control, genes=genes, layer="doloris_generated", show=False)
    real_a = real[(real.obs["perturbation"] == "A").to_numpy()]
    expected = [np.median(data[:, genes].X, axis=0) for data in (control, real_a)]
    expected.append(np.median(predicted[:, genes].layers["doloris_generated"], axis=0))
    np.testing.assert_allclose(_medians(ax), np.concatenate(expected), rtol=1e-5)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        f"control ({control.n_obs} cells, X)",
        f"real ({real_a.n_obs} cells, X)",
        f"predicted ({predicted.n_obs} cells)",
    ]
    assert ax.get_ylabel() == "expression (doloris_generated)"

    # A control AnnData with the layer is read from it; the DE genes are chosen the same way.
    control.layers["doloris_generated"] = control.X + 50.0
    ax = sd.pl.de_gene_violins(pred, real, control=control, genes=genes, layer="doloris_generated", show=False)
    np.testing.assert_allclose(_medians(ax)[:2], expected[0] + 50.0, rtol=1e-5)
    assert ax.get_legend().get_texts()[0].get_text() == f"control ({control.n_obs} cells)"
    ax = sd.pl.de_gene_violins(pred, real, control=control, n_genes=3, layer="doloris_generated", show=False)
    assert len(ax.get_xticklabels()) == 3

    with pytest.raises(KeyError, match="predicted has no layer 'doloris_mask'"):
        sd.pl.de_gene_violins(pred, real, control=control, genes=genes, layer="doloris_mask", show=False)


def test_top_de_genes_reads_x_of_cells_without_the_layer():
    from scdoloris.plotting._distributions import top_de_genes

    rng = np.random.default_rng(1)
    control = _cells(100, 10, "control", rng, p_zero=0.0)
    real = control.copy()
    real.X[:, 4] += 3.0
    control.layers["L"] = control.X.copy()
    control.layers["L"][:, 6] += 9.0  # read from the layer: gene 6 differs most
    assert top_de_genes(real, control, 1, layer="L") == ["g6"]
    assert top_de_genes(real, control, 1) == ["g4"]


def _calibration_case(probabilities, fractions, n_cells=200):
    """Predicted cells with constant per-gene probabilities; real cells with exact nonzero fractions."""
    n_genes = len(probabilities)
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    pred = ad.AnnData(
        np.ones((20, n_genes), dtype=np.float32),
        obs=pd.DataFrame({"perturbation": ["A"] * 20}, index=[f"p{i}" for i in range(20)]),
        var=var,
    )
    pred.obsm["doloris_activation_prob"] = np.tile(np.asarray(probabilities, dtype=np.float32), (20, 1))
    x = np.zeros((n_cells, n_genes), dtype=np.float32)
    for j, f in enumerate(fractions):
        x[: int(round(f * n_cells)), j] = 1.5
    real = ad.AnnData(
        x, obs=pd.DataFrame({"perturbation": ["A"] * n_cells}, index=[f"r{i}" for i in range(n_cells)]), var=var
    )
    return pred, real


def test_mask_calibration_known_correlation(tmp_path):
    probs = [0.1, 0.2, 0.5, 0.7, 0.9]
    # perfectly calibrated
    pred, real = _calibration_case(probs, probs)
    table = sd.pl.mask_calibration_table(pred, real)
    np.testing.assert_allclose(table["predicted"], probs, atol=1e-6)
    np.testing.assert_allclose(table["empirical"], probs, atol=1e-6)
    ax = sd.pl.mask_calibration(pred, real, show=False)
    assert "r = 1.000" in ax.get_title()
    # identity line from (0, 0) to (1, 1)
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xydata(), [[0, 0], [1, 1]])
    # a known, imperfect case
    fractions = [0.5, 0.1, 0.6, 0.4, 1.0]
    expected = np.corrcoef(probs, fractions)[0, 1]
    pred, real = _calibration_case(probs, fractions)
    ax = sd.pl.mask_calibration(pred, real, show=False)
    assert f"r = {expected:.3f}" in ax.get_title()
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(probs)
    path = tmp_path / "calibration.png"
    fig = sd.pl.mask_calibration(pred, real, save=path, return_fig=True)
    assert isinstance(fig, plt.Figure) and path.stat().st_size > 0


def test_mask_calibration_needs_probabilities(cells):
    predicted, real, _ = cells
    del predicted.obsm["doloris_activation_prob"]
    with pytest.raises(KeyError, match="predict_perturbation"):
        sd.pl.mask_calibration(predicted, real, show=False)


def _scores():
    rows = []
    for method, base in [("doloris", 1.0), ("no_change", 2.0), ("linear", 1.5)]:
        for seed in (0, 1):
            for p, offset in [("A", 0.0), ("B", 1.0)]:
                for gene_set in ("all", "top20"):
                    rows.append((method, seed, p, "k562", gene_set, "e_distance", base + offset))
                    rows.append((method, seed, p, "k562", gene_set, "emd", base / 10 + offset / 10))
    return pd.DataFrame(rows, columns=["method", "seed", "perturbation", "cell_type", "gene_set", "metric", "value"])


def test_metric_bars_from_benchmark_result(tmp_path):
    from scdoloris.benchmark import BenchmarkResult

    result = BenchmarkResult(scores=_scores(), split_name="test")
    ax = sd.pl.metric_bars(result, show=False)
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 3  # one per method
    assert sum(len(c.patches) for c in containers) == 3 * 2  # methods x metrics
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in containers}
    np.testing.assert_allclose(heights["doloris"], [1.5, 0.15])
    np.testing.assert_allclose(heights["no_change"], [2.5, 0.25])
    # error bars: std over the 4 (seed, condition) values of each method, e.g. [1, 1, 2, 2] -> 0.577
    segments = containers[0].errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose(segments[0][1, 1] - segments[0][0, 1], 2 * np.std([1, 1, 2, 2], ddof=1), rtol=1e-6)

    ax = sd.pl.metric_bars(result, metrics="emd", methods=["linear", "doloris"], error="none", show=False)
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in containers] == ["linear", "doloris"]
    assert sum(len(c.patches) for c in containers) == 2
    path = tmp_path / "bars.png"
    sd.pl.metric_bars(result, save=path)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="gene_set"):
        sd.pl.metric_bars(result, gene_set="top40", show=False)


def test_metric_bars_from_tables():
    scores = _scores()
    per_method = {m: t.drop(columns="method") for m, t in scores[scores["seed"] == 0].groupby("method")}
    ax = sd.pl.metric_bars(per_method, show=False)
    assert sum(len(c.patches) for c in ax.containers if isinstance(c, BarContainer)) == 6
    wide = pd.DataFrame({"method": ["a", "a", "b"], "e_distance": [1.0, 3.0, 2.0], "rmse": [0.1, 0.3, 0.2]})
    ax = sd.pl.metric_bars(wide, error="sem", show=False)
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose([p.get_height() for p in containers[0].patches], [2.0, 0.2])


def test_history_from_dict_and_model(tmp_path):
    epochs = pd.Index(range(5), name="epoch")
    records = {
        "train_loss": pd.DataFrame({"train_loss": np.linspace(1, 0.2, 5)}, index=epochs),
        "validation_loss": pd.DataFrame({"validation_loss": [1.1, np.nan, 0.5, np.nan, 0.3]}, index=epochs),
        "train_mask_loss": pd.DataFrame({"train_mask_loss": np.linspace(0.7, 0.1, 5)}, index=epochs),
    }
    ax = sd.pl.history(records, show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"train_loss", "validation_loss"}
    np.testing.assert_allclose(lines["validation_loss"].get_xdata(), [0, 2, 4])  # NaN epochs dropped
    assert ax.get_xlabel() == "epoch"
    ax = sd.pl.history(records, keys="train_mask_loss", logy=True, show=False)
    assert [line.get_label() for line in ax.get_lines()] == ["train_mask_loss"]
    assert ax.get_yscale() == "log"
    with pytest.raises(KeyError, match="available"):
        sd.pl.history(records, keys="elbo", show=False)

    class Untrained:
        history = None

    with pytest.raises(ValueError, match="train"):
        sd.pl.history(Untrained(), show=False)
    path = tmp_path / "history.png"
    sd.pl.history(records, save=path)
    assert path.stat().st_size > 0


def test_plots_on_a_trained_model(trained_model, synthetic_two_types):
    pred = trained_model.predict_perturbation(["G000"], cell_type="ct0", n_cells=30, n_steps=5, seed=0)
    real = synthetic_two_types[
        (synthetic_two_types.obs["perturbation"] == "G000").to_numpy()
        & (synthetic_two_types.obs["cell_type"] == "ct0").to_numpy()
    ]
    table = sd.pl.mask_calibration_table(pred, real)
    assert len(table) == pred.n_vars
    assert table["predicted"].between(0, 1).all() and table["empirical"].between(0, 1).all()
    assert isinstance(sd.pl.mask_calibration(pred, real, show=False), plt.Axes)
    ax = sd.pl.history(trained_model, show=False)
    assert {line.get_label() for line in ax.get_lines()} >= {"train_loss"}
    assert isinstance(sd.pl.de_gene_violins(pred, real, genes=["G001", "G002"], show=False), plt.Axes)
