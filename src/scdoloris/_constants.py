from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    PERTURBATION_KEY: str = "perturbation"
    CELL_TYPE_KEY: str = "cell_type"
    DOSE_KEY: str = "dose"


REGISTRY_KEYS = _RegistryKeys()
