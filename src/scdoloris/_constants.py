from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    PERTURBATION_KEY: str = "perturbation"
    CELL_TYPE_KEY: str = "cell_type"
    DOSE_KEY: str = "dose"


REGISTRY_KEYS = _RegistryKeys()

# Mask samplers of predict_perturbation, the default first (module/_mask_sampling.py).
MASK_STRATEGIES = ("matched", "reference", "bernoulli")
# predict_perturbation's defaults, also what the calibration inside train() predicts with.
PREDICTION_N_STEPS = 50
PREDICTION_BATCH_SIZE = 1024
MASK_THRESHOLDS = (0.05, 0.95)
MASK_REFERENCE_CONDITIONS = 1
# How preset="anchored" makes its cells (scdoloris.model._anchoring.anchored_cells); the first is the default.
ANCHORED_CELLS = ("sources", "generated", "shifted")

# Prediction presets of Doloris, the default first (model/_anchoring.py): "paper" is the published method.
PRESETS = ("anchored", "paper")
