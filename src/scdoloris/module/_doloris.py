from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion import GaussianDiffusion
from ._denoiser import Denoiser, DenoiserCondition
from ._inputs import ModuleInputs
from ._mask_model import MaskModel
from ._molecule_encoder import MoleculeEncoder
from ._perturbation_encoder import GraphTensors, PerturbationEncoder

# Floor of the per-gene spread in the skip parametrization ([0, 1] scale): a gene silent in the
# controls must still be able to move when a perturbation switches it on.
MIN_SIGMA_DATA = 0.02


# ``progress(iterable, description)``: wraps a loop in a progress bar (or returns it unchanged).
Progress = Callable[[Iterable, str], Iterable]


def _no_progress(iterable: Iterable, description: str) -> Iterable:
    return iterable


@dataclass
class GeneratedCells:
    """Output of :meth:`DolorisModule.generate`, one row per ``(perturbation, source cell)``, perturbations outermost.

    The mask is not drawn here: the caller draws it from ``probabilities`` (Eq. 17,
    :func:`~scdoloris.module.sample_activation_mask`), one random stream per condition, so that the
    cells of a condition do not depend on the batches they were computed in.

    Attributes
    ----------
    continuous
        The bridge output before the mask, log1p scale, clipped at 0.
    probabilities
        The mask model's activation probabilities.
    latent
        ``(sources, genes)`` shared latent of each source cell (Eq. 15), once per source.
    source
        ``(sources, genes)`` the source control cells, log1p scale.
    """

    continuous: torch.Tensor
    probabilities: torch.Tensor
    latent: torch.Tensor
    source: torch.Tensor


