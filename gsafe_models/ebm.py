r"""An energy-based model of the latents, trained by maximum likelihood with short-run Langevin chains.

:math:`p_\theta(z) \propto e^{-E_\theta(z)}` with :math:`E_\theta` a small MLP. The gradient of the
log-likelihood is :math:`\mathbb{E}_{model}[\nabla E] - \mathbb{E}_{data}[\nabla E]`; the model
expectation comes from Langevin chains (:func:`~gsafe_models.langevin.langevin_sample`) that start
from a persistent replay buffer, a few of them from noise at each step (Du & Mordatch 2019;
Nijkamp et al. 2019), with the stabilisers the literature uses: an :math:`L_2` penalty on the
energies, the chains' noise annealed during training (from a temperature above 1 down to 1, where
the chains are unadjusted Langevin samplers of :math:`e^{-E}`, so :math:`E` learns the scale of
:math:`-\log p`), a wide Gaussian tether :math:`|u|^2 / 2 s_0^2` in the energy so chains cannot run
off to infinity, and optionally spectral normalisation of the hidden layers (off by default: on the
2-D known-answer case of the tests it took the Spearman correlation of :math:`-E` with the true
:math:`\log p` from 0.94 to 0.46, a 1-Lipschitz feature map being too smooth for peaked densities
of standardised latents).

Larger energy = less likely = more anomalous: :meth:`LatentEBM.energy` is a statistic as it is,
and :math:`|E(z) - \mathbb{E}_{train}[E]|` its typicality (the normalising constant cancels).
:meth:`LatentEBM.sample` draws what the model calls normal.

References:
    | Implicit Generation and Generalization in Energy-Based Models (Du & Mordatch, 2019)
    | https://arxiv.org/abs/1903.08689
    | On the Anatomy of MCMC-Based Maximum Likelihood Learning of Energy-Based Models
    | (Nijkamp et al., 2019) https://arxiv.org/abs/1903.12370
    | Spectral Normalization for Generative Adversarial Networks (Miyato et al., 2018)
    | https://arxiv.org/abs/1802.05957
    | Generative Models and Applications for Safety in Machine Learning (Sénétaire, PhD thesis,
    | DTU, 2025)

Example:
    >>> z = torch.randn(512, 2) * torch.tensor([2.0, 0.5])
    >>> ebm = LatentEBM(2, hidden=(32, 32)).fit(z, steps=50, seed=0)
    >>> ebm.energy(z[:4]).shape
    torch.Size([4])
"""

from __future__ import annotations

__all__ = ["LatentEBM"]

import math

import torch
import torch.nn as nn

from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm

from .langevin import langevin_sample


