"""The prediction verbs of :class:`~scdoloris.Doloris`: ``predict_perturbation`` and ``get_latent_representation``.

A verb reads as: check the arguments, resolve the request, draw (or take) the source control cells,
one module call (inversion, bridge, mask probabilities), the masks drawn per condition, the
anchoring (preset ``"anchored"``), then the cells delivered as an AnnData or written in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from anndata import AnnData
from scvi.utils import track

from .._constants import (
    ANCHORED_CELLS,
    MASK_REFERENCE_CONDITIONS,
    MASK_STRATEGIES,
    MASK_THRESHOLDS,
    PREDICTION_BATCH_SIZE,
    PREDICTION_N_STEPS,
)
from .._validation import (
    check_count,
    check_expression,
    check_flags,
    check_output_size,
    check_prediction_args,
    check_same_genes,
)
from ..data import expression_matrix, read_rows
from ..module import MaskReference, sample_activation_mask
from ..prediction import (
    InplaceKeys,
    PredictedCells,
    Request,
    Sources,
    check_keys_free,
    check_source_cells,
    condition_stream,
    draw_controls,
    given_cells,
    predicted_anndata,
    resolve_cell_types,
    resolve_request,
    write_inplace,
)
from ._inputs import PerturbationInputs, perturbation_inputs
from ._seed import resolve_seed

if TYPE_CHECKING:
    from ._doloris import Doloris


# In-place predictions: layers[f"{key_added}_{p}"] with its _continuous and _mask (and, anchored, the
# paper's _generated cells), obsm[f"{key_added}_{p}_activation_prob"], and the shared obsm[f"{key_added}_latent"].
def _inplace_keys(key_added: str, anchored: bool, model_layers: bool = True) -> InplaceKeys:
    if not model_layers:
        return InplaceKeys(key_added, layers={"prediction": ""})
    generated = {"generated": "_generated"} if anchored else {}
    return InplaceKeys(
        key_added,
        layers={"prediction": "", "continuous": "_continuous", "mask": "_mask", **generated},
        obsm={"probs": "_activation_prob"},
        shared_obsm=("latent",),
    )


class _SourceBatches:
    """Source cells in batches of ``(log1p expression, cell-type codes)`` on ``device``, read when iterated."""

    def __init__(self, model: Doloris, sources: Sources, type_codes: torch.Tensor, batch_size: int, device):
        self.model, self.sources, self.type_codes = model, sources, type_codes
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return math.ceil(len(self.sources) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.sources), self.batch_size):
            rows = self.sources.rows[start : start + self.batch_size]
            x = self.model._expression_rows(self.sources.adata, rows).to(self.device)
            yield x, self.type_codes[start : start + self.batch_size]


class PredictionMixin:
    """Prediction verbs of :class:`~scdoloris.Doloris` (see the module docstring)."""

    def _expression_rows(self, adata: AnnData, rows: np.ndarray) -> torch.Tensor:
        """Rows of the registered layer of ``adata`` as a float32 tensor (only these rows are densified)."""
        return torch.as_tensor(read_rows(expression_matrix(adata, self._setup_args.get("layer")), rows, np.float32))

    def _perturbation_inputs(self, request: Request, smiles: dict[str, str] | None) -> PerturbationInputs:
        return perturbation_inputs(self._summary, request, smiles, self._setup_args.get("dose_key") is not None)

    def _sources(self, adata: AnnData | None, cell_type, n_cells: int, rng: np.random.Generator) -> Sources:
        """The control cells to start from: ``adata``'s cells, or a seeded draw of training controls."""
        if adata is not None:  # genes checked by predict_perturbation, values by given_cells
            return self._given_cells(adata, cell_type)
        types = resolve_cell_types(cell_type, self.cell_types)
        return draw_controls(self.adata, self._control_rows(), types, n_cells, rng)

    def _given_cells(self, adata: AnnData, cell_type) -> Sources:
        """``adata``'s cells as sources, by the rules for given cells (:func:`~scdoloris.prediction.given_cells`)."""
        setup = self._setup_args
        return given_cells(
            adata,
            setup.get("cell_type_key"),
            cell_type,
            self.cell_types,
            genes=self.adata.var_names,
            layer=setup.get("layer"),
        )

    def _mask_reference(self) -> MaskReference:
        """The summary's reference cells, built once per summary.

        The pools that ``mask_strategy="matched"`` derives from them are then reused across calls.
        """
        s = self._summary
        cached = self.__dict__.get("_mask_reference_cache")
        if cached is None or cached[0] is not s:
            n_genes = s.control_mean.shape[1]
            reference = MaskReference(
                s.condition_frequencies, s.condition_cell_type, s.reference_masks, s.reference_condition, n_genes
            )
            self._mask_reference_cache = cached = (s, reference)
        return cached[1]

    @torch.no_grad()
    def predict_perturbation(
        self,
        perturbations: str | Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        n_cells: int = 100,
        adata: AnnData | None = None,
        inplace: bool = False,
        key_added: str = "doloris",
        overwrite: bool = False,
        dose=None,
        smiles: dict[str, str] | None = None,
        n_steps: int = PREDICTION_N_STEPS,
        seed: int | None = None,
        batch_size: int = PREDICTION_BATCH_SIZE,
        mask_strategy: str = MASK_STRATEGIES[0],
        mask_thresholds: tuple[float, float] = MASK_THRESHOLDS,
        mask_reference_conditions: int = MASK_REFERENCE_CONDITIONS,
        anchored_cells: str = ANCHORED_CELLS[0],
        progress_bar: bool | None = None,
        include_sources: bool = False,
        model_layers: bool = True,
    ) -> AnnData | None:
        """Predict cells under perturbations, including ones never measured.

        Control cells are inverted once to the shared latent (paper Eq. 15) and re-generated under
        each perturbation (Eq. 16); the mask model silences genes (Sec. 3.6, A.11).

        Parameters
        ----------
        perturbations
            Labels such as ``"KLF1"`` or ``"KLF1+MAP2K6"``; genes need only be known to the gene graph.
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type (all have controls).
        n_cells
            Generated cells per perturbation and cell type, from that cell type's training controls
            (drawn with ``seed``; with replacement, and a UserWarning, only when a cell type has
            fewer controls).
        adata
            Control cells to use instead: one counterfactual per given cell and perturbation. Their
            cell type comes from the registered cell-type column when present, else ``cell_type``.
        inplace
            With ``adata``: write the counterfactuals into ``adata`` (``layers[f"{key_added}_{p}"]``,
            ``layers[f"{key_added}_{p}_continuous"]``, ``layers[f"{key_added}_{p}_mask"]``,
            ``obsm[f"{key_added}_{p}_activation_prob"]`` and ``obsm[f"{key_added}_latent"]``; anchored,
            also the paper's cells in ``layers[f"{key_added}_{p}_generated"]``) and return ``None``.
            ``p`` is the perturbation label, with ``_dose`` when dosed and any ``/`` written ``_`` (an
            h5ad file reads ``/`` as a folder); ``uns[f"{key_added}_keys"]`` lists each entry and its layer.
        key_added
            Prefix of the keys written in place.
        overwrite
            Allow replacing existing keys in place.
        dose
            Molecular perturbations: the dose of every perturbation (a number) or one per
            perturbation; written to ``obs["dose"]``. Doses never trained are fine.
        smiles
            ``{name: SMILES}`` for molecules not seen in training (not needed for trained molecules,
            nor for molecules in the model's ``molecule_table``).
        n_steps
            DDIM steps of the inversion and of the sampling.
        seed
            Seed of the control sampling and mask sampling; ``scvi.settings.seed`` by default.
        batch_size
            Cells per network call.
        mask_strategy
            ``"matched"`` (default): patterns of real training cells of the cell type, reweighted
            so that their gene frequencies follow the predicted probabilities, then adjusted per gene
            to match them exactly; ``"reference"`` (the paper's A.11 as we read it): each cell's zeros
            copied from a real training cell of the nearest training condition(s); ``"bernoulli"``:
            genes drawn independently (Eq. 23). See :func:`~scdoloris.module.sample_activation_mask`
            and BENCHMARKS.md for how they compare.
        mask_thresholds
            ``(low, high)`` probabilities that force a gene off / on.
        mask_reference_conditions
            Number of nearest training conditions forming the reference subset.
        anchored_cells
            ``preset="anchored"``: how its cells are made around the anchored mean. ``"sources"``
            (default): the source control cells, each gene moved to the anchored mean without
            filling zeros (its expressing cells move by their share of the change, and the rest is
            how many cells express it: silent cells switched on at real values, or expressing
            cells switched off). ``"generated"``: the generated cells of
            ``layers["doloris_generated"]`` moved the same way. ``"shifted"``: each source cell
            moved by the anchored shift (a gene's zeros become the shift; the earlier default,
            see the changelog). See docs/method.md, "The anchored prediction".
        progress_bar
            Show progress bars of the inversion and the generation; ``None``: only for long calls
            (more than 20,000 cell-steps, a few seconds on a CPU, i.e. cells x perturbations x ``n_steps``).
        include_sources
            Put the source control cells first in the result (their control label, ``is_predicted``
            ``False``), with a row in every layer and obsm: their own expression in the expression
            layers (``doloris_continuous``, ``doloris_generated``), ``expression != 0`` in
            ``doloris_mask``, their own latent in ``obsm["doloris_latent"]`` and NaN in
            ``obsm["doloris_activation_prob"]`` (they were not predicted under any perturbation). One
            plot then shows both: ``sc.pl.umap(pred, color="perturbation")``. Not with ``inplace``.
        model_layers
            ``False``: ``X`` only, without the diffusion and mask models' layers and obsm (the
            continuous output, mask, generated cells, latents and activation probabilities; in place,
            only ``layers[f"{key_added}_{p}"]``). With ``preset="anchored"`` and every gate of the asked
            conditions 0 (``uns["doloris_anchoring"]``), ``X`` does not depend on the network, which is
            then not run at all: the same ``X`` in a fraction of the time (a screen of many
            conditions). Otherwise the cells are generated as usual and only the layers are left out.

        Returns
        -------
        AnnData of predicted cells (``None`` in place): ``X`` on the input scale,
        ``layers["doloris_continuous"]`` (bridge output before the mask), ``layers["doloris_mask"]``,
        ``obsm["doloris_latent"]``, ``obsm["doloris_activation_prob"]``; ``obs`` with the
        perturbation, cell type, dose, source control cell (``control_cell``) and ``is_predicted``.
        With ``preset="anchored"`` (the default) ``X`` is the source cells moved to the anchored mean
        (``anchored_cells``; see the ``preset`` parameter of :class:`Doloris`),
        ``layers["doloris_generated"]`` holds the paper's generated cells (``mask * continuous``,
        Eq. 17), and ``uns["doloris_anchoring"]`` says
        for each perturbation and cell type which estimate anchored it (``kind``) and the share of the
        model's own shift taken (``gate``). With ``include_sources=True`` the source cells come first,
        with a row in every layer and obsm (see ``include_sources``).
        """
        self._check_if_trained(warn=True)
        self._check_registration()
        if inplace and adata is None:
            raise ValueError("inplace=True writes into the `adata` of control cells you pass; none was given.")
        if inplace and include_sources:
            raise ValueError(
                "include_sources=True returns the sources with the predictions; inplace=True returns None."
            )
        check_flags(inplace=inplace, overwrite=overwrite, include_sources=include_sources, model_layers=model_layers)
        check_flags(progress_bar=progress_bar, allow_none=True)
        check_prediction_args(
            n_cells=n_cells,
            n_steps=n_steps,
            batch_size=batch_size,
            mask_strategy=mask_strategy,
            mask_strategies=MASK_STRATEGIES,
            mask_thresholds=mask_thresholds,
            cells_given=adata is not None,
            dose=dose,
            dosed_model=self._setup_args.get("dose_key") is not None,
            smiles=smiles,
        )
        if adata is not None:  # its values are checked with the draw of sources (given_cells)
            check_source_cells(adata)
            check_same_genes(adata, self.adata.var_names)
        else:  # the model's own AnnData: it may have been edited since it was set up
            check_expression(self.adata, self._setup_args.get("layer"))
        if anchored_cells not in ANCHORED_CELLS:
            raise ValueError(f"anchored_cells must be one of {ANCHORED_CELLS}, got {anchored_cells!r}.")
        seed = resolve_seed(seed)
        request = resolve_request(perturbations, self.control_values, dose=dose)
        inputs = self._perturbation_inputs(request, smiles)
        anchored = self.preset == "anchored"
        # Before any cell is drawn: prediction, continuous, mask, probabilities and sources (and the
        # paper's cells, anchored), plus the output AnnData's copies.
        if adata is None:
            n_sources, lower = n_cells * len(resolve_cell_types(cell_type, self.cell_types)), "pass a smaller n_cells"
        else:
            n_sources, lower = adata.n_obs, "pass fewer control cells in adata"
        check_output_size(
            n_sources * len(request.perturbations),
            self.adata.n_vars,
            10 if anchored else 8,
            hint=f"{lower}, or predict fewer perturbations per call.",
        )
        sources = self._sources(adata, cell_type, n_cells, np.random.default_rng(seed))
        keys = _inplace_keys(key_added, anchored, model_layers)
        if inplace:
            check_keys_free(adata, request.names, keys, overwrite)

        plan = self._anchoring_plan(request, sources, inputs.renamed, anchored_cells, seed) if anchored else None
        if anchored and not model_layers and not self._needs_generated(plan):
            # X does not depend on the network: the sources themselves are all it needs.
            arrays, latents = {"source": self._expression_rows(sources.adata, sources.rows).numpy()}, None
        else:
            sampling = (mask_strategy, mask_thresholds, mask_reference_conditions)
            arrays, latents = self._generate(
                request, inputs, sources, n_steps, batch_size, sampling, seed, progress_bar
            )
        if anchored:
            arrays["generated"] = arrays.get("prediction")
            arrays["prediction"], used = self._anchored(plan, arrays["source"], arrays["generated"])
        if inplace:
            write_inplace(adata, request.names, keys, arrays, {"latent": latents})
            return None
        layers, obsm = {}, {}
        if model_layers:
            layers = {"doloris_continuous": arrays["continuous"], "doloris_mask": arrays["mask"]}
            if anchored:
                layers["doloris_generated"] = arrays["generated"]
            obsm = {
                "doloris_latent": np.tile(latents, (len(request.perturbations), 1)),
                "doloris_activation_prob": arrays["probs"],
            }
        uns = {}
        if inputs.aliases:
            # Genes asked by an old or alternative symbol, and the symbol they were read as.
            uns["doloris_gene_aliases"] = dict(inputs.aliases)
        if anchored:
            # Which estimate anchored each condition, and the share of the model's own shift taken.
            uns["doloris_anchoring"] = {column: used[column].tolist() for column in used.columns}
        predicted = PredictedCells(arrays["prediction"], uns=uns, layers=layers, obsm=obsm)
        setup = self._setup_args
        obs_keys = {
            "perturbation": setup["perturbation_key"],
            "cell_type": setup.get("cell_type_key"),
            "dose": setup.get("dose_key"),
        }
        return predicted_anndata(
            predicted,
            request,
            sources,
            self.adata.var,
            obs_keys=obs_keys,
            source_x=arrays["source"] if include_sources else None,
            control_label=self.control_values[0],
        )

    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        cell_type: str | None = None,
        n_steps: int = PREDICTION_N_STEPS,
        batch_size: int = PREDICTION_BATCH_SIZE,
    ) -> np.ndarray:
        """The shared Gaussian latent of cells: their DDIM inversion with the control model (paper Eq. 15).

        This is the latent every prediction starts from: a control cell's latent, re-generated under a
        perturbation, gives its counterfactual. It has one dimension per gene (a diffusion latent, not
        a compressed embedding), and for control cells it is close to a standard normal draw.

        Parameters
        ----------
        adata
            Cells to encode (the model's genes, log1p); ``None``: the model's own AnnData. Their cell
            types come from the registered cell-type column, else from ``cell_type``.
        indices
            Rows of ``adata`` to encode; ``None``: all.
        cell_type
            Cell type of all cells, for an ``adata`` without the cell-type column.
        n_steps
            DDIM steps of the inversion.
        batch_size
            Cells per network call.

        Returns
        -------
        numpy.ndarray
            ``(cells, genes)`` float32 latents, in the order of ``indices``.

        Examples
        --------
        >>> import scdoloris as sd
        >>> adata = sd.datasets.synthetic_perturbations(n_genes=10, n_perturbed_genes=2, n_doubles=0)
        >>> sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
        >>> model = sd.Doloris(adata, gene_graph=None, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
        >>> model.train(max_steps=2, enable_progress_bar=False)
        >>> adata.obsm["X_doloris"] = model.get_latent_representation(n_steps=5)
        >>> adata.obsm["X_doloris"].shape
        (540, 10)
        """
        self._check_if_trained(warn=True)
        self._check_registration()
        for name, value in {"n_steps": n_steps, "batch_size": batch_size}.items():
            check_count(name, value)
        if adata is None:
            adata = self.adata  # its values are checked again: it may have been edited since it was set up
        sources = self._given_cells(adata, cell_type)
        if indices is not None:
            selected = np.asarray(indices)
            if selected.size == 0 and selected.dtype != bool:
                selected = selected.astype(np.int64)  # [] reads as float, which numpy refuses as an index
            rows = np.arange(adata.n_obs)[selected]
            sources = Sources(rows, [sources.names[i] for i in rows], [sources.cell_types[i] for i in rows], adata)
        module, device = self.module, self.device
        module.eval()
        type_codes = torch.as_tensor([self.cell_types.index(t) for t in sources.cell_types], device=device)
        latents = [
            module.encode_latent(x, codes, n_steps).cpu()
            for x, codes in _SourceBatches(self, sources, type_codes, batch_size, device)
        ]
        if not latents:  # no cell selected: an empty (0, genes) array, as indexing gives
            return np.zeros((0, self.adata.n_vars), dtype=np.float32)
        return torch.cat(latents).numpy().astype(np.float32)

    def _generate(self, request, inputs, sources, n_steps, batch_size, sampling, seed, progress_bar):
        """The paper's generated cells for every entry and source (numpy, float32) and the sources' latents.

        The network runs in batches of ``batch_size`` pairs; the masks are drawn afterwards, per
        ``(condition, cell type)`` block from its own stream (:func:`~scdoloris.prediction.condition_stream`),
        so a condition's cells are the same whatever else is asked and however the pairs were batched.
        """
        module, device = self.module, self.device
        module.eval()
        embedding, mask_embedding = module.embed(*inputs.to(device))  # GAT once per call
        type_codes = torch.as_tensor([self.cell_types.index(t) for t in sources.cell_types], device=device)
        batches = _SourceBatches(self, sources, type_codes, batch_size, device)
        show = len(sources) * len(request.perturbations) * n_steps > 20_000 if progress_bar is None else progress_bar

        def progress(iterable, description):
            return track(iterable, description=description, disable=not show, style="tqdm")

        cells = module.generate(batches, embedding, mask_embedding, n_steps, batch_size, progress)
        continuous = cells.continuous.cpu().numpy().astype(np.float32)
        probabilities = cells.probabilities.cpu().float()
        mask = self._sample_masks(request, sources, probabilities, sampling, seed)
        return {
            "prediction": mask * continuous,
            "continuous": continuous,
            "mask": mask,
            "probs": probabilities.numpy(),
            "source": cells.source.cpu().numpy().astype(np.float32),
        }, cells.latent.cpu().numpy().astype(np.float32)

    def _sample_masks(self, request, sources, probabilities: torch.Tensor, sampling, seed: int) -> np.ndarray:
        """0/1 masks (float32) drawn from ``probabilities``, one stream per ``(condition, cell type)`` block."""
        mask_strategy, (low, high), mask_reference_conditions = sampling
        reference = self._mask_reference()
        types = np.asarray(sources.cell_types, dtype=object)
        n_sources = len(types)
        mask = np.empty(tuple(probabilities.shape), dtype=np.float32)
        for entry, condition in enumerate(request.conditions):
            for cell_type in dict.fromkeys(types):
                rows = entry * n_sources + np.flatnonzero(types == cell_type)
                codes = torch.full((len(rows),), self.cell_types.index(cell_type), dtype=torch.long)
                stream = condition_stream(seed, condition, str(cell_type), "mask")
                mask[rows] = sample_activation_mask(
                    probabilities[rows], codes, reference, stream, mask_strategy, high, low, mask_reference_conditions
                ).numpy()
        return mask
