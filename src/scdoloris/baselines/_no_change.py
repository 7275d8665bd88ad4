from __future__ import annotations

import warnings

import anndata as ad
import numpy as np


def no_change(
    control: ad.AnnData, perturbations: list[str], *, n_cells: int | None = None, seed: int = 0
) -> ad.AnnData:
    """The "no change" baseline: real control cells stand for every perturbation.

    Parameters
    ----------
    control
        Control cells.
    perturbations
        Perturbation labels to "predict".
    n_cells
        Cells per perturbation, drawn with ``seed`` (with replacement only when there are fewer
        controls); all controls when ``None``.
    seed
        Seed of the draw.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations()
    >>> pred = sd.baselines.no_change(adata[adata.obs.perturbation == "control"], ["G001"], n_cells=10)
    >>> pred.n_obs
    10
    """
    rng = np.random.default_rng(seed)
    if n_cells is not None and control.n_obs < n_cells:
        # As prediction/_sources.draw_controls warns: repeated cells count several times in a metric.
        warnings.warn(
            f"n_cells={n_cells} is more than the {control.n_obs} control cells, so the draw repeats cells. "
            f"Pass n_cells={control.n_obs} or fewer for distinct cells.",
            UserWarning,
            stacklevel=2,
        )
    parts = []
    for p in perturbations:
        rows = np.arange(control.n_obs)
        if n_cells is not None:
            rows = np.sort(rng.choice(control.n_obs, n_cells, replace=control.n_obs < n_cells))
        part = control[rows].copy()
        part.obs["perturbation"] = p
        part.obs["control_cell"] = control.obs_names[rows].to_numpy()
        part.obs_names = [f"{p}_no_change_{i}" for i in range(len(rows))]
        parts.append(part)
    return ad.concat(parts)
