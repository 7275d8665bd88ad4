"""Write the tutorial notebooks (outputs empty) from the cells below: ``python tutorials/make_notebooks.py``.

Edit the cells here, not the ``.ipynb`` files, and re-run the script. The notebooks read the
environment variable ``SCDOLORIS_TUTORIAL_FAST``: with ``1`` (as in ``tests/test_tutorials.py``)
they train tiny models for a few steps so that each runs in about a minute on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

IMPORTS = {
    "ad": "import anndata as ad",
    "plt": "import matplotlib.pyplot as plt",
    "np": "import numpy as np",
    "pd": "import pandas as pd",
    "sc": "import scanpy as sc",
}


def setup(*names: str) -> str:
    """The first code cell: imports (``names`` from :data:`IMPORTS`), the fast-mode switch and the seed."""
    imports = "\n".join(IMPORTS[n] for n in IMPORTS if n in names)
    return f"""\
import os

{imports}
import scvi

import scdoloris as sd

# SCDOLORIS_TUTORIAL_FAST=1 (what the test suite sets) runs a tiny version of this notebook in about a
# minute; leave it unset for the real thing.
FAST = os.environ.get("SCDOLORIS_TUTORIAL_FAST") == "1"
scvi.settings.seed = 0
"""


FAST_NOTE = (
    "> **Fast mode.** When the notebook runs with `SCDOLORIS_TUTORIAL_FAST=1` (as in the test suite), "
    "the model is tiny and trained for a few hundred steps at most: far too short to be good. "
    "Read the figures of that run as a check that the code runs, not as results; measured "
    "figures are in [BENCHMARKS.md](../BENCHMARKS.md)."
)


def md(text: str):
    """A markdown cell."""
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    """A code cell."""
    return new_code_cell(text.strip("\n"))


# ---------------------------------------------------------------------------------------------- 1
GENETIC = [
    md("""
# Unseen combinations of genetic perturbations (Norman 2019)

Norman et al. (2019) activated single genes and pairs of genes with CRISPRa in K562 cells. Here
Doloris is trained on the control cells and the **single** activations only, and asked to predict
the cells of the **double** activations it never saw. We then look at predicted and real cells
together with scanpy, and score the predictions against simple baselines.

The data are the bundled development subset (`sd.datasets.norman2019_subset`): 500 highly variable
genes, log1p-normalised, 100 control cells, 18 singles and 15 doubles of about 100 cells each.
"""),
    md(FAST_NOTE),
    code(setup("ad", "plt", "pd", "sc")),
    code("""
MODEL_KWARGS = {"n_hidden": 128, "n_hidden_mask": 64, "n_perturbation": 32} if FAST else {}
TRAIN_KWARGS = {"max_steps": 150, "batch_size": 128} if FAST else {"max_steps": 4000}
N_CELLS = 50 if FAST else 200

adata = sd.datasets.norman2019_subset(k562_only=True)
adata
"""),
    md("""
## Hold out the doubles

`sd.benchmark.singles_to_doubles` keeps controls and singles for training and lists every double
as a held-out condition. Only 1 of the 31 perturbed genes is among the 500 measured genes: the
others reach the model through the gene graph (GO similarity by default).
"""),
    code("""
split = sd.benchmark.singles_to_doubles(adata)
train = split.train_data(adata)
doubles = list(split.test["perturbation"])
print(split)
print("held out:", doubles)
"""),
    code("""
sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control")
model = sd.Doloris(train, **MODEL_KWARGS)
model
"""),
    md("""
## Train

`train` fits the two conditional diffusion models and the mask model together. The training curve
comes from `model.history`, as for any scvi-tools model.
"""),
    code("""
model.train(**TRAIN_KWARGS, enable_progress_bar=not FAST)
sd.pl.history(model, keys=["train_loss", "validation_loss"])
"""),
    md("""
## Predict the unseen doubles

