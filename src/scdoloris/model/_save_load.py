"""Saving and loading :class:`~scdoloris.Doloris`: the model's verbs over ``model._persistence``'s file format.

``save`` writes a complete model beside its target and moves it into place; ``load`` verifies the
file, the class, the version and the set-up before building the model from its training summary.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from .._validation import check_same_genes
from .._version import __version__
from ..data import TrainingSummary
from ._persistence import read_model, write_model

if TYPE_CHECKING:
    from ._doloris import Doloris


class SaveLoadMixin:
    """``save`` and ``load`` of :class:`~scdoloris.Doloris` (scvi-tools' names and arguments)."""

    def save(
        self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False, **kwargs
    ):
        """Save the model to ``dir_path``.

        Writes ``model.pt``: the module's weights and the model's attributes (scvi-tools' registry,
        the training summary, ...) as tensors and plain data only, which :meth:`load` reads without
        unpickling any object. Writes to a temporary directory beside ``dir_path`` and moves it
        into place, so an interrupted save never leaves a half-written model; refuses an existing
        ``dir_path`` unless ``overwrite=True``, and even then one holding anything but a saved
        model (so that no other file is deleted). The old model is removed only once the new one
        is complete.

        Parameters
        ----------
        dir_path
            Directory to write (replaced as a whole).
        prefix
            File-name prefix.
        overwrite
            Replace an existing saved model at ``dir_path``.
        save_anndata
            Also save the registered AnnData (as ``adata.h5ad``).
        **kwargs
            Passed to :meth:`anndata.AnnData.write` (with ``save_anndata``).
        """
        dir_path = os.path.abspath(os.fspath(dir_path))
        prefix = prefix or ""
        if os.path.exists(dir_path):
            if not overwrite:
                raise ValueError(f"{dir_path} already exists; pass overwrite=True to replace it.")
            saved_files = {f"{prefix}{name}" for name in ("model.pt", "adata.h5ad", "mdata.h5mu")}
            if not os.path.isdir(dir_path) or not set(os.listdir(dir_path)) <= saved_files:
                raise ValueError(
                    f"{dir_path} is not a saved model (it holds other files); overwrite=True replaces only a saved "
                    "model, so that nothing else is deleted. Choose another dir_path."
                )
        parent = os.path.dirname(dir_path)
        os.makedirs(parent, exist_ok=True)
        self.scdoloris_version_ = __version__  # saved with the attributes; checked by load
        staging = tempfile.mkdtemp(prefix=".doloris-save-", dir=parent)
        try:
            new = os.path.join(staging, "model")
            os.makedirs(new)
            if save_anndata:
                self.adata.write(os.path.join(new, f"{prefix}adata.h5ad"), **kwargs)
            # scvi-tools' convention: the attributes to save are those whose names end in "_".
            attributes = {name: value for name, value in self._get_user_attributes() if name.endswith("_")}
            var_names = self.adata.var_names.astype(str)
            write_model(
                os.path.join(new, f"{prefix}model.pt"), self.module.state_dict(), attributes, var_names, target=dir_path
            )
            if os.path.exists(dir_path):
                old = os.path.join(staging, "previous")
                os.replace(dir_path, old)
            os.replace(new, dir_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        prefix: str | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ) -> Doloris:
        """Load a saved model; ``adata`` must have the model's genes in the same order.

        Nothing in the model file is executed: its tensors and data are read by torch's
        ``weights_only`` unpickler, which builds no other objects (models saved by earlier
        scdoloris versions also need a few numpy and pandas data types, and nothing else). A file
        that needs more is refused unread.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData organised like the training data (``None``: the one saved with the model). It may
            be a query set holding perturbations or cell types training never saw: the model
            predicts from its control cells (and refuses to train on it).
        prefix
            File-name prefix used when saving.
        accelerator, device
            Where to put the model, as in scvi-tools (``"auto"``: a GPU if there is one).

        Raises
        ------
        ValueError
            No saved model at ``dir_path``; a corrupted, truncated or foreign model file, or one
            that would need objects other than data to be read; a model of another class or of an
            incompatible scdoloris version; ``adata`` with other genes.
        """
        import anndata
        from scvi.model._utils import parse_device_args

        dir_path = os.fspath(dir_path)
        attr_dict, var_names, state_dict = cls._read_saved_model(dir_path, prefix)
        if adata is None:
            adata_path = os.path.join(dir_path, f"{prefix or ''}adata.h5ad")
            if not os.path.isfile(adata_path):
                raise ValueError(
                    f"{dir_path} holds no AnnData ({adata_path} does not exist): pass adata=, organised like the "
                    "training data, or save the model with save_anndata=True."
                )
            adata = anndata.read_h5ad(adata_path)
        check_same_genes(adata, var_names)
        registry = attr_dict.pop("registry_")
        # Registers adata as the model's was (same categories and codes), validated against that registry.
        # extend_categories: a query set may hold perturbations or cell types training never saw (they get
        # codes after the trained ones; prediction reads labels by name, training refuses them).
        cls.setup_anndata(adata, source_registry=registry, extend_categories=True, **registry["setup_args"])
        init_params = attr_dict.pop("init_params_")
        # Models saved before presets existed were trained and predict as the paper's method.
        init_params["non_kwargs"].setdefault("preset", "paper")
        summary = TrainingSummary(**attr_dict.pop("summary_"))
        model = cls._from_summary(adata, summary, **init_params["non_kwargs"])
        for name, value in attr_dict.items():  # history_, is_trained_, the data split, version, run name, ...
            if name.isidentifier() and not name.startswith("_") and not hasattr(cls, name):
                setattr(model, name, value)
        try:
            model.module.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(
                f"The weights in {dir_path} do not fit the model its attributes describe ({error}); the file is "
                "corrupted. Save the model again, or restore it from a backup."
            ) from error
        _, _, torch_device = parse_device_args(
            accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
        )
        model.to_device(torch_device)
        model.module.eval()
        return model

    @classmethod
    def _read_saved_model(cls, dir_path: str, prefix: str | None) -> tuple[dict, np.ndarray, dict]:
        """The attributes, genes and weights of a saved model, with clear errors for what cannot be loaded."""
        model_path = os.path.join(dir_path, f"{prefix or ''}model.pt")
        if not os.path.isfile(model_path):
            raise ValueError(
                f"No saved model at {dir_path}: {model_path} does not exist. Pass the directory written by "
                "Doloris.save (and its prefix=, if one was used)."
            )
        saved = read_model(model_path)  # ModelFileError (a ValueError) for damaged, foreign or unsafe files
        attr_dict = saved.attributes
        if not isinstance(attr_dict.get("registry_"), dict):
            raise ValueError(f"{model_path} is corrupted or truncated: it lacks the model's attributes.")
        model_name = attr_dict["registry_"].get("model_name")
        if model_name != cls.__name__:
            raise ValueError(f"{model_path} holds a {model_name} model, not a {cls.__name__}; load it with that class.")
        saved_version = attr_dict.get("scdoloris_version_")
        if saved_version is not None and saved_version != __version__:
            warnings.warn(
                f"{model_path} was saved by scdoloris {saved_version}; this is {__version__}.",
                UserWarning,
                stacklevel=3,
            )
        try:
            TrainingSummary(**attr_dict["summary_"])
            cls._check_saved_setup(attr_dict)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{model_path} was saved by scdoloris {saved_version or 'of an older version'}, whose model format "
                f"this version ({__version__}) cannot read ({error}). Install that version, or retrain the model."
            ) from error
        return attr_dict, saved.var_names, saved.state_dict

    @classmethod
    def _check_saved_setup(cls, attr_dict: dict) -> None:
        """The saved setup and model arguments are ones that :meth:`load` can pass on, and nothing else."""
        registry = attr_dict["registry_"]
        if registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
            raise ValueError(f"set up with {registry['setup_method_name']!r}, which this version does not repeat")
        setup_args, init_params = registry["setup_args"], attr_dict["init_params_"]
        if not isinstance(setup_args, dict) or not isinstance(init_params, dict):
            raise TypeError("the saved setup or model arguments are not dicts")
        if not isinstance(init_params.get("non_kwargs"), dict):
            raise TypeError("the saved model arguments are not a dict")
        if init_params.get("kwargs"):
            raise TypeError(f"unexpected keyword arguments {sorted(init_params['kwargs'])}")
        for method, given in [(cls.setup_anndata, setup_args), (cls.__init__, init_params["non_kwargs"])]:
            known = set(inspect.signature(method).parameters) - {"self", "adata", "kwargs"}
            unknown = sorted(set(given) - known)
            if unknown:
                raise TypeError(f"{method.__name__} has no argument(s) {unknown}")
