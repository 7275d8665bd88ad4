"""Torch modules of Doloris: they know tensors, not AnnData."""

from ._denoiser import Denoiser
from ._doloris import DolorisModule
from ._mask_model import MaskModel
from ._mask_sampling import MaskReference, sample_activation_mask

__all__ = ["Denoiser", "DolorisModule", "MaskModel", "MaskReference", "sample_activation_mask"]