Each prediction starts from real control cells: a control cell is inverted to the shared Gaussian
latent and generated again under the double perturbation. `X` is the masked prediction,
`layers["doloris_continuous"]` the output before the sparsity mask.
"""),
    code("""
pred = model.predict_perturbation(doubles, n_cells=N_CELLS, seed=0)
pred
"""),
    md("""
## Predicted and real cells, together, with scanpy

Predictions are an AnnData with the same genes, so they concatenate with the real cells.
"""),
    code("""
shown = doubles[:3]
control = split.controls(adata)
real = adata[adata.obs["perturbation"].isin(doubles)]
both = ad.concat(
    {
        "control": control,
        "real": real[real.obs["perturbation"].isin(shown)],
        "predicted": pred[pred.obs["perturbation"].isin(shown)],
    },
    label="source",
    index_unique="-",
)
sc.pp.pca(both)
sc.pl.pca(both, color=["perturbation", "source"], wspace=0.35)
"""),
    md("""
A joint PCA lets the predictions shape the axes. `sd.pl.prediction_pca` instead fits the PCA on
the real and control cells only and projects the predictions into it (crosses: predicted; dots:
real). Outside fast mode we also draw a UMAP of all cells together (`basis="umap"`).
"""),
    code("""
sd.pl.prediction_pca(pred[pred.obs["perturbation"].isin(shown)], real, control=control)
if not FAST:
    sd.pl.prediction_pca(pred[pred.obs["perturbation"].isin(shown)], real, control=control, basis="umap")
"""),
    md("""
## Gene by gene: distributions, zeros and bimodality

Distances between sets of cells can hide whether a model gets the *shape* of each gene's
distribution right. Violins of the top DE genes (largest mean change real vs control), with the
fraction of zeros above each violin:
"""),
    code("""
sd.pl.de_gene_violins(pred, real, control=control, perturbation=shown[0], n_genes=8)
"""),
    code("""
# the same with scanpy: one violin per source, for a few of these genes
genes = sd.metrics.de_genes(adata, "perturbation", shown[0], "control", n=4)
one = both[both.obs["perturbation"].isin([shown[0], "control"])]
sc.pl.violin(one, genes, groupby="source", rotation=30)
"""),
    md("""
## How good is it? Doloris against baselines

The baselines start from the same control cells: *no change* (the controls themselves),
*additive* (controls plus the sum of the two single shifts) and the *linear* model of
Ahlmann-Eltze et al. (2025). `sd.metrics.evaluate` scores each held-out double on all genes and
on its top 20 DE genes (E-distance, paper Eq. 20; EMD, Eq. 21; RMSE of the mean). Lower is better.
"""),
    md("""
In this subset, 10 of the 15 doubles combine a gene that was never activated alone: *additive*
cannot predict those, so it is scored only on the doubles whose two singles were trained, while
Doloris and the linear model reach the other genes through the gene graph.
"""),
    code("""
singles = set(train.obs["perturbation"].astype(str)) - {"control"}
both_seen = [d for d in doubles if set(d.split("+")) <= singles]
print(f"{len(both_seen)} of {len(doubles)} doubles have both genes among the trained singles: {both_seen}")

predictions = {"doloris": pred}
baselines = {
    "no_change": sd.baselines.NoChange(),
    "additive": sd.baselines.Additive(),
    "linear": sd.baselines.Linear(),
}
for name, baseline in baselines.items():
    baseline.fit(train, perturbation_key="perturbation", control_value="control")
    asked = both_seen if name == "additive" else doubles
    predictions[name] = baseline.predict(asked, n_cells=N_CELLS, seed=0)

