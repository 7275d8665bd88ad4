from __future__ import annotations

import torch
from torch import nn

from ..diffusion import GaussianDiffusion
from ..perturbation._encoder import GraphTensors, PerturbationEncoder
from ..perturbation._molecules import MoleculeEncoder
from ._denoiser import Denoiser, DenoiserCondition
from ._mask_model import MaskModel

# Floor of the per-gene spread in the skip parametrization ([0, 1] scale): a gene silent in the
# controls must still be able to move when a perturbation switches it on.
MIN_SIGMA_DATA = 0.02


class DolorisModule(nn.Module):
    """The torch side of Doloris: denoiser, mask model, perturbation encoders and the diffusion math.

    It knows tensors, not AnnData. Expression enters on the log1p scale and is divided by
    ``x_max`` here (paper Sec. 3.2).

    Parameters
    ----------
    n_genes
        Number of genes.
    n_cell_types
        Number of cell types.
    graph
        Gene graph tensors for the GAT.
    n_categories
        Perturbation components without a prior (learned embeddings).
    train_recipes
        ``(n_perturbation_codes, width)`` token rows of each registered perturbation label, ``-1``
        padded; control labels are all ``-1``.
    is_control
        ``(n_perturbation_codes,)`` whether a registered label is a control.
    control_mean, control_std
        ``(n_cell_types, genes)`` statistics of the training controls on the ``[0, 1]`` scale (Eq. 12).
    x_max
        Maximum of the training expression.
    n_hidden, n_blocks, n_hidden_mask, n_blocks_mask, n_perturbation, dropout
        Network sizes.
    n_timesteps
        Diffusion steps ``T``.
    full_source_loss
        Fit source (control) rows on all genes rather than only expressed ones (Eq. 9 masks them).
        With the masked loss the source model's predictions at a cell's zero genes are
        unconstrained, and the DDIM inversion turns them into latents far from Gaussian (measured on
        synthetic data: latent mean -6.6, std 11.7 instead of 0 and 1). Target rows keep Eq. 13.
    expressed_prior_mean, expressed_prior_std
        ``(n_cell_types, genes)`` moments of the nonzero values of each cell type's training cells,
        ``[0, 1]`` scale: the per-gene prior of the target model, which models expressed values.
    condition_lookup
        ``(n_perturbation_codes, n_cell_types, n_doses)`` row of each training condition in the two
        tables below, ``-1`` where it was not trained.
    expressed_mean, expressed_std
        ``(conditions, genes)`` moments of the nonzero values of each training condition, ``[0, 1]``
        scale, shrunk towards their cell type's where a condition has few nonzero values.
    impute_target_zeros
        Train the target model on perturbed cells whose zeros are replaced by draws from the
        condition's nonzero values (normal with the moments above); the loss stays on the truly
        expressed genes (Eq. 13). With zeros left in, the target model is never taught what to
        do where a trajectory runs through the zeros' region, and its generated values spread
        almost twice as wide as the real nonzero values (measured: per-gene std 0.87 vs 0.46 on
        synthetic data). Dense inputs make it a model of the expressed values, which the mask
        then zeroes (Sec. 3.6).
    molecule_features
        ``(n_molecules, features)`` structure features (Morgan fingerprints) of the trained molecules,
        or ``None`` without molecular perturbations.
    molecule_recipes
        ``(n_perturbation_codes, width)`` molecule rows of each registered label, ``-1`` padded.
    dose_values
        Sorted trained doses; a cell's dose code is its position here (all zeros without doses).
    impute_control_zeros
        At inference, replace the zeros of the real control cell by the cell type's control mean
        before using it as control information: in training that input is ``mu + sigma * eps``
        (Eq. 12), which has no zeros.

    Examples
    --------
    :class:`scdoloris.Doloris` builds it from its training summary. By hand: 10 genes, one cell
    type, an empty gene graph and two perturbations that are learned categories (labels
    ``control``, ``P1``, ``P2``), with small networks:

    >>> import torch
    >>> from scdoloris.perturbation._encoder import GraphTensors
    >>> empty_graph = GraphTensors(
    ...     torch.zeros(0, 32), torch.zeros(0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    ... )
    >>> module = DolorisModule(
    ...     n_genes=10,
    ...     n_cell_types=1,
    ...     graph=empty_graph,
    ...     n_categories=2,
    ...     train_recipes=torch.tensor([[-1], [0], [1]]),
    ...     is_control=torch.tensor([True, False, False]),
    ...     control_mean=torch.full((1, 10), 0.3),
    ...     control_std=torch.full((1, 10), 0.1),
    ...     x_max=5.0,
    ...     n_hidden=32,
    ...     n_blocks=1,
    ...     n_hidden_mask=16,
    ...     n_blocks_mask=1,
    ...     n_perturbation=8,
    ...     n_timesteps=100,
    ... )

    Training loss of a batch (log1p expression, perturbation and cell-type codes):

    >>> x = 5 * torch.rand(6, 10)
    >>> perturbation, cell_type = torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6, dtype=torch.long)
    >>> losses = module.loss(x, perturbation, cell_type)
    >>> sorted(losses)
    ['diffusion_loss', 'loss', 'mask_loss']

    Inference: invert two control cells, then bridge them to perturbation ``P1`` (``[0, 1]`` scale):

    >>> cell_type = torch.zeros(2, dtype=torch.long)
    >>> latent = module.encode_latent(x[:2], cell_type, n_steps=5)
    >>> embedding, mask_embedding = module.embed(torch.tensor([[0], [0]]))
    >>> module.bridge(latent, x[:2], cell_type, embedding, n_steps=5).shape
    torch.Size([2, 10])
    >>> module.activation_probabilities(x[:2], cell_type, mask_embedding).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        n_genes: int,
        n_cell_types: int,
        graph: GraphTensors,
        n_categories: int,
        train_recipes: torch.Tensor,
        is_control: torch.Tensor,
        control_mean: torch.Tensor,
        control_std: torch.Tensor,
        x_max: float,
        n_hidden: int = 512,
        n_blocks: int = 3,
        n_hidden_mask: int = 256,
        n_blocks_mask: int = 2,
        n_perturbation: int = 128,
        dropout: float = 0.1,
        n_timesteps: int = 500,
        expressed_prior_mean: torch.Tensor | None = None,
        expressed_prior_std: torch.Tensor | None = None,
        condition_lookup: torch.Tensor | None = None,
        expressed_mean: torch.Tensor | None = None,
        expressed_std: torch.Tensor | None = None,
        molecule_features: torch.Tensor | None = None,
        molecule_recipes: torch.Tensor | None = None,
        dose_values: torch.Tensor | None = None,
        full_source_loss: bool = True,
        impute_target_zeros: bool = True,
        impute_control_zeros: bool = True,
    ):
        super().__init__()
        self.full_source_loss = full_source_loss
        self.impute_control_zeros = impute_control_zeros
        self.impute_target_zeros = impute_target_zeros and expressed_mean is not None
        if self.impute_target_zeros:
            self.register_buffer("condition_lookup", condition_lookup.long())
            self.register_buffer("expressed_mean", expressed_mean.float())
            self.register_buffer("expressed_std", expressed_std.float())
        self.diffusion = GaussianDiffusion(n_timesteps)
        # A buffer, so it moves with the module once instead of being copied to the device every call.
        self.register_buffer("alphas_cumprod", self.diffusion.alphas_cumprod.float(), persistent=False)
        self.register_buffer("train_recipes", train_recipes.long())
        self.register_buffer("is_control", is_control.bool())
        self.register_buffer("control_mean", control_mean.float())
        self.register_buffer("control_std", control_std.float())
        self.register_buffer("x_max", torch.tensor(float(x_max)))
        # Per-gene prior of each model for the skip parametrization (Denoiser): source rows model
        # control cells, zeros included; target rows model expressed values when their zeros are imputed.
        if self.impute_target_zeros and expressed_prior_mean is not None:
            target_mean, target_std = expressed_prior_mean, expressed_prior_std
        else:
            target_mean, target_std = control_mean, control_std
        self.register_buffer("target_prior_mean", target_mean.float())
        self.register_buffer("target_prior_std", target_std.float().clamp(min=MIN_SIGMA_DATA))
        self.register_buffer("source_prior_std", control_std.float().clamp(min=MIN_SIGMA_DATA))
        # Separate encoders: the mask model is trained independently of the diffusion model (Sec. 3.7).
        self.encoder = PerturbationEncoder(graph, n_categories, n_output=n_perturbation)
        self.mask_encoder = PerturbationEncoder(graph, n_categories, n_output=n_perturbation)
        dose_values = torch.zeros(1) if dose_values is None else dose_values.float()
        self.register_buffer("dose_values", dose_values)
        self.has_molecules = molecule_features is not None
        if self.has_molecules:
            # The dose scale's unit is the largest trained dose (1 if doses are all below 1).
            max_dose = max(float(dose_values.max()), 1.0)
            self.register_buffer("molecule_recipes", molecule_recipes.long())
            self.molecule_encoder = MoleculeEncoder(molecule_features, n_output=n_perturbation, max_dose=max_dose)
            self.mask_molecule_encoder = MoleculeEncoder(molecule_features, n_output=n_perturbation, max_dose=max_dose)
        self.denoiser = Denoiser(n_genes, n_cell_types, n_perturbation, n_hidden, n_blocks, dropout)
        self.mask_model = MaskModel(n_genes, n_cell_types, n_perturbation, n_hidden_mask, n_blocks_mask, dropout)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.x_max.device

    def on_load(self, model, **kwargs):
        """Hook called by scvi-tools' ``load``; nothing to restore beyond the state dict."""

    def _condition(self, cell_type, is_target, perturbation, control) -> DenoiserCondition:
        """The denoiser's condition of these rows, with each row's skip-parametrization prior.

        Fixed along a DDIM trajectory: the samplers compute it once and call :meth:`_predict_x0`
        at every step.
        """
        target = is_target[:, None]
        prior = torch.where(target, self.target_prior_mean[cell_type], self.control_mean[cell_type])
        sigma = torch.where(target, self.target_prior_std[cell_type], self.source_prior_std[cell_type])
        return self.denoiser.condition(cell_type, is_target, perturbation, control, prior, sigma)

    def _predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: DenoiserCondition) -> torch.Tensor:
        """The denoiser with its skip-connected parametrization (see :class:`Denoiser`)."""
        return self.denoiser(x_t, t, condition, abar=self.alphas_cumprod[t])

    # ------------------------------------------------------------------ training
    def sample_control_information(self, cell_type: torch.Tensor) -> torch.Tensor:
        """``mu_ct + sigma_ct * eps`` (paper Eq. 12)."""
        mean = self.control_mean[cell_type]
        return mean + self.control_std[cell_type] * torch.randn_like(mean)

    def loss(
        self, x: torch.Tensor, perturbation: torch.Tensor, cell_type: torch.Tensor, dose: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Masked diffusion loss (Eq. 9, 13) and mask BCE (Eq. 14) of one batch.

        Parameters
        ----------
        x
            Log1p expression ``(n, genes)``.
        perturbation
            Registered perturbation codes ``(n,)``.
        cell_type
            Cell-type codes ``(n,)``.
        dose
            Dose per cell ``(n,)`` for molecular perturbations; a dose of 0 is unperturbed.
        """
        x0 = x / self.x_max
        is_target = ~self.is_control[perturbation]
        if dose is not None:
            dose = dose.reshape(-1).to(x0.dtype)
            is_target = is_target & (dose > 0)
        embedding, mask_embedding = self._training_embeddings(perturbation, dose)
        control = self.sample_control_information(cell_type)

        expressed = (x0 != 0).to(x0.dtype)
        if self.impute_target_zeros:
            x0 = self._impute_target_zeros(x0, perturbation, cell_type, dose, is_target)

        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)
        x_t = self.diffusion.q_sample(x0, t, torch.randn_like(x0))
        x0_hat = self._predict_x0(x_t, t, self._condition(cell_type, is_target, embedding, control))
        weight = (
            torch.where(is_target[:, None], expressed, torch.ones_like(expressed))
            if self.full_source_loss
            else expressed
        )
        per_cell = (weight * (x0 - x0_hat) ** 2).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        diffusion_loss = per_cell.mean()

        if is_target.any():
            logits = self.mask_model(control[is_target], cell_type[is_target], mask_embedding[is_target])
            mask_loss = nn.functional.binary_cross_entropy_with_logits(logits, expressed[is_target])
        else:
            mask_loss = x0.new_zeros(())
        return {"loss": diffusion_loss + mask_loss, "diffusion_loss": diffusion_loss, "mask_loss": mask_loss}

    def _training_embeddings(self, perturbation, dose) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of registered perturbations (and doses) for the denoiser and the mask model."""
        recipes = self.train_recipes[perturbation]
        embedding, mask_embedding = self.encoder(recipes), self.mask_encoder(recipes)
        if self.has_molecules:
            molecules = self.molecule_recipes[perturbation]
            doses = (dose if dose is not None else torch.ones_like(perturbation, dtype=embedding.dtype))[:, None]
            doses = doses.expand(-1, molecules.shape[1])
            embedding = embedding + self.molecule_encoder(molecules, doses)
            mask_embedding = mask_embedding + self.mask_molecule_encoder(molecules, doses)
        return embedding, mask_embedding

    def _dose_codes(self, dose: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if dose is None:
            return torch.zeros_like(like)
        return torch.searchsorted(self.dose_values, dose.contiguous()).clamp(max=len(self.dose_values) - 1)

    def _impute_target_zeros(self, x0, perturbation, cell_type, dose, is_target) -> torch.Tensor:
        """Zeros of perturbed cells replaced by draws from their condition's nonzero values."""
        condition = self.condition_lookup[perturbation, cell_type, self._dose_codes(dose, perturbation)].clamp(min=0)
        draw = self.expressed_mean[condition] + self.expressed_std[condition] * torch.randn_like(x0)
        fill = (is_target[:, None]) & (x0 == 0)
        return torch.where(fill, draw.clamp(0.0, 1.0), x0)

    # ------------------------------------------------------------------ inference
    def _source_predictor(self, cell_type: torch.Tensor):
        n = cell_type.shape[0]
        is_target = torch.zeros(n, dtype=torch.bool, device=cell_type.device)
        no_perturbation = torch.zeros(n, self.encoder.n_output, device=cell_type.device)
        no_control = torch.zeros(n, self.control_mean.shape[1], device=cell_type.device)
        condition = self._condition(cell_type, is_target, no_perturbation, no_control)

        def predict(x_t, t):
            return self._predict_x0(x_t, t, condition)

        return predict

    @torch.no_grad()
    def embed(
        self,
        recipes: torch.Tensor,
        graph: GraphTensors | None = None,
        molecules: torch.Tensor | None = None,
        doses: torch.Tensor | None = None,
        molecule_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Perturbation embeddings for the denoiser and the mask model (one GAT pass each).

        ``molecules`` and ``doses`` (``(n, width)``, ``-1`` / ``0`` padded) add the molecular part;
        ``molecule_features`` replaces the trained molecules' features when new ones were added.
        """
        embedding, mask_embedding = self.encoder(recipes, graph), self.mask_encoder(recipes, graph)
        if self.has_molecules and molecules is not None:
            embedding = embedding + self.molecule_encoder(molecules, doses, molecule_features)
            mask_embedding = mask_embedding + self.mask_molecule_encoder(molecules, doses, molecule_features)
        return embedding, mask_embedding

    @torch.no_grad()
    def encode_latent(
        self, x_control: torch.Tensor, cell_type: torch.Tensor, n_steps: int = 50, spacing: str = "quadratic"
    ) -> torch.Tensor:
        """DDIM inversion of control cells with the source conditioning (Eq. 15)."""
        return self.diffusion.invert(x_control / self.x_max, self._source_predictor(cell_type), n_steps, spacing)

    @torch.no_grad()
    def bridge(
        self,
        latent: torch.Tensor,
        x_control: torch.Tensor,
        cell_type: torch.Tensor,
        perturbation_embedding: torch.Tensor,
        n_steps: int = 50,
        spacing: str = "quadratic",
    ) -> torch.Tensor:
        """DDIM sampling from the latent with the target conditioning (Eq. 16), on the ``[0, 1]`` scale."""
        is_target = torch.ones(latent.shape[0], dtype=torch.bool, device=latent.device)
        control = self.control_information(x_control, cell_type)
        condition = self._condition(cell_type, is_target, perturbation_embedding, control)

        def predict(x_t, t):
            return self._predict_x0(x_t, t, condition)

        return self.diffusion.sample(latent, predict, n_steps, spacing)

    def control_information(self, x_control: torch.Tensor, cell_type: torch.Tensor) -> torch.Tensor:
        """The real source cell as control information at inference (replacing Eq. 12)."""
        control = x_control / self.x_max
        if self.impute_control_zeros:
            control = torch.where(control == 0, self.control_mean[cell_type], control)
        return control

    @torch.no_grad()
    def activation_probabilities(
        self, x_control: torch.Tensor, cell_type: torch.Tensor, mask_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Mask-model probabilities that each gene is expressed (Sec. 3.6)."""
        return torch.sigmoid(self.mask_model(self.control_information(x_control, cell_type), cell_type, mask_embedding))
