r"""Normalizing flow density on latents: a masked autoregressive flow (zuko)."""

__all__ = [
    "LatentFlow",
]

import math

import torch

from torch import Tensor
from zuko.flows import MAF

from .training import EarlyStopping


class LatentFlow(torch.nn.Module):
    r"""Creates a masked autoregressive flow (MAF) density :math:`p(z)` on latents.

    Latents are standardised (`mean`, `std` buffers, set by :meth:`fit`) before the flow,
    and :meth:`log_prob` adds the log-determinant of that standardisation, so it is a
    density in the original units of `z`. MAF evaluates :math:`\log p(z)` in a single
    pass, which is what scoring a survey needs; sampling (D passes) is not needed here.

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803

    Arguments:
        dim: The number of latent features :math:`D`.
        transforms: The number of autoregressive transforms (orders alternate).
        hidden: The hidden layer widths of each transform's masked MLP.

    Example:
        >>> z = torch.randn(512, 2) * torch.tensor([3.0, 0.5]) + 1
        >>> flow = LatentFlow(2, transforms=2, hidden=(16,)).fit(z, epochs=5)
        >>> flow.log_prob(z[:4]).shape
        torch.Size([4])
    """

    def __init__(
        self,
        dim: int,
        transforms: int = 4,
        hidden: tuple[int, ...] = (64, 64),
    ) -> None:
        super().__init__()

        if dim < 1 or transforms < 1:
            raise ValueError(f"LatentFlow: dim={dim} and transforms={transforms} must be >= 1")

        self.dim = dim
        self.transforms = transforms
        self.hidden = tuple(int(h) for h in hidden)
        self.flow = self._build(seed=0)

        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.history: list[float] = []

    def _build(self, seed: int) -> MAF:
        # Weights drawn from a private generator state: the same seed gives the same
        # flow, and the caller's global RNG stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MAF(self.dim, transforms=self.transforms, hidden_features=self.hidden)

    def config(self) -> dict:
        r"""Returns the constructor arguments, to rebuild the module before :py:`load_state_dict`."""

        return {"dim": self.dim, "transforms": self.transforms, "hidden": self.hidden}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def _standardised_log_prob(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x)

    def log_prob(self, z: Tensor) -> Tensor:
        r"""Returns :math:`\log p(z) = \log p_\text{flow}((z - m) / s) - \sum_d \log s_d`.

        Arguments:
            z: Latents, shape :math:`(N, D)`.

        Returns:
            Per-object log densities, shape :math:`(N,)`, on `z`'s device (computed on the
            module's device).
        """

        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"LatentFlow.log_prob: z has shape {tuple(z.shape)}, expected (N, {self.dim})")

        x = (z.to(self.mean) - self.mean) / self.std
        return (self._standardised_log_prob(x) - self.std.log().sum()).to(z.device)

    def fit(
        self,
        z: Tensor,
        epochs: int = 200,
        lr: float = 1e-3,
        batch_size: int = 256,
        val_frac: float = 0.1,
        patience: int = 20,
        seed: int = 0,
    ) -> "LatentFlow":
        r"""Fits the flow by maximum likelihood (Adam), with early stopping on validation NLL.

        The flow's weights are re-drawn from `seed`, a random `val_frac` of `z` is held
        out, and the weights of the epoch with the lowest validation NLL are kept. Training
        runs on `z`'s device, where the module is moved.

        Arguments:
            z: Latents, shape :math:`(N, D)`.
            epochs: The maximum number of passes over the training split.
            lr: The Adam learning rate.
            batch_size: The minibatch size.
            val_frac: The held-out fraction for early stopping; 0 trains on all of `z`
                for `epochs` epochs.
            patience: Stop after this many epochs without a better validation NLL.
            seed: Seeds initial weights, the validation split and the batch order.

        Returns:
            The module itself; `history` holds the per-epoch validation NLL (training NLL
            when `val_frac` is 0) of the standardised latents, for logging.
        """

        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"LatentFlow.fit: z has shape {tuple(z.shape)}, expected (N, {self.dim})")
        if not torch.isfinite(z).all():
            raise ValueError("LatentFlow.fit: z holds NaN or infinite values; drop them first")

        device = z.device
        z = z.to(torch.float32)
        N = z.shape[0]
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(N, generator=generator).to(device)
        n_val = int(math.floor(val_frac * N)) if N > 1 else 0
        val, train = z[perm[:n_val]], z[perm[n_val:]]

        self.flow = self._build(seed)
        self.to(device)
        self.mean = train.mean(0)
        # A constant feature would give std 0; any positive scale keeps the map invertible.
        std = train.std(0) if len(train) > 1 else torch.ones_like(self.mean)
        self.std = torch.where(std > 0, std, torch.ones_like(std))

        train = (train - self.mean) / self.std
        val = (val - self.mean) / self.std

        optimizer = torch.optim.Adam(self.flow.parameters(), lr=lr)
        # without a validation split there is nothing to stop on: every epoch runs, the last is kept
        stopper = EarlyStopping(self.flow, patience if n_val > 0 else None, min_delta=1e-6)
        self.history = []

        for _ in range(epochs):
            self.flow.train()
            order = torch.randperm(len(train), generator=generator).to(device)
            total = 0.0
            for i in range(0, len(train), batch_size):
                batch = train[order[i : i + batch_size]]
                loss = -self._standardised_log_prob(batch).mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.flow.parameters(), max_norm=10.0)
                optimizer.step()
                total += loss.item() * len(batch)

            self.flow.eval()
            if n_val > 0:
                with torch.no_grad():
                    nll = -self._standardised_log_prob(val).mean().item()
            else:
                nll = total / len(train)
            self.history.append(nll)

            if stopper.step(nll):
                break

        if n_val > 0:
            stopper.restore()
        self.flow.eval()

        return self