metrics = ["e_distance", "emd", "mean_rmse"]
tables = {name: sd.metrics.evaluate(p, real, control, n_de=20, metrics=metrics) for name, p in predictions.items()}
scores = pd.concat(tables, names=["method"]).reset_index(level=0)
# E-distance on the top 20 DE genes of each double (empty: not predicted by that method)
de20 = scores[(scores["gene_set"] == "DE20") & (scores["metric"] == "e_distance")]
de20.pivot(index="perturbation", columns="method", values="value").round(3)
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
shown_metrics = ["e_distance", "mean_rmse"]
sd.pl.metric_bars(
    scores[scores["method"] != "additive"], gene_set="DE20", metrics=shown_metrics, ax=axes[0], show=False
)
axes[0].set_title(f"all {len(doubles)} doubles, top 20 DE genes")
subset = scores[scores["perturbation"].isin(both_seen)]
sd.pl.metric_bars(subset, gene_set="DE20", metrics=shown_metrics, ax=axes[1], show=False)
axes[1].set_title(f"the {len(both_seen)} doubles of two trained singles")
plt.show()
"""),
    code("""
# on how many doubles does Doloris have the lower E-distance (all genes)?
wide = scores[(scores["metric"] == "e_distance") & (scores["gene_set"] == "all")]
wide = wide.pivot(index="perturbation", columns="method", values="value")
{
    m: f"{int((pair['doloris'] < pair[m]).sum())} of {len(pair)}"
    for m in wide
    if m != "doloris" and len(pair := wide[["doloris", m]].dropna())
}
"""),
    md("""
The numbers above are whatever this run produced; in fast mode they come from a model trained for
150 steps and say little. For averages over seeds with the full training budget use
`sd.benchmark.run_benchmark(adata, split, seeds=[0, 1, 2])` (it trains Doloris and fits every
baseline on the same split) and see [BENCHMARKS.md](../BENCHMARKS.md) for the measured results.
"""),
]

# ---------------------------------------------------------------------------------------------- 2
CELL_TYPE = [
    md("""
# A seen perturbation in an unseen cell type (Kang 2018)

Kang et al. (2018) stimulated PBMCs with interferon-β. The classic scGen task: train on
stimulated and control cells of every cell type but one, and predict how the held-out cell type
responds. Here the held-out type is CD4 T cells; their **control** cells stay in training (the
model must know what an unstimulated CD4 T cell looks like), their stimulated cells do not.

"stimulated" is not a gene, so Doloris embeds it as a learned category.
"""),
    md(FAST_NOTE),
    code(setup("ad", "pd", "sc")),
    code("""
MODEL_KWARGS = {"n_hidden": 64, "n_hidden_mask": 32, "n_perturbation": 16} if FAST else {}
TRAIN_KWARGS = {"max_steps": 120, "batch_size": 128} if FAST else {"max_steps": 4000}
N_GENES = 300 if FAST else 2000
N_STEPS = 20 if FAST else 50  # DDIM steps of each prediction

adata = sd.datasets.kang2018_subset()
# Fewer genes keep the example quick: the most variable ones (the data are log1p-normalised), plus a few
# interferon-stimulated genes (ISGs) we look at below.
isgs = ["ISG15", "IFI6", "IFIT1", "ISG20", "MX1", "IFIT3"]
sc.pp.highly_variable_genes(adata, n_top_genes=N_GENES)
adata = adata[:, adata.var["highly_variable"] | adata.var_names.isin(isgs)].copy()
adata.obs.groupby(["cell_type", "condition"], observed=True).size().unstack()
"""),
    code("""
split = sd.benchmark.unseen_cell_type(
    adata, "CD4T", perturbation_key="condition", control_value="control", cell_type_key="cell_type"
)
train = split.train_data(adata)
print(split)
train.obs.groupby(["cell_type", "condition"], observed=True).size().unstack().loc[["CD4T"]]
"""),
    code("""
sd.Doloris.setup_anndata(train, perturbation_key="condition", control_value="control", cell_type_key="cell_type")
model = sd.Doloris(train, **MODEL_KWARGS)
model.train(**TRAIN_KWARGS, enable_progress_bar=not FAST)
sd.pl.history(model)
"""),
    md("""
## Counterfactuals of the real CD4 T control cells

