"""What the model reads from its registered AnnData: setup arguments, codes, doses, labels, controls.

And the check that the registration is still the model's own (:meth:`RegistryMixin._check_registration`).

:class:`RegistryMixin` holds the accessors of scvi-tools' registry that training, calibration,
anchoring and prediction share, so that each rule (which cells are controls, which labels a query
added) is written once.
"""

from __future__ import annotations

import numpy as np
from scvi.data._constants import _SCVI_UUID_KEY

from .._constants import REGISTRY_KEYS


class RegistryMixin:
    """Accessors of :class:`~scdoloris.Doloris`'s registered data (see the module docstring)."""

    @property
    def _setup_args(self) -> dict:
        return self.adata_manager.registry["setup_args"]

    def _codes(self, key: str) -> np.ndarray:
        return np.asarray(self.adata_manager.get_from_registry(key)).reshape(-1).astype(np.int64)

    def _doses(self) -> np.ndarray | None:
        if self._setup_args.get("dose_key") is None:
            return None
        return np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.DOSE_KEY), dtype=np.float32).reshape(-1)

    def _registered_categories(self, key: str) -> list[str]:
        """The registered labels of ``key``, as text, in code order (a query's new labels after the trained)."""
        return [str(v) for v in self.adata_manager.get_state_registry(key).categorical_mapping]

    def _registered_labels(self) -> np.ndarray:
        """Perturbation label of every cell of the model's AnnData (a query's new labels included)."""
        labels = np.asarray(self._registered_categories(REGISTRY_KEYS.PERTURBATION_KEY), dtype=object)
        return labels[self._codes(REGISTRY_KEYS.PERTURBATION_KEY)]

    def _cell_is_control(self) -> np.ndarray:
        """Whether each cell of the model's AnnData carries a control label (a query's new labels are not)."""
        codes = self._codes(REGISTRY_KEYS.PERTURBATION_KEY)
        known = self._summary.is_control
        return np.where(codes < len(known), known[np.minimum(codes, len(known) - 1)], False)

    def _new_labels(self) -> dict[str, list[str]]:
        """Perturbations and cell types of the model's AnnData that training never saw (a query loaded onto it)."""
        new = {}
        for key, trained in [
            (REGISTRY_KEYS.PERTURBATION_KEY, self._summary.perturbation_labels),
            (REGISTRY_KEYS.CELL_TYPE_KEY, self._summary.cell_types),
        ]:
            extra = self._registered_categories(key)[len(trained) :]
            if extra:
                new[key] = extra
        return new

    def _control_rows(self) -> dict[str, np.ndarray]:
        """Rows of the model's AnnData holding each cell type's control cells (the one place they are found)."""
        type_codes = self._codes(REGISTRY_KEYS.CELL_TYPE_KEY)
        is_control = self._cell_is_control()
        return {name: np.flatnonzero(is_control & (type_codes == i)) for i, name in enumerate(self.cell_types)}

    def _check_registration(self) -> None:
        """Refuse to read ``self.adata`` after another ``setup_anndata`` re-registered it differently.

        scvi-tools keeps the codes it reads in ``adata.obs``; a second ``setup_anndata`` with another
        column (or relabelled cells) rewrites them, and the model would read perturbed cells as controls.
        """
        # scvi-tools' class-wide store is keyed by the uuid in ``uns``, which a copy shares: after
        # ``setup_anndata(adata.copy())`` the entry holds the copy's manager. Only a manager of this
        # very object tells that it was set up again.
        uuid = self.adata.uns.get(_SCVI_UUID_KEY)
        latest = type(self)._setup_adata_manager_store.get(uuid) if uuid is not None else None
        if latest is None or latest is self.adata_manager or latest.adata is not self.adata:
            return
        mine, theirs = self.adata_manager, latest
        changed = [
            name
            for name, a, b in [
                ("setup arguments", mine.registry["setup_args"], theirs.registry["setup_args"]),
                *(
                    (key, mine.get_state_registry(key).to_dict(), theirs.get_state_registry(key).to_dict())
                    for key in (REGISTRY_KEYS.PERTURBATION_KEY, REGISTRY_KEYS.CELL_TYPE_KEY)
                ),
            ]
            if repr(a) != repr(b)
        ]
        if changed:
            raise ValueError(
                f"This model's AnnData was set up again (setup_anndata) after the model was built, and its "
                f"{', '.join(changed)} changed; the model would read the new registration as its own. Call "
                f"Doloris.setup_anndata(adata, **{mine.registry['setup_args']!r}) again before using this model, "
                "or set up a copy (adata.copy()) for the other use."
            )
