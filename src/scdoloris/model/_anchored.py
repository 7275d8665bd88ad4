"""The anchored prediction of :class:`~scdoloris.Doloris`: the Anchor fitted on the model's cells, and the gated cells.

The arithmetic is in :mod:`scdoloris.model._anchoring`; :class:`AnchoredMixin` connects it to the
model's registered data and its prediction request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import REGISTRY_KEYS
from ..baselines import Anchor
from ..data import expression_matrix, subset_rows
from ..perturbation import dosed_label
from ..prediction import Request, Sources, condition_stream
from ._anchoring import anchored_cells


class AnchoredMixin:
    """The Anchor of :class:`~scdoloris.Doloris` and the anchored cells of ``preset="anchored"``."""

    def _dosed_labels(self, rows: np.ndarray) -> np.ndarray:
        """The dosed label of each cell in ``rows``, as the Anchor names conditions: control, label or ``A@dose``."""
        labels = self._registered_labels()[rows]
        is_control = self._cell_is_control()[rows]
        doses = self._doses()
        control = self.control_values[0]
        if doses is None:
            return np.where(is_control, control, labels).astype(object)
        doses = doses[rows]
        perturbed = ~is_control & (doses != 0)
        # One name per distinct (label, dose), not per cell.
        pairs, inverse = np.unique(
            np.stack([labels[perturbed].astype(str), doses[perturbed].astype(str)]), axis=1, return_inverse=True
        )
        names = np.array([self._dosed_label(label, float(dose)) for label, dose in pairs.T], dtype=object)
        out = np.full(len(rows), control, dtype=object)
        out[perturbed] = names[inverse.ravel()]
        return out

    def _dosed_label(self, label: str, dose) -> str:
        """``label`` with its dose on each component (``"A@100+B@100"``), as the anchor names conditions."""
        if self._setup_args.get("dose_key") is None or dose is None:
            return label
        if not np.atleast_1d(np.asarray(dose, dtype=np.float64)).any():  # dose 0: unperturbed, as in training
            return self.control_values[0]
        return dosed_label(label, dose, self.control_values)

    def _fit_anchor(self, keep: np.ndarray, spread: bool = True) -> Anchor:
        """The anchor fitted on the model's cells where ``keep`` (its training cells, or all but a fold).

        ``spread=False`` skips the pass over the data for the spreads (the calibration reads shifts only).
        """
        rows = np.flatnonzero(keep)
        X = expression_matrix(self.adata, self._setup_args.get("layer"))
        types = np.asarray(self.cell_types, dtype=object)[self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)[rows]]
        obs = pd.DataFrame(
            {"perturbation": self._dosed_labels(rows), "cell_type": pd.Categorical(types, categories=self.cell_types)},
            index=self.adata.obs_names[rows],
        )
        if len(rows) < self.adata.n_obs:
            # A sparse subset stays sparse (on disk too); only an on-disk dense matrix is read densely.
            X = subset_rows(X, rows)
        data = AnnData(X=X, obs=obs)
        return Anchor(spread=spread).fit(
            data, perturbation_key="perturbation", control_value=self.control_values, cell_type_key="cell_type"
        )

    def _fitted_anchor(self) -> Anchor:
        """The fitted anchor, restored from ``anchor_`` once per model (fitted now if the model has none)."""
        state = self.__dict__.get("anchor_")
        cached = self.__dict__.get("_anchor_cache")
        if cached is None or cached[0] is not state:
            anchor = (
                Anchor.from_state(state) if state is not None else self._fit_anchor(np.ones(self.adata.n_obs, bool))
            )
            self._anchor_cache = cached = (state, anchor)
        return cached[1]

    def _anchoring_plan(self, request: Request, sources: Sources, renamed: dict, cells: str, seed: int) -> dict:
        """What anchors every ``(entry, group of sources)``: the anchor's shift, gate, kind, spread and stream.

        ``renamed`` maps genes asked by another symbol to the model's name for them; ``cells`` is how the
        cells are made (:func:`~scdoloris.model._anchoring.anchored_cells`), each ``(condition, cell type)``
        block drawing from its own stream of ``seed`` (:func:`~scdoloris.prediction.condition_stream`).
        """
        anchor = self._fitted_anchor()
        gates = self.__dict__.get("calibration_", {}).get("gates", {})
        types = np.asarray(sources.cell_types, dtype=object)
        groups = {t: i for i, t in enumerate(dict.fromkeys(types))}
        plan = {"group_of": np.array([groups[t] for t in types]), "cells": cells}
        anchor_shifts, weights, streams, kinds, spreads, used = {}, {}, {}, {}, {}, []
        no_shift = np.zeros(len(self.adata.var_names))
        for e, (components, dose) in enumerate(zip(request.components, request.doses, strict=True)):
            name = self._dosed_label("+".join(renamed.get(c, c) for c in components), dose)
            control = name in self.control_values  # at dose 0: no shift, the source cells themselves
            shift = None if control else anchor.predict_shift([name], cell_type=list(groups))
            for t, g in groups.items():
                kind = "control" if control else anchor.kind(name, t)
                anchor_shifts[(e, g)] = no_shift if control else shift.loc[(name, t)].to_numpy()
                weights[(e, g)] = float(gates.get(kind, 0.0))
                kinds[(e, g)] = kind
                if not control and cells == "sources":
                    spreads[(e, g)] = anchor.spread_change(name, t)
                streams[(e, g)] = condition_stream(seed, request.conditions[e], str(t), "cells")
                used.append({"entry": request.names[e], "cell_type": t, "kind": kind, "gate": weights[(e, g)]})
        plan |= {"anchors": anchor_shifts, "gates": weights, "streams": streams, "kinds": kinds, "spreads": spreads}
        plan["used"] = pd.DataFrame(used)
        return plan

    @staticmethod
    def _needs_generated(plan: dict) -> bool:
        """Whether the anchored cells need the paper's generated cells: a gate above 0, or ``"generated"`` cells."""
        return plan["cells"] == "generated" or any(gate > 0.0 for gate in plan["gates"].values())

    def _anchored(self, plan: dict, source_x: np.ndarray, generated: np.ndarray | None):
        """Anchored cells of every entry (see :mod:`scdoloris.model._anchoring`) and the kind and gate of each.

        ``generated`` may be ``None`` where :meth:`_needs_generated` is false.
        """
        out, _ = anchored_cells(
            source_x,
            generated,
            plan["group_of"],
            plan["anchors"],
            plan["gates"],
            plan["cells"],
            plan["streams"],
            plan["kinds"],
            plan["spreads"],
        )
        return out.astype(np.float32), plan["used"]