Passing `adata=` gives one predicted stimulated cell per given control cell, starting from that
very cell (its cell type is read from the registered `cell_type` column).
"""),
    code("""
cd4_control = split.controls(adata, "CD4T")
cd4_real = split.cells(adata, "stimulated", "CD4T")
pred = model.predict_perturbation("stimulated", adata=cd4_control, n_steps=N_STEPS, seed=0)
pred.obs[["condition", "cell_type", "control_cell"]].head()
"""),
    code("""
both = ad.concat({"control": cd4_control, "real": cd4_real, "predicted": pred}, label="source", index_unique="-")
sc.pp.pca(both)
sc.pl.pca(both, color="source")
"""),
    md("""
Interferon-stimulated genes (ISG15, IFI6, IFIT1, ...) should switch on. The violins show whether the
predicted cells reproduce the jump, including the cells where these genes are still zero:
"""),
    code("""
isgs = [g for g in isgs if g in adata.var_names]
sd.pl.de_gene_violins(pred, cd4_real, control=cd4_control, genes=isgs, perturbation_key="condition")
sd.pl.de_gene_violins(pred, cd4_real, control=cd4_control, n_genes=6, perturbation_key="condition")
"""),
    md("""
## Against baselines

*No change* returns the control cells; *mean shift* adds the average stimulation shift of the
training cell types to CD4 T controls. Both start from the same controls.
"""),
    code("""
predictions = {"doloris": pred}
for name, baseline in {"no_change": sd.baselines.NoChange(), "mean_shift": sd.baselines.MeanShift()}.items():
    baseline.fit(train, perturbation_key="condition", control_value="control", cell_type_key="cell_type")
    predictions[name] = baseline.predict("stimulated", cell_type="CD4T", n_cells=cd4_control.n_obs, seed=0)

tables = {
    name: sd.metrics.evaluate(p, cd4_real, cd4_control, perturbation_key="condition", n_de=20)
    for name, p in predictions.items()
}
scores = pd.concat(tables, names=["method"]).reset_index(level=0)
scores.pivot_table(index="method", columns=["gene_set", "metric"], values="value").round(3)
"""),
    code("""
sd.pl.metric_bars(scores, gene_set="DE20", metrics=["e_distance", "emd", "mean_rmse"], error="none")
"""),
    md("""
One held-out cell type, one seed: no error bars, and in fast mode a barely trained model. Repeat
over cell types with `sd.benchmark.run_benchmark(adata, lambda seed: sd.benchmark.unseen_cell_type(...))`
and see [BENCHMARKS.md](../BENCHMARKS.md) for measured numbers.
"""),
]

# ---------------------------------------------------------------------------------------------- 3
DRUGS = [
    md("""
# Drugs and doses: unseen molecules, unseen doses

Doloris embeds a molecule from its structure (RDKit Morgan fingerprints of its SMILES) and scales
its effect with the dose, so it can be asked about a molecule it never saw, at a dose it never
saw. We use `sd.datasets.synthetic_drug_perturbations`: real sci-Plex3 molecules with synthetic
responses whose ground truth follows the structure (similar molecules act alike) and a Hill
dose-response curve, in two cell lines.
"""),
    md(FAST_NOTE),
    code(setup("plt", "np", "pd")),
    code("""
MODEL_KWARGS = {"n_hidden": 128, "n_hidden_mask": 64, "n_perturbation": 32} if FAST else {}
TRAIN_KWARGS = {"max_steps": 200, "batch_size": 128} if FAST else {"max_steps": 4000}
DRUGS = ["Epothilone", "Patupilone", "Alisertib", "PHA-680632", "Cimetidine", "PCI-34051"]

drugs = sd.datasets.synthetic_drug_perturbations(
    n_genes=60 if FAST else 200,
    drugs=DRUGS,
    cell_types=("A549", "K562"),
    n_cells_per_condition=30 if FAST else 80,
    n_control_cells=100 if FAST else 300,
)
drugs.obs[["perturbation", "smiles", "dose", "cell_type"]].drop_duplicates("perturbation")
"""),
    md("""
