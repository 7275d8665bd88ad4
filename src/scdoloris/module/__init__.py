"""Torch modules of Doloris: they know tensors, not AnnData."""

from ._denoiser import Denoiser
from ._doloris import DolorisModule, GeneratedCells
from ._inputs import ModuleInputs
from ._mask_model import MaskModel
from ._mask_sampling import MaskReference, sample_activation_mask
from ._molecule_encoder import MoleculeEncoder, dose_scale
from ._perturbation_encoder import GraphTensors, PerturbationEncoder

__all__ = [
    "Denoiser",
    "DolorisModule",
    "GeneratedCells",
    "GraphTensors",
    "MaskModel",
    "MaskReference",
    "ModuleInputs",
    "MoleculeEncoder",
    "PerturbationEncoder",
    "dose_scale",
    "sample_activation_mask",
]
