"""The dose-aware molecule encoder: molecules at doses to a perturbation embedding (torch).

Its molecule features come from :class:`~scdoloris.perturbation.MoleculeFeatures` (RDKit, torch-free).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def dose_scale(dose: torch.Tensor | float | Sequence[float], max_dose: float) -> torch.Tensor:
    """Log-scaled dose, ``log1p(dose) / log1p(max_dose)``.

    It is exactly 0 at dose 0 (no effect, the control), 1 at ``max_dose``, strictly increasing and
    smooth for every dose >= 0, and defined for doses never seen in training, including above
    ``max_dose`` (where it exceeds 1 and grows logarithmically, so extrapolation stays tame). Doses
    keep the user's unit (sci-Plex3: nM); ``max_dose`` is usually the largest training dose. The
    ``+1`` makes the scale unit-dependent: with nM doses (10-10,000) it is close to ``log(dose)``,
    with doses far below 1 it is close to linear.

    Parameters
    ----------
    dose
        Doses, >= 0 and finite (any shape).
    max_dose
        A positive reference dose.

    Returns
    -------
    torch.Tensor
        A float tensor of the shape of ``dose`` (float32 unless ``dose`` is a floating tensor).

    Raises
    ------
    ValueError
        For a negative or non-finite dose, or ``max_dose <= 0``.

    Examples
    --------
    >>> dose_scale(torch.tensor([0.0, 10.0, 10000.0, 20000.0]), max_dose=10000.0)
    tensor([0.0000, 0.2603, 1.0000, 1.0753])
    """
    max_dose = float(max_dose)
    if not math.isfinite(max_dose) or max_dose <= 0:
        raise ValueError(f"max_dose must be a positive finite number, got {max_dose}.")
    dose = torch.as_tensor(dose)
    if not dose.is_floating_point():
        dose = dose.float()
    if dose.numel() and bool(((dose < 0) | ~torch.isfinite(dose)).any()):
        bad = dose[(dose < 0) | ~torch.isfinite(dose)].flatten()[:5].tolist()
        raise ValueError(f"Doses must be finite and >= 0 (0 is the control); got {bad}.")
    return torch.log1p(dose) / math.log1p(max_dose)


class MoleculeEncoder(nn.Module):
    """Embeds molecular perturbations (molecules at doses; combinations of any size).

    For a component, molecule ``m`` at dose ``d``::

        h = MLP1(features[m])                       # molecule embedding, (n_hidden,)
        s = dose_scale(d, max_dose)                  # log1p(d) / log1p(max_dose)
        e = s * MLP2(concat(h, s))                   # (n_output,)

    and a perturbation's embedding is the sum of its components' ``e``. The factor ``s`` makes the
    embedding exactly 0 at dose 0 (the control) and lets it vanish smoothly as the dose goes to 0;
    feeding ``s`` into ``MLP2`` together with ``h`` lets the shape of the dose response (its
    saturation, its direction at high dose) depend on the molecule rather than only its amplitude.
    All maps are smooth (SiLU), so the embedding varies continuously with dose and is defined at
    doses never seen in training. Padded components (molecule ``-1``) and rows without a molecule
    contribute exactly 0, and summing makes combinations permutation invariant. The output has the
    width of the gene/category encoder's so the two can be added.

    Parameters
    ----------
    features
        Fixed molecule features, ``(n_molecules, n_features)`` (see :class:`MoleculeFeatures`); kept
        as a buffer (follows the module across devices and into its state dict, never trained).
    n_hidden
        Width of the molecule embedding ``h``.
    n_output
        Width of the perturbation embedding.
    max_dose
        Reference dose of :func:`dose_scale` (usually the largest training dose).
    dropout
        Dropout in ``MLP1`` (regularises the use of the fingerprint bits when few drugs are seen).

    Examples
    --------
    >>> from scdoloris.perturbation import MoleculeFeatures
    >>> cache = MoleculeFeatures.from_smiles({"a": "CCO", "b": "c1ccccc1"}, n_bits=64)
    >>> encoder = MoleculeEncoder(torch.from_numpy(cache.features), n_hidden=16, n_output=8, max_dose=100.0)
    >>> rows, doses = cache.recipes([["a", "b"], [], ["a"]], [10.0, 0.0, 0.0])
    >>> out = encoder(torch.from_numpy(rows), torch.from_numpy(doses))
    >>> out.shape, bool((out[1:] == 0).all())
    (torch.Size([3, 8]), True)
    """

    def __init__(
        self,
        features: torch.Tensor,
        n_hidden: int = 256,
        n_output: int = 128,
        *,
        max_dose: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.ndim != 2:
            raise ValueError(f"features must be (n_molecules, n_features), got shape {tuple(features.shape)}.")
        dose_scale(0.0, max_dose)  # validates max_dose
        self.register_buffer("features", features)
        self.max_dose = float(max_dose)
        self.n_features = features.shape[1]
        self.n_output = n_output
        self.molecule_mlp = nn.Sequential(
            nn.Linear(self.n_features, n_hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(n_hidden, n_hidden),
            nn.SiLU(),
        )
        self.dose_mlp = nn.Sequential(nn.Linear(n_hidden + 1, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_output))

    def extra_repr(self) -> str:
        return f"n_molecules={self.features.shape[0]}, n_features={self.n_features}, max_dose={self.max_dose}"

    def forward(
        self, molecules: torch.Tensor, doses: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed perturbations.

        Parameters
        ----------
        molecules
            ``(batch, width)`` rows of ``features``, padded with ``-1``; a row of ``-1`` only is the
            control and gets the zero embedding.
        doses
            ``(batch, width)`` doses (>= 0, finite; the values at padded positions are ignored). A
            component at dose 0 contributes exactly 0.
        features
            Feature table the rows refer to (the buffer by default); pass the features of an extended
            :class:`MoleculeFeatures` to embed molecules added after training with the same weights.

        Returns
        -------
        torch.Tensor
            ``(batch, n_output)`` embeddings.
        """
        features = self.features if features is None else features.to(self.features)
        if molecules.ndim != 2 or doses.shape != molecules.shape:
            raise ValueError(
                f"molecules and doses must both be (batch, width); got {tuple(molecules.shape)} "
                f"and {tuple(doses.shape)}."
            )
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"features must be (n_molecules, {self.n_features}), got {tuple(features.shape)}.")
        molecules = molecules.long()
        present = molecules >= 0
        if molecules.numel() and int(molecules.max()) >= features.shape[0]:
            raise IndexError(f"Molecule row {int(molecules.max())} out of range for {features.shape[0]} molecules.")
        doses = torch.where(present, doses.to(features), torch.zeros((), dtype=features.dtype, device=features.device))
        scale = dose_scale(doses, self.max_dose)[..., None]  # 0 at padding and at dose 0
        out = features.new_zeros(molecules.shape[0], self.n_output)
        if not bool(present.any()):
            return out
        h = self.molecule_mlp(features[molecules.clamp(min=0)])
        e = scale * self.dose_mlp(torch.cat([h, scale], dim=-1))
        return out + torch.where(present[..., None], e, torch.zeros((), dtype=e.dtype, device=e.device)).sum(dim=1)