Patupilone is epothilone B, a close analogue of epothilone; we hold it out entirely and also hold
out the dose 1,000 nM of every drug.
"""),
    code("""
sd.datasets.drug_similarity(drugs).round(2)
"""),
    code("""
HELD_OUT_DRUG, HELD_OUT_DOSE = "Patupilone", 1000.0
is_drug = drugs.obs["perturbation"] == HELD_OUT_DRUG
is_dose = drugs.obs["dose"] == HELD_OUT_DOSE
train = drugs[~(is_drug | is_dose).to_numpy()].copy()
train.obs["perturbation"] = train.obs["perturbation"].cat.remove_unused_categories()
sd.Doloris.setup_anndata(
    train,
    perturbation_key="perturbation",
    control_value="control",
    cell_type_key="cell_type",
    dose_key="dose",
    smiles_key="smiles",
)
model = sd.Doloris(train, **MODEL_KWARGS)
model.train(**TRAIN_KWARGS, enable_progress_bar=not FAST)
sd.pl.history(model)
"""),
    md("""
## An unseen molecule

The held-out molecule is named together with its SMILES. Predictions are compared with the real
cells, and with *no change* (the control cells the predictions start from).
"""),
    code("""
smiles = {HELD_OUT_DRUG: drugs.obs.loc[is_drug.to_numpy(), "smiles"].iloc[0]}
controls = drugs[(drugs.obs["perturbation"] == "control").to_numpy()]

rows = []
for cell_type in ["A549", "K562"]:
    for dose in [100.0, 10000.0]:
        pred = model.predict_perturbation(HELD_OUT_DRUG, dose=dose, smiles=smiles, cell_type=cell_type, n_cells=50)
        real = drugs[(is_drug & (drugs.obs["dose"] == dose) & (drugs.obs["cell_type"] == cell_type)).to_numpy()]
        ctrl = controls[(controls.obs["cell_type"] == cell_type).to_numpy()]
        rows.append(
            {
                "cell_type": cell_type,
                "dose": dose,
                "doloris": sd.metrics.e_distance(pred.X, real.X),
                "no_change": sd.metrics.e_distance(ctrl.X, real.X),
            }
        )
pd.DataFrame(rows).round(3)
"""),
    md("""
## An unseen dose

Every drug was trained at 10, 100 and 10,000 nM but not at 1,000 nM. How far does each drug move
the cells from the controls (norm of the mean shift), predicted vs real, across doses?
"""),
    code("""
def shift(cells, ctrl):
    \"\"\"Length of the mean shift of ``cells`` from the control cells ``ctrl``.\"\"\"
    return float(np.linalg.norm(np.asarray(cells.X).mean(0) - np.asarray(ctrl.X).mean(0)))


doses = [10.0, 100.0, 1000.0, 10000.0]
ctrl = controls[(controls.obs["cell_type"] == "A549").to_numpy()]
fig, ax = plt.subplots(figsize=(5, 3.5))
for i, drug in enumerate(["Epothilone", "Alisertib", HELD_OUT_DRUG]):
    kwargs = {"smiles": smiles} if drug == HELD_OUT_DRUG else {}
    predicted = [
        shift(model.predict_perturbation(drug, dose=d, cell_type="A549", n_cells=50, **kwargs), ctrl) for d in doses
    ]
    of_drug = drugs[((drugs.obs["perturbation"] == drug) & (drugs.obs["cell_type"] == "A549")).to_numpy()]
    real = [shift(of_drug[(of_drug.obs["dose"] == d).to_numpy()], ctrl) for d in doses]
    ax.plot(doses, real, "o-", color=f"C{i}", label=f"{drug} (real)")
    ax.plot(doses, predicted, "x--", color=f"C{i}", label=f"{drug} (predicted)")
