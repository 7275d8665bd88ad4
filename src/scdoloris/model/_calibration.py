"""The calibration of the anchored default: a fold held out of the first training phase, then the gates.

:class:`CalibrationMixin` holds the model's side (choosing the fold, summarising the data without
it, predicting it and fitting the gates, :mod:`scdoloris.model._anchoring` for the arithmetic);
``_Calibration`` is the training callback that runs it at its step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from .._constants import (
    MASK_REFERENCE_CONDITIONS,
    MASK_STRATEGIES,
    MASK_THRESHOLDS,
    PREDICTION_BATCH_SIZE,
    PREDICTION_N_STEPS,
    REGISTRY_KEYS,
)
from ..data import TrainingSummary, expression_matrix, read_rows, summarize_without
from ..perturbation import split_perturbation
from ..prediction import resolve_request
from ..train import in_fold
from ._anchoring import (
    CALIBRATION_CELLS,
    CALIBRATION_CONDITIONS_PER_CALL,
    CALIBRATION_MAX_CONDITIONS,
    CALIBRATION_MIN_CELLS,
    CALIBRATION_PHASE,
    MIN_CALIBRATION_LABELS,
    MIN_GATE_CONDITIONS,
    calibration_conditions,
    calibration_fold,
    gate_statistics,
    gates_from_statistics,
)
from ._inputs import module_inputs

if TYPE_CHECKING:
    from ._doloris import Doloris

logger = logging.getLogger(__name__)


class _Calibration(Callback):
    """Predicts the held-out fold at ``step`` and fits the gates (preset="anchored"; model/_anchoring.py).

    Until ``step`` the training plan gives the fold's perturbations (and, with doses, its
    ``conditions``: rows of perturbation code, cell type code and dose) no weight, so at ``step`` the
    model has never learned them; training then goes on with every perturbation. The result is kept
    in the run's checkpoints, so a resumed run ends with the gates of an uninterrupted one.

    A zero weight alone would leave the fold in what the model keeps of its training data (node
    features, target prior, conditions' moments, scale, reference cells of mask sampling): until
    ``step`` the module holds, and the calibration predicts with, ``without`` -- the summary of the
    data without the fold's cells (:func:`~scdoloris.data.summarize_without`) -- and from
    ``step`` on ``final`` (see :meth:`Doloris._calibration`). :meth:`begin` and :meth:`end` bracket
    the run; the module's statistics are buffers, so a checkpoint restores those of its phase.
    """

    def __init__(
        self,
        model: Doloris,
        fold: list[str],
        codes: list[int],
        conditions: np.ndarray,
        step: int,
        seed: int,
        held_out: np.ndarray,
        without: TrainingSummary,
        final: TrainingSummary,
    ):
        self.model, self.fold, self.codes, self.conditions = model, fold, codes, conditions
        self.step, self.seed = step, seed
        self.held_out, self.without, self.final = held_out, without, final
        self.result: dict | None = None

    def begin(self) -> None:
        """The module without the fold, before the run (a resumed run's checkpoint then restores its phase's)."""
        self.model.module.load_statistics(module_inputs(self.without))

    def end(self) -> None:
        """The module and the model's summary after the calibration step (also when a run stops early or fails)."""
        self.model.module.load_statistics(module_inputs(self.final))
        self.model._set_summary(self.final)

    def _run(self, pl_module) -> None:
        with self.model._summary_swapped(self.without):
            self.result = self.model._calibrate(self.fold, self.held_out, self.seed)
        self.result["held_out_conditions"] = self.model._describe_conditions(self.conditions)
        self.model.module.load_statistics(module_inputs(self.final))
        pl_module.train()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self.result is None and trainer.global_step >= self.step:
            self._run(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self.result is None:  # stopped early (early stopping, max_epochs) before the calibration step
            self._run(pl_module)

    def state_dict(self) -> dict:  # noqa: D102
        return {"result": self.result}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.result = state_dict.get("result")


class CalibrationMixin:
    """Calibration of :class:`~scdoloris.Doloris` with ``preset="anchored"`` (see the module docstring)."""

    # The model's summary (``repr``, scvi-tools' ``_model_summary_string``) ends with what the preset
    # makes of it: the gates and the conditions each rests on, or why there are none.
    @property
    def _model_summary_string(self) -> str:
        return self.__dict__.get("_summary_head", "") + self._calibration_summary()

    @_model_summary_string.setter
    def _model_summary_string(self, value: str) -> None:
        self.__dict__["_summary_head"] = value

    def _calibration_summary(self) -> str:
        """One sentence per line on how the trained model predicts (empty before training)."""
        if not getattr(self, "is_trained_", False) or "init_params_" not in self.__dict__:
            return ""
        if self.preset == "paper":
            return "\nPreset: paper (every predicted cell generated by the bridge)."
        head = (
            "\nPreset: anchored (source control cells moved, without filling zeros and with the spread the "
            "perturbation gives expressing cells, to the Anchor's mean"
        )
        calibration = self.__dict__.get("calibration_") or {}
        gates, counts = calibration.get("gates", {}), calibration.get("n_conditions", {})
        if not calibration.get("held_out"):
            return head + (
                f"). No calibration fold (fewer than {MIN_CALIBRATION_LABELS} perturbation labels, too few steps "
                "or a multi-device run): every gate is 0, the diffusion model's cells stay in "
                'layers["doloris_generated"].'
            )
        # A model saved before the minimum was 5 keeps the gates it was fitted with: only a 0 is explained.
        below = f" (below {MIN_GATE_CONDITIONS}: the anchor alone)"
        shown = ", ".join(
            f"{kind} {gates.get(kind, 0.0):.2f} on {counts[kind]} held-out conditions"
            + (below if counts[kind] < MIN_GATE_CONDITIONS and not gates.get(kind) else "")
            for kind in sorted(counts)
        )
        return head + (
            f", plus each kind's gate times the model's own shift beyond it). Gates: {shown or 'none'}; "
            "any other kind (e.g. a combination of trained singles, when the fold holds out singles only) "
            "has no held-out condition: gate 0, the anchor alone."
        )

    def _calibration(self, seed: int, total_steps: int, world_size: int) -> _Calibration | None:
        """The calibration of an anchored run: a fold of perturbations and the step it is predicted at.

        ``None`` for the paper preset, too few perturbations or steps, and distributed runs (whose
        processes would each predict the fold); their gates stay 0, the prediction the anchor's mean.
        A model trained before keeps its gates.
        """
        if self.preset != "anchored" or total_steps < 10:
            return None
        if self.is_trained_:
            # Continued training: the model has learned every perturbation, so a fold held out now would
            # not be unseen; the first run's gates stay.
            return None
        if world_size > 1:
            logger.warning("preset='anchored': a distributed run is not calibrated; predictions use the anchor alone.")
            return None
        labels, is_control = self._summary.perturbation_labels, self._summary.is_control
        fold = calibration_fold([label for label, control in zip(labels, is_control, strict=True) if not control], seed)
        if not fold:
            return None
        step = round(CALIBRATION_PHASE * total_steps)
        codes = [labels.index(label) for label in fold]
        conditions = self._calibration_conditions(codes, seed)
        held_out = self._held_out_cells(codes, conditions)
        # The fold reaches the first phase and the calibration prediction as an untrained condition
        # would: only through what the whole model knows (graph, labels), never through statistics
        # of its cells. One more pass over the data, once per anchored run.
        without = summarize_without(
            self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY),
            self._summary,
            self._codes(REGISTRY_KEYS.PERTURBATION_KEY),
            self._codes(REGISTRY_KEYS.CELL_TYPE_KEY),
            held_out,
            reference_cells_per_condition=self.init_params_["non_kwargs"]["mask_reference_cells"],
            seed=seed,
            doses=self._doses(),
        )
        # After the calibration step the fold trains like any perturbation, so the module gets the
        # statistics of all the data back (its conditions' moments are needed to impute their zeros,
        # and the scale changes, if at all, by the ratio of two extreme values, which that phase
        # absorbs as it absorbs the fold) -- but not the node features. Those stay fold-free for
        # good: a PCA with more conditions rotates and flips the basis of every gene's features,
        # which the GAT has learned on for 80% of the steps, and a gene asked at test time never has
        # its own response in its features either. The saved summary holds these features, so a
        # loaded model embeds genes as the trained one did.
        final = replace(self._summary, node_features=without.node_features)
        return _Calibration(self, fold, codes, conditions, step, seed, held_out, without, final)

    def _held_out_cells(self, codes: list[int], conditions: np.ndarray) -> np.ndarray:
        """Cells of the fold: those of its perturbation ``codes`` and of its ``conditions`` (code, cell type, dose)."""
        doses = self._doses()
        held_out = in_fold(
            torch.as_tensor(self._codes(REGISTRY_KEYS.PERTURBATION_KEY)),
            torch.as_tensor(self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)),
            None if doses is None else torch.as_tensor(doses),
            torch.as_tensor(list(codes), dtype=torch.long),
            torch.as_tensor(np.asarray(conditions, dtype=np.float64).reshape(-1, 3)),
        )
        return held_out.numpy()

    @contextlib.contextmanager
    def _summary_swapped(self, summary: TrainingSummary):
        """``summary`` in place of the model's for the duration (what prediction reads: graph features, references)."""
        saved = self._summary
        self._summary = summary
        try:
            yield
        finally:
            self._summary = saved

    def _calibration_conditions(self, fold_codes: list[int], seed: int) -> np.ndarray:
        """With doses, ``(perturbation code, cell type code, dose)`` rows also held out of the first phase.

        Drawn (:func:`~scdoloris.model._anchoring.calibration_conditions`) among the single
        perturbations outside the fold, at doses above 0.
        """
        doses = self._doses()
        if doses is None:
            return np.zeros((0, 3))
        codes = self._codes(REGISTRY_KEYS.PERTURBATION_KEY)
        labels, is_control = self._summary.perturbation_labels, self._summary.is_control
        single = np.array(
            [
                not control and len(split_perturbation(label, self.control_values)) == 1
                for label, control in zip(labels, is_control, strict=True)
            ]
        )
        rows = (codes < len(single)) & single[np.minimum(codes, len(single) - 1)] & ~np.isin(codes, fold_codes)
        rows &= doses > 0
        cells = np.stack([codes[rows], self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)[rows], doses[rows]], axis=1)
        return calibration_conditions(cells, seed)

    def _describe_conditions(self, conditions: np.ndarray) -> list[list]:
        """``[label, cell type, dose]`` of each ``(perturbation code, cell type code, dose)`` row."""
        labels, types = self._summary.perturbation_labels, self.cell_types
        return [[labels[int(p)], str(types[int(t)]), float(d)] for p, t, d in conditions]

    def _calibration_shifts(self, held: pd.DataFrame, chosen: dict, seed: int) -> dict:
        """The model's pseudobulk shift of each held-out ``(name, cell type)``, generated from control cells.

        One draw of ``CALIBRATION_CELLS`` sources per cell type (seeded), shared by its conditions,
        which are generated ``CALIBRATION_CONDITIONS_PER_CALL`` at a time: each source is inverted
        once per call and the bridge runs in full batches, instead of one small call per condition.
        """
        rng = np.random.default_rng(seed)
        sampling = (MASK_STRATEGIES[0], MASK_THRESHOLDS, MASK_REFERENCE_CONDITIONS)
        dosed = self._doses() is not None
        control_rows = self._control_rows()
        shifts = {}
        for cell_type in sorted({t for _, t in chosen}):
            names = [name for name, t in chosen if t == cell_type]
            # At most the cell type's controls: a draw with replacement would only repeat cells (and warn).
            n_controls = len(control_rows[cell_type])
            sources = self._sources(None, cell_type, min(CALIBRATION_CELLS, n_controls), rng)
            for start in range(0, len(names), CALIBRATION_CONDITIONS_PER_CALL):
                part = names[start : start + CALIBRATION_CONDITIONS_PER_CALL]
                first = [chosen[(name, cell_type)][0] for name in part]
                labels = held.loc[first, "label"].tolist()
                doses = [float(d) for d in held.loc[first, "dose"]] if dosed else None
                request = resolve_request(labels, self.control_values, dose=doses)
                assert len(request.perturbations) == len(part)  # one (label, dose) per name: one entry each
                inputs = self._perturbation_inputs(request, None)
                arrays, _ = self._generate(
                    request, inputs, sources, PREDICTION_N_STEPS, PREDICTION_BATCH_SIZE, sampling, seed, False
                )
                n = len(sources)
                source_mean = arrays["source"].mean(axis=0)
                for entry, name in enumerate(part):
                    generated = arrays["prediction"][entry * n : (entry + 1) * n]
                    shifts[(name, cell_type)] = generated.mean(axis=0) - source_mean
        return shifts

    def _calibrate(self, fold: list[str], held_out: np.ndarray, seed: int) -> dict:
        """Gates per kind of condition, from the fold's perturbations predicted by a model that never saw them.

        Run by :class:`_Calibration` with the fold-free summary in place (node features of the
        prediction's graph, reference cells of its masks); the anchor is fitted without the fold's
        cells and the source cells are controls, so the fold reaches the prediction only as its truth.
        """
        anchor = self._fit_anchor(~held_out, spread=False)  # the gates read its shifts and kinds only
        names = self._dosed_labels(np.arange(self.adata.n_obs))
        types = np.asarray(self.cell_types, dtype=object)[self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)]
        X = expression_matrix(self.adata, self._setup_args.get("layer"))
        doses = self._doses()
        labels = self._registered_labels()
        conditions = pd.DataFrame({"name": names, "type": types, "label": labels})
        conditions["dose"] = 0.0 if doses is None else doses
        held = conditions[held_out & ~np.isin(names, self.control_values)]  # fold cells at dose 0 are controls
        chosen = {key: rows for key, rows in held.groupby(["name", "type"], sort=True).groups.items()}
        chosen = {key: rows for key, rows in chosen.items() if len(rows) >= CALIBRATION_MIN_CELLS}
        if len(chosen) > CALIBRATION_MAX_CONDITIONS:
            keys = list(chosen)
            keep = np.random.default_rng([seed, 1]).choice(len(keys), CALIBRATION_MAX_CONDITIONS, replace=False)
            chosen = {keys[i]: chosen[keys[i]] for i in np.sort(keep)}
        model_shifts = self._calibration_shifts(held, chosen, seed)
        true, anchors, model, kinds = [], [], [], []
        for (name, cell_type), rows in chosen.items():
            control_mean = anchor.control_means_.loc[cell_type].to_numpy()
            true.append(read_rows(X, np.sort(np.asarray(rows))).mean(axis=0) - control_mean)
            model.append(model_shifts[(name, cell_type)])
            anchors.append(anchor.predict_shift([name], cell_type=cell_type).to_numpy()[0])
            kinds.append(anchor.kind(name, cell_type))
        names_seen = [str(name) for name, _ in chosen]
        types_seen = [str(cell_type) for _, cell_type in chosen]
        if not kinds:
            return {"gates": {}, "n_conditions": {}, "held_out": fold}
        statistics = gate_statistics(np.array(true), np.array(anchors), np.array(model))
        gates, counts = gates_from_statistics(statistics, kinds)
        logger.info("Calibrated on %d held-out conditions: gates %s", len(kinds), gates)
        # Per condition, what any gate rule needs (its kind and three numbers), for the record.
        record = {"name": names_seen, "cell_type": types_seen, "kind": list(kinds)}
        record |= {key: [float(v) for v in values] for key, values in statistics.items()}
        return {"gates": gates, "n_conditions": counts, "held_out": fold, "conditions": record}

    # ------------------------------------------------------------------ prediction
