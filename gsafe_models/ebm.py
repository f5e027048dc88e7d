r"""An energy-based model of the latents, trained by maximum likelihood with short-run Langevin chains.

:math:`p_\theta(z) \propto e^{-E_\theta(z)}` with :math:`E_\theta` a small MLP. The gradient of the
log-likelihood is :math:`\mathbb{E}_{model}[\nabla E] - \mathbb{E}_{data}[\nabla E]`; the model
expectation comes from Langevin chains (:func:`~gsafe_models.langevin.langevin_sample`) that start
from a persistent replay buffer, a few of them from noise at each step (Du & Mordatch 2019;
Nijkamp et al. 2019), with the stabilisers the literature uses:

- an :math:`L_2` penalty :math:`\alpha (E^2_+ + E^2_-)` on the energies; :math:`\alpha = 0.01`
  (measured on 32-D autoencoder latents: at 0.1 the penalty kept data and chains within a few nats
  of each other, too little to confine 13 whitened dimensions, and the chains drifted to 60 times
  the data's :math:`|u|^2`; at 0.001 the energies diverged);
- the chains' noise annealed (a temperature from 2 down to 1 over the first half; at 1 the chains
  are unadjusted Langevin samplers of :math:`e^{-E}`, so :math:`E` learns the scale of
  :math:`-\log p`);
- a Gaussian base :math:`|u|^2 / 2 s_0^2` in the energy (a product of experts with the network;
  :math:`s_0 = 1`, the whitened data's own scale), so chains cannot run off to infinity and far
  from the data the energy stays high;
- latents whitened on their principal subspace, the directions off it (autoencoder latents are
  thin: a few directions hold nearly all the variance) given a Gaussian energy, as probabilistic
  PCA does;
- optionally spectral normalisation of the hidden layers (off by default: on the 2-D known-answer
  case of the tests it took the Spearman correlation of :math:`-E` with the true :math:`\log p`
  from 0.94 to 0.46, a 1-Lipschitz feature map being too smooth for peaked densities).

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

CHAINS_KEPT = 256  # persistent chains kept with a fitted model

import math

import torch
import torch.nn as nn

from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm

from .langevin import langevin_sample


class LatentEBM(nn.Module):
    r"""Creates an energy-based density of latents :math:`(N, D)`.

    The network sees the latents' principal coordinates, whitened (:meth:`fit` sets them); the
    directions off the principal subspace get a Gaussian energy (probabilistic PCA's).

    Arguments:
        dim: :math:`D`.
        hidden: Widths of the MLP's hidden layers (SiLU: smooth gradients for Langevin).
        tether: :math:`s_0`, the width of the Gaussian base in whitened units.
        spectral: Spectral normalisation of the hidden layers (Miyato et al. 2018).

    Example:
        >>> LatentEBM(3).energy(torch.zeros(5, 3)).shape
        torch.Size([5])
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (128, 128), tether: float = 1.0, spectral: bool = False) -> None:
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
        # Latents of a trained autoencoder lie near a thin subspace (a few principal directions hold
        # nearly all the variance, the rest ~1e-6 of it): chains in all D directions never find the
        # data. So the network sees the principal coordinates u = W (z - mean), whitened (`keep`
        # marks them; W's other rows are 0), and the rest of z, the residual P (z - mean) off the
        # principal subspace, gets an isotropic Gaussian energy of variance `residual_var` (as
        # probabilistic PCA's): leaving the manifold costs what it should.
        self.register_buffer("whiten", torch.eye(self.dim))
        self.register_buffer("colour", torch.eye(self.dim))
        self.register_buffer("keep", torch.ones(self.dim))
        self.register_buffer("off", torch.zeros(self.dim, self.dim))
        self.register_buffer("residual_var", torch.ones(()))
        # a sample of the persistent chains at the end of training (whitened units): what the
        # model called normal while it learned, where :meth:`sample` starts its chains
        self.register_buffer("chains", torch.zeros(CHAINS_KEPT, self.dim))
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
        # coordinates outside the principal subspace are unused: standard normal under the chains
        k = self.keep.to(u)
        kept = u * k
        return self.net(kept)[:, 0] + 0.5 * kept.square().sum(1) / self.tether**2 + 0.5 * (u * (1 - k)).square().sum(1)

    def energy(self, z: Tensor) -> Tensor:
        r"""Returns :math:`E(z)` :math:`(N,)` of latents :math:`(N, D)`, on `z`'s device (differentiable):
        the network's energy of the whitened principal coordinates plus
        :math:`|P(z - \bar z)|^2 / 2\sigma_r^2` off the principal subspace."""

        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"LatentEBM.energy: z has shape {tuple(z.shape)}, expected (N, {self.dim})")
        d = z.to(self.mean) - self.mean
        off = (d @ self.off.T).square().sum(1) / (2 * self.residual_var)
        return (self._energy_u(d @ self.whiten.T) + off).to(z.device)

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
        alpha: float = 0.01,
        principal: float = 1e-6,
        start_from: str = "noise",
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
            step_size: :math:`\alpha_s`, the chains' gradient step, in whitened units.
            temperature: :math:`T` of the chains at the start and at the end of training (1: the
                chains sample :math:`e^{-E}`, so the energy is :math:`-\log p` up to a constant).
            buffer_size: Chains kept in the replay buffer.
            reinit: The share of chains restarted from noise at each step.
            alpha: The weight of the energy penalty.
            principal: The principal subspace holds the directions whose variance exceeds this
                share of the largest.
            start_from: Where chains start and restart: `"noise"` (:math:`\mathcal{N}(0, I)`, Du &
                Mordatch 2019) or `"data"` (training latents, jittered: persistent contrastive
                divergence from the data).
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
        cov = torch.cov(z.T.double()).reshape(self.dim, self.dim)
        self.std = cov.diagonal().sqrt().clamp_min(1e-12).float()
        lam, vec = torch.linalg.eigh(cov)
        lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)          # largest first
        k = int((lam > principal * lam[0]).sum().clamp_min(1))    # the principal subspace
        whiten, colour, keep = torch.zeros_like(cov), torch.zeros_like(cov), torch.zeros(self.dim, dtype=cov.dtype)
        whiten[:k] = vec[:, :k].T / lam[:k].sqrt()[:, None]
        colour[:k] = vec[:, :k].T * lam[:k].sqrt()[:, None]
        keep[:k] = 1
        off = torch.eye(self.dim, dtype=cov.dtype) - vec[:, :k] @ vec[:, :k].T
        rest = float(lam[k:].sum()) / max(self.dim - k, 1)
        self.whiten, self.colour, self.keep, self.off = whiten.float(), colour.float(), keep.float(), off.float()
        self.residual_var = torch.tensor(max(rest, 1e-12 * float(lam[0]), 1e-30), dtype=torch.float32)
        u_data = (z - self.mean) @ self.whiten.T

        g = torch.Generator().manual_seed(seed)

        def noise_like(n: int) -> Tensor:
            return torch.randn(n, self.dim, generator=g).to(device)

        def restart(n: int) -> Tensor:
            if start_from == "noise":
                return noise_like(n)
            # data latents, jittered: chains sculpt the energy where the data are; far away, the
            # tether keeps it high
            return u_data[torch.randint(n_data, (n,), generator=g).to(device)] + 0.1 * noise_like(n)

        n_data = len(u_data)
        buffer = restart(buffer_size)
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
            start = torch.where(fresh[:, None], restart(len(pos)), start)
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
        keep = torch.randperm(buffer_size, generator=g)[:CHAINS_KEPT].to(device)
        self.chains = buffer[keep].repeat(-(-CHAINS_KEPT // len(keep)), 1)[:CHAINS_KEPT].detach().clone()
        return self

    def sample(self, n: int, steps: int = 500, step_size: float = 0.01, seed: int = 0, from_chains: bool = False) -> Tensor:
        r"""Returns :math:`n` latents :math:`(n, D)` drawn from :math:`e^{-E}` by unadjusted Langevin
        chains (noise :math:`\sqrt{2 \alpha_s}`): what the model calls normal.

        Arguments:
            n: The number of samples.
            steps: Langevin steps per chain.
            step_size: :math:`\alpha_s`, whitened units.
            seed: Seeds the starting points and the noise.
            from_chains: Start from the persistent chains kept at the end of training (what the
                model was trained against; a model trained by short-run chains is known to drift
                away from the data on long chains from noise, Nijkamp et al. 2019) instead of
                :math:`\mathcal{N}(0, I)`.
        """

        g = torch.Generator().manual_seed(seed)
        device = self.mean.device
        if from_chains:
            start = self.chains[torch.randint(len(self.chains), (n,), generator=g).to(device)]
        else:
            start = torch.randn(n, self.dim, generator=g).to(device)
        was = self.training
        self.eval()
        u = langevin_sample(self._energy_u, start, steps, step_size, generator=g)
        self.train(was)
        residual = torch.randn(n, self.dim, generator=g).to(device) @ self.off.T * self.residual_var.sqrt()
        return u @ self.colour + self.mean + residual

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