class DolorisModule(nn.Module):
    """The torch side of Doloris: denoiser, mask model, perturbation encoders and the diffusion math.

    It knows tensors, not AnnData. Expression enters on the log1p scale and is divided by
    ``x_max`` here (paper Sec. 3.2).

    Parameters
    ----------
    inputs
        What the module keeps of its training data (scale, control statistics, gene graph, label
        recipes, molecules, doses): see :class:`ModuleInputs`.
    n_hidden, n_blocks, n_hidden_mask, n_blocks_mask, n_perturbation, dropout
        Network sizes.
    n_timesteps
        Diffusion steps ``T``.
    full_source_loss
        Fit source (control) rows on all genes rather than only expressed ones (Eq. 9 masks them).
        With the masked loss the source model's predictions at a cell's zero genes are
        unconstrained, and the DDIM inversion turns them into latents far from Gaussian (measured on
        synthetic data: latent mean -6.6, std 11.7 instead of 0 and 1). Target rows keep Eq. 13.
    impute_target_zeros
        Train the target model on perturbed cells whose zeros are replaced by draws from the
        condition's nonzero values (normal with the condition's moments, see :class:`ModuleInputs`);
        the loss stays on the truly expressed genes (Eq. 13). With zeros left in, the target model is
        never taught what to do where a trajectory runs through the zeros' region, and its generated values spread
        almost twice as wide as the real nonzero values (measured: per-gene std 0.87 vs 0.46 on
        synthetic data). Dense inputs make it a model of the expressed values, which the mask
        then zeroes (Sec. 3.6).
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
    >>> from scdoloris.module import GraphTensors, ModuleInputs
    >>> inputs = ModuleInputs(
    ...     x_max=5.0,
    ...     control_mean=torch.full((1, 10), 0.3),
    ...     control_std=torch.full((1, 10), 0.1),
    ...     graph=GraphTensors.empty(),
    ...     n_categories=2,
    ...     train_recipes=torch.tensor([[-1], [0], [1]]),
    ...     is_control=torch.tensor([True, False, False]),
    ... )
    >>> module = DolorisModule(
    ...     inputs, n_hidden=32, n_blocks=1, n_hidden_mask=16, n_blocks_mask=1, n_perturbation=8, n_timesteps=100
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
        inputs: ModuleInputs,
        n_hidden: int = 512,
        n_blocks: int = 3,
        n_hidden_mask: int = 256,
        n_blocks_mask: int = 2,
        n_perturbation: int = 128,
        dropout: float = 0.1,
        n_timesteps: int = 500,
        full_source_loss: bool = True,
        impute_target_zeros: bool = True,
        impute_control_zeros: bool = True,
    ):
        super().__init__()
        self.full_source_loss = full_source_loss
        self.impute_control_zeros = impute_control_zeros
        self.impute_target_zeros = impute_target_zeros and inputs.expressed_mean is not None
        if self.impute_target_zeros:
            self.register_buffer("condition_lookup", inputs.condition_lookup.long())
            self.register_buffer("expressed_mean", inputs.expressed_mean.float())
            self.register_buffer("expressed_std", inputs.expressed_std.float())
        self.diffusion = GaussianDiffusion(n_timesteps)
        # A buffer, so it moves with the module once instead of being copied to the device every call.
        self.register_buffer("alphas_cumprod", self.diffusion.alphas_cumprod.float(), persistent=False)
        self.register_buffer("train_recipes", inputs.train_recipes.long())
        self.register_buffer("is_control", inputs.is_control.bool())
        control_mean, control_std = inputs.control_mean.float(), inputs.control_std.float()
        self.register_buffer("control_mean", control_mean)
        self.register_buffer("control_std", control_std)
        self.register_buffer("x_max", torch.tensor(float(inputs.x_max)))
        # Per-gene prior of each model for the skip parametrization (Denoiser): source rows model
        # control cells, zeros included; target rows model expressed values when their zeros are imputed.
        if self.impute_target_zeros and inputs.expressed_prior_mean is not None:
            target_mean, target_std = inputs.expressed_prior_mean, inputs.expressed_prior_std
        else:
            target_mean, target_std = control_mean, control_std
        self.register_buffer("target_prior_mean", target_mean.float())
        self.register_buffer("target_prior_std", target_std.float().clamp(min=MIN_SIGMA_DATA))
        self.register_buffer("source_prior_std", control_std.clamp(min=MIN_SIGMA_DATA))
        # Separate encoders: the mask model is trained independently of the diffusion model (Sec. 3.7).
        graph, n_categories = inputs.graph, inputs.n_categories
        self.encoder = PerturbationEncoder(graph, n_categories, n_output=n_perturbation)
        self.mask_encoder = PerturbationEncoder(graph, n_categories, n_output=n_perturbation)
        dose_values = torch.zeros(1) if inputs.dose_values is None else inputs.dose_values.float()
        self.register_buffer("dose_values", dose_values)
        self.has_molecules = inputs.molecule_features is not None
        if self.has_molecules:
            # The dose scale's unit is the largest trained dose (1 if doses are all below 1).
            max_dose = max(float(dose_values.max()), 1.0)
            features = inputs.molecule_features
            self.register_buffer("molecule_recipes", inputs.molecule_recipes.long())
            self.molecule_encoder = MoleculeEncoder(features, n_output=n_perturbation, max_dose=max_dose)
            self.mask_molecule_encoder = MoleculeEncoder(features, n_output=n_perturbation, max_dose=max_dose)
        n_genes, n_cell_types = inputs.n_genes, inputs.n_cell_types
        self.denoiser = Denoiser(n_genes, n_cell_types, n_perturbation, n_hidden, n_blocks, dropout)
        self.mask_model = MaskModel(n_genes, n_cell_types, n_perturbation, n_hidden_mask, n_blocks_mask, dropout)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.x_max.device

    @torch.no_grad()
    def load_statistics(self, inputs: ModuleInputs) -> None:
        """Replace what the module keeps of its training data by ``inputs``' (same labels, cell types, doses).

        The buffers that are statistics of the expression -- the scale, the control moments and
        priors, the conditions' nonzero moments and the graph's node features -- are replaced by
        copies (on the buffers' device and dtype); the weights are untouched. A condition of this
        module that ``inputs`` lacks (a calibration fold's, see ``Doloris.train``) gets its cell
        type's prior, the moments of a condition with no cells of its own.
        """
        control_mean, control_std = inputs.control_mean.float(), inputs.control_std.float()
        if self.impute_target_zeros and inputs.expressed_prior_mean is not None:
            target_mean, target_std = inputs.expressed_prior_mean.float(), inputs.expressed_prior_std.float()
        else:
            target_mean, target_std = control_mean, control_std
        values = {
            "x_max": torch.tensor(float(inputs.x_max)),
            "control_mean": control_mean,
            "control_std": control_std,
            "target_prior_mean": target_mean,
            "target_prior_std": target_std.clamp(min=MIN_SIGMA_DATA),
            "source_prior_std": control_std.clamp(min=MIN_SIGMA_DATA),
        }
        if self.impute_target_zeros:
            mine = self.condition_lookup.cpu()
            keys = torch.nonzero(mine >= 0, as_tuple=True)  # (label, cell type, dose code) of each row
            theirs = inputs.condition_lookup.long()[keys]
            present, rows, cell_type = (theirs >= 0)[:, None], mine[keys], keys[1]
            for name, table, prior in [
                ("expressed_mean", inputs.expressed_mean, target_mean),
                ("expressed_std", inputs.expressed_std, target_std),
            ]:
                value = torch.empty(getattr(self, name).shape)
                value[rows] = torch.where(present, table.float()[theirs.clamp(min=0)], prior[cell_type])
                values[name] = value
        for name, value in values.items():
            self._replace_buffer(self, name, value)
        for graph in {id(e.graph): e.graph for e in (self.encoder, self.mask_encoder)}.values():
            self._replace_buffer(graph, "node_features", inputs.graph.node_features)

    @staticmethod
    def _replace_buffer(owner: nn.Module, name: str, value: torch.Tensor) -> None:
        # A new tensor, not an in-place copy: the buffers a module is built with may share memory
        # with the arrays of the summary they came from (torch.as_tensor), which must not change.
        old = getattr(owner, name)
        setattr(owner, name, value.to(device=old.device, dtype=old.dtype).clone())

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
        self,
        x: torch.Tensor,
        perturbation: torch.Tensor,
        cell_type: torch.Tensor,
        dose: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
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
        weight
            Optional 0/1 weight per cell ``(n,)``: cells of weight 0 count in neither loss.
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
        genes = (
            torch.where(is_target[:, None], expressed, torch.ones_like(expressed))
            if self.full_source_loss
            else expressed
        )
        per_cell = (genes * (x0 - x0_hat) ** 2).sum(dim=1) / genes.sum(dim=1).clamp(min=1.0)
        if weight is None:
            diffusion_loss = per_cell.mean()
            masked = is_target
        else:
            diffusion_loss = (per_cell * weight).sum() / weight.sum().clamp(min=1.0)
            masked = is_target & (weight > 0)

        if masked.any():
            logits = self.mask_model(control[masked], cell_type[masked], mask_embedding[masked])
            mask_loss = nn.functional.binary_cross_entropy_with_logits(logits, expressed[masked])
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

    @torch.no_grad()
    def generate(
        self,
        sources: Iterable[tuple[torch.Tensor, torch.Tensor]],
        embedding: torch.Tensor,
        mask_embedding: torch.Tensor,
        n_steps: int = 50,
        batch_size: int = 1024,
        progress: Progress = _no_progress,
    ) -> GeneratedCells:
        """Predicted cells of every source cell under every perturbation: inversion, bridge, mask probabilities.

        Each source cell is inverted once (Eq. 15; its latent does not depend on the perturbation,
        paper A.4), then every ``(perturbation, source)`` pair is bridged under the target
        conditioning (Eq. 16) and given its activation probabilities (Eq. 17's ``M_hat`` is drawn
        from them by the caller), ``batch_size`` pairs per network call. Input and
        output are on the log1p scale: the division by ``x_max`` and the multiplication back both
        happen here.

        Parameters
        ----------
        sources
            Batches of ``(log1p control expression, cell-type codes)`` on this module's device.
        embedding, mask_embedding
            ``(perturbations, n_perturbation)`` embeddings from :meth:`embed`.
        n_steps
            DDIM steps of the inversion and of the sampling.
        batch_size
            Pairs per network call.
        progress
            ``progress(iterable, description)``, e.g. a progress bar.
        """
        controls, cell_types, latents = [], [], []
        for x, cell_type in progress(sources, "Inverting controls"):
            controls.append(x)
            cell_types.append(cell_type)
            latents.append(self.encode_latent(x, cell_type, n_steps))
        controls, cell_types, latents = torch.cat(controls), torch.cat(cell_types), torch.cat(latents)

        n_sources = controls.shape[0]
        n_jobs = n_sources * embedding.shape[0]
        outputs: dict[str, list[torch.Tensor]] = {"continuous": [], "probabilities": []}
        for start in progress(range(0, n_jobs, batch_size), "Generating"):
            jobs = torch.arange(start, min(start + batch_size, n_jobs), device=controls.device)
            p_index, s_index = jobs // n_sources, jobs % n_sources
            x_c, cell_type = controls[s_index], cell_types[s_index]
            continuous = self.bridge(latents[s_index], x_c, cell_type, embedding[p_index], n_steps)
            outputs["continuous"].append(continuous.clamp(min=0.0) * self.x_max)
            outputs["probabilities"].append(self.activation_probabilities(x_c, cell_type, mask_embedding[p_index]))
        continuous, probabilities = torch.cat(outputs["continuous"]), torch.cat(outputs["probabilities"])
        return GeneratedCells(continuous, probabilities, latents, controls)