ax.axvline(HELD_OUT_DOSE, color="grey", linewidth=0.5)
ax.set_xscale("log")
ax.set_xlabel("dose (nM); grey line: never trained")
ax.set_ylabel("|mean shift from control|")
ax.legend(fontsize=7)
plt.show()
"""),
    md("""
With the fast setting the curves are rough; trained for the full budget, the predicted curves
should follow the real ones, including at the unseen dose. For the sci-Plex3 benchmarks
(`sd.benchmark.unseen_molecules`, `sd.benchmark.unseen_drug_cell_dose`) see
[BENCHMARKS.md](../BENCHMARKS.md).
"""),
]

# ---------------------------------------------------------------------------------------------- 4
INSIDE = [
    md("""
# Inside the model: the mask, diversity, and the number of steps

Three looks under the hood, on the Norman 2019 doubles held out as in the first tutorial:

1. **Is the mask model calibrated?** Its predicted probability that a gene is active, against the
   fraction of real cells in which the gene is nonzero (paper Fig. 5).
2. **What does the mask do to the cells?** Zeros and per-gene variance with and without it
   (paper Fig. 2).
3. **How many DDIM steps are needed?** Quality against the number of function evaluations
   (paper Fig. 7).
"""),
    md(FAST_NOTE),
    code(setup("plt", "np", "pd")),
    code("""
MODEL_KWARGS = {"n_hidden": 128, "n_hidden_mask": 64, "n_perturbation": 32} if FAST else {}
TRAIN_KWARGS = {"max_steps": 150, "batch_size": 128} if FAST else {"max_steps": 4000}
N_CELLS = 50 if FAST else 200

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
"""),
    md("""
## 1. Mask calibration

Each point is one gene in one held-out double: the mean of `obsm["doloris_activation_prob"]` over
the predicted cells (x) and the fraction of real cells expressing it (y). On the identity line the
mask is calibrated.
"""),
    code("""
sd.pl.mask_calibration(pred, real)
"""),
    md("""
A fair reference: the fraction of **control** cells expressing each gene, used as a guess for every
double. A mask model that knows something about the perturbations must beat it.
"""),
    code("""
def dense(m):
    \"\"\"A dense array of a (possibly sparse) matrix.\"\"\"
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
"""),
    md("""
If the two correlations are close, as after a short training, the mask model has learned little
beyond how often each gene is expressed in control cells; the difference shows on genes whose
expression the perturbation switches on or off.
"""),
    md("""
## 2. The mask and the diversity of predicted cells

`layers["doloris_continuous"]` is the bridge output before the mask; `X` is after it. Per gene:
the fraction of zeros and the variance, predicted vs real, pooled over the held-out doubles.
"""),
    code("""
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
"""),
    md("""
Without the mask, the diffusion output is almost never exactly zero: sparse genes get a cloud of
small positive values instead of the real spike at zero. The mask restores the zeros.
"""),
    md("""
## 3. Number of DDIM steps vs quality

`n_steps` sets the DDIM steps of both the inversion and the generation: fewer steps, faster
predictions. E-distance to the real cells (lower is better), averaged over a few held-out doubles,
and the time per call:
"""),
    code("""
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
"""),
    md("""
What to expect from a fully trained model is in [BENCHMARKS.md](../BENCHMARKS.md); the curve of a
fast-mode run mostly reflects an undertrained model.
"""),
]

NOTEBOOKS = {
    "01_genetic_perturbations.ipynb": GENETIC,
    "02_unseen_cell_type.ipynb": CELL_TYPE,
    "03_drugs_and_doses.ipynb": DRUGS,
    "04_inside_the_model.ipynb": INSIDE,
}


def main() -> None:
    """Write every notebook next to this script."""
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.metadata["language_info"] = {"name": "python"}
        nbformat.validate(notebook)
        # stable cell ids keep regenerated files diff-free
        for i, cell in enumerate(notebook.cells):
            cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
        nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    main()
