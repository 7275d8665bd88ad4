"""How well the Anchor transfers Kang's interferon response to a cell type never seen stimulated.

For each of Kang's 7 cell types held out in turn (the benchmark's ``unseen_cell_type`` split), the
squared error of the predicted mean shift (stimulated minus control mean, all genes and the 20 genes
with the largest true shift) for :class:`scdoloris.baselines.Anchor` and for the plain average of the
other cell types' shifts (:class:`~scdoloris.baselines.MeanShift`'s answer). No model is trained.

    python benchmarks/kang_transfer.py
"""

from __future__ import annotations

import numpy as np

import scdoloris as sd


def main() -> None:
    adata = sd.datasets.kang2018_subset()
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    labels = adata.obs["condition"].astype(str).to_numpy()
    types = adata.obs["cell_type"].astype(str).to_numpy()
    keys = {"perturbation_key": "condition", "control_value": "control", "cell_type_key": "cell_type"}
    print("| held out | anchor (all / top 20) | mean shift (all / top 20) | ratio (all) | bandwidth chosen | gamma |")
    print("|---|---:|---:|---:|---|---:|")
    for held_out in sorted(set(types)):
        split = sd.benchmark.unseen_cell_type(adata, held_out, **keys)
        train = adata[split.train].copy()
        anchor = sd.baselines.Anchor().fit(train, **keys)
        mean_shift = sd.baselines.MeanShift().fit(train, **keys)
        in_type = types == held_out
        truth = X[in_type & (labels == "stimulated")].mean(0) - X[in_type & (labels == "control")].mean(0)
        top = np.argsort(-np.abs(truth))[:20]
        errors = []
        for method in (anchor, mean_shift):
            error = method.predict_shift(["stimulated"], cell_type=held_out).to_numpy()[0] - truth
            errors.append((float(np.sum(error**2)), float(np.sum(error[top] ** 2))))
        (a, a20), (m, m20) = errors
        chosen = "equal weights" if anchor.bandwidth_ is None else f"{anchor.bandwidth_:.3g}"
        row = f"| {held_out} | {a:.1f} / {a20:.2f} | {m:.1f} / {m20:.2f} | {m / a:.1f}x | {chosen} |"
        print(f"{row} {anchor.gamma_:.2f} |")


if __name__ == "__main__":
    main()
