"""Would gene-graph neighbours tell unseen knockouts apart? An upper bound on the real screens here (seconds).

For a perturbation never trained, the Anchor answers ``lambda * (the cell type's mean shift)``: the
same for every unseen gene. A way to tell them apart is to borrow from the trained genes that the
bundled GO graph calls similar (cosine of their rows of the GO-similarity graph, self-loops added,
so that two genes sharing GO neighbours are similar even without a direct edge):

    shift(g) = lambda * m + kappa * phi_g * (a_g - lambda * m),   phi_g = w_g / (w_g + tau),

with ``a_g`` the similarity-weighted average shift of the trained genes, ``w_g`` the total
similarity. Per cell type of Norman 2019 (K562, CRISPRa) and McFaline-Figueroa 2023 (A172, T98G,
U87MG, CRISPRi), every single is left out in turn and predicted from the others; ``kappa`` is the
least-squares value over those same left-out singles (clipped to [0, 1]), for each ``tau`` of a
grid: an optimistic bound (fitted where it is scored). Printed: the summed squared error of the
Anchor's answer, of the best neighbour answer, of the neighbour average alone and of mean shift.
If even the bound gains little, a held-out rule cannot gain more.

Usage::

    python benchmarks/gene_neighbours.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

import scdoloris as sd
from scdoloris.data import to_dense
from scdoloris.perturbation._gene_graph import go_edges

TAUS = (0.1, 0.3, 1.0)


def similarity(genes: list[str]) -> np.ndarray:
    """Cosine similarity of the genes' rows of the symmetric GO graph with self-loops; 0 on the diagonal."""
    edges = go_edges()
    nodes = pd.Index(sorted(set(edges["source"]) | set(edges["target"])))
    graph = sparse.csr_matrix(
        (edges["weight"], (nodes.get_indexer(edges["source"]), nodes.get_indexer(edges["target"]))),
        shape=(len(nodes), len(nodes)),
    )
    graph = graph.maximum(graph.T) + sparse.identity(len(nodes))
    rows = sparse.vstack(
        [graph[i] if i >= 0 else sparse.csr_matrix((1, len(nodes))) for i in nodes.get_indexer(genes)]
    ).tocsr()
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    rows = sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ rows
    out = (rows @ rows.T).toarray()
    np.fill_diagonal(out, 0.0)
    return out


def main() -> None:
    adata = sd.datasets.norman2019_subset()
    X = to_dense(adata.X).astype(np.float64)
    rows = []
    for cell_type in ["k562", "A172", "T98G", "U87MG"]:
        keep = (adata.obs["cell_type"] == cell_type).to_numpy()
        labels = adata.obs["perturbation"].astype(str).to_numpy()[keep]
        x = X[keep]
        control = x[labels == "control"].mean(axis=0)
        singles = sorted({p for p in labels if p != "control" and "+" not in p})
        shifts = np.stack([x[labels == p].mean(axis=0) - control for p in singles])
        n = len(singles)
        others = (shifts.sum(axis=0) - shifts) / (n - 1)
        lam = float(np.clip(np.sum(shifts * others) / np.sum(others**2), 0.0, 1.0))
        anchor = lam * others
        weights = similarity(singles)
        total = weights.sum(axis=1)
        linked = total > 0
        neighbours = np.where(linked[:, None], weights @ shifts / np.where(linked, total, 1.0)[:, None], anchor)
        best = np.inf
        for tau in TAUS:
            step = (total / (total + tau))[:, None] * (neighbours - anchor)
            kappa = float(np.clip(np.sum((shifts - anchor) * step) / max(np.sum(step**2), 1e-12), 0.0, 1.0))
            best = min(best, float(np.sum((shifts - anchor - kappa * step) ** 2)))
        rows.append(
            {
                "cell type": cell_type,
                "singles": n,
                "with a GO neighbour": int(linked.sum()),
                "lambda": round(lam, 3),
                "anchor": float(np.sum((shifts - anchor) ** 2)),
                "best neighbour rule (bound)": best,
                "neighbour average alone": float(np.sum((shifts[linked] - neighbours[linked]) ** 2))
                + float(np.sum((shifts[~linked] - anchor[~linked]) ** 2)),
                "mean shift": float(np.sum((shifts - others) ** 2)),
            }
        )
    table = pd.DataFrame(rows)
    table["gain of the bound"] = 1.0 - table["best neighbour rule (bound)"] / table["anchor"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