class LatentEBM(nn.Module):
    r"""Creates an energy-based density of latents :math:`(N, D)`.

    Latents are standardised (`mean`, `std` buffers set by :meth:`fit`) before the network.

    Arguments:
        dim: :math:`D`.
        hidden: Widths of the MLP's hidden layers (SiLU: smooth gradients for Langevin).
        tether: :math:`s_0`, the width of the Gaussian tether in standardised units.
        spectral: Spectral normalisation of the hidden layers (Miyato et al. 2018).

    Example:
        >>> LatentEBM(3).energy(torch.zeros(5, 3)).shape
        torch.Size([5])
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (128, 128), tether: float = 3.0, spectral: bool = False) -> None:
        super().__init__()
        if dim < 1 or not hidden:
            raise ValueError(f"LatentEBM: dim={dim} must be >= 1 and hidden={hidden} non-empty")
        self.dim = int(dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.tether = float(tether)
        self.spectral = bool(spectral)
        self.net = self._build(seed=0)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))
        self.history: list[dict] = []

    def _build(self, seed: int) -> nn.Sequential:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            widths = (self.dim, *self.hidden)
            for a, b in zip(widths, widths[1:]):
                layers += [self._norm(nn.Linear(a, b)), nn.SiLU()]
            # the read-out stays free: it sets the energy's scale, which -log p needs (a 1-Lipschitz
            # energy cannot rise by the ~10 nats between a mode and its tails over a few units)
            layers.append(nn.Linear(widths[-1], 1))
            return nn.Sequential(*layers)

    def _norm(self, layer: nn.Linear) -> nn.Module:
        return spectral_norm(layer) if self.spectral else layer

    def config(self) -> dict:
        r"""Returns the constructor arguments, to rebuild the module before :py:`load_state_dict`."""

        return {"dim": self.dim, "hidden": list(self.hidden), "tether": self.tether, "spectral": self.spectral}

    def _energy_u(self, u: Tensor) -> Tensor:
        return self.net(u)[:, 0] + 0.5 * u.square().sum(1) / self.tether**2

    def energy(self, z: Tensor) -> Tensor:
        r"""Returns :math:`E(z)` :math:`(N,)` of latents :math:`(N, D)`, on `z`'s device (differentiable)."""

        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"LatentEBM.energy: z has shape {tuple(z.shape)}, expected (N, {self.dim})")
        u = (z.to(self.mean) - self.mean) / self.std
        return self._energy_u(u).to(z.device)

    def fit(
        self,
        z: Tensor,
        steps: int = 1500,
        batch_size: int = 128,
        lr: float = 1e-3,
        chain_steps: int = 20,
        step_size: float = 0.05,
        temperature: tuple[float, float] = (2.0, 1.0),
        buffer_size: int = 4096,
        reinit: float = 0.05,
        alpha: float = 0.1,
        seed: int = 0,
    ) -> "LatentEBM":
        r"""Fits the energy by maximum likelihood (persistent contrastive divergence) on `z`'s device.

        Each step draws `batch_size` data latents and as many chains from the replay buffer
        (a share `reinit` of them restarted from :math:`\mathcal{N}(0, I)`), runs `chain_steps`
        Langevin updates :math:`u \leftarrow u - \alpha_s \nabla E + \sqrt{2 \alpha_s T} \xi` on
        them, writes them back, and descends :math:`E(z^+) - E(u^-) + \alpha (E(z^+)^2 + E(u^-)^2)`.
        The temperature :math:`T` decays geometrically from `temperature[0]` to `temperature[1]`.

        Arguments:
            z: Training latents :math:`(N, D)`, finite.
            steps: Parameter updates.
            batch_size: Data latents and chains per update.
            lr: Adam's learning rate.
            chain_steps: Langevin updates per chain per step.
            step_size: :math:`\alpha_s`, the chains' gradient step, in standardised units.
            temperature: :math:`T` of the chains at the start and at the end of training (1: the
                chains sample :math:`e^{-E}`, so the energy is :math:`-\log p` up to a constant).
            buffer_size: Chains kept in the replay buffer.
            reinit: The share of chains restarted from noise at each step.
            alpha: The weight of the energy penalty.
            seed: Seeds the weights, the data order, the buffer and the chains.

        Returns:
            The module itself; `history` holds, every tenth of the way, the mean data and chain
            energies (their gap is the maximum-likelihood gradient's size).
        """

        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"LatentEBM.fit: z has shape {tuple(z.shape)}, expected (N, {self.dim})")
        if len(z) < 2 or not torch.isfinite(z).all():
            raise ValueError(f"LatentEBM.fit: {len(z)} latents, or some not finite; need >= 2 finite latents")
        device = z.device
        z = z.detach().to(torch.float32)
        self.net = self._build(seed)
        self.to(device)
        self.mean = z.mean(0)
        std = z.std(0)
        self.std = torch.where(std > 0, std, torch.ones_like(std))
        u_data = (z - self.mean) / self.std

        g = torch.Generator().manual_seed(seed)

        def noise_like(n: int) -> Tensor:
            return torch.randn(n, self.dim, generator=g).to(device)

        buffer = noise_like(buffer_size)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.5, 0.999))
        self.history = []
        n_data = len(u_data)
        for step in range(int(steps)):
            temp = temperature[0] * (temperature[1] / temperature[0]) ** min(1.0, 2 * step / max(steps - 1, 1))
            sigma = math.sqrt(2 * step_size * temp)
            idx = torch.randint(n_data, (min(batch_size, n_data),), generator=g).to(device)
            pos = u_data[idx]
            slots = torch.randint(buffer_size, (len(pos),), generator=g).to(device)
            start = buffer[slots]
            fresh = torch.rand(len(pos), generator=g).to(device) < reinit
            start = torch.where(fresh[:, None], noise_like(len(pos)), start)
            self.net.eval()  # spectral norm's power iteration only on parameter steps
            neg = langevin_sample(self._energy_u, start, chain_steps, step_size, noise=sigma, clip=0.1 / max(step_size, 1e-12),
                                  generator=g)
            buffer[slots] = neg
            self.net.train()
            e_pos, e_neg = self._energy_u(pos), self._energy_u(neg)
            loss = e_pos.mean() - e_neg.mean() + alpha * (e_pos.square().mean() + e_neg.square().mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                self.history.append({"step": step, "energy_data": float(e_pos.mean().detach()), "energy_chains": float(e_neg.mean().detach()),
                                     "temperature": temp})
        self.net.eval()
        return self

    def sample(self, n: int, steps: int = 500, step_size: float = 0.01, seed: int = 0) -> Tensor:
        r"""Returns :math:`n` latents :math:`(n, D)` drawn from :math:`e^{-E}` by unadjusted Langevin
        chains (noise :math:`\sqrt{2 \alpha_s}`) started from :math:`\mathcal{N}(0, I)` in standardised
        units: what the model calls normal."""

        g = torch.Generator().manual_seed(seed)
        device = self.mean.device
        start = torch.randn(n, self.dim, generator=g).to(device)
        was = self.training
        self.eval()
        u = langevin_sample(self._energy_u, start, steps, step_size, generator=g)
        self.train(was)
        return u * self.std + self.mean

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

