r"""Gaussian mixture density on latents, fitted by EM in torch."""

__all__ = [
    "GaussianMixture",
]

import math

import torch

from torch import Tensor

COVARIANCE_TYPES = ("full", "diag")


class GaussianMixture(torch.nn.Module):
    r"""Creates a Gaussian mixture :math:`p(z) = \sum_k w_k \mathcal{N}(z \mid \mu_k, \Sigma_k)`.

    Parameters live in buffers, so :py:`state_dict()` carries the whole fitted model:
    `weights` :math:`(K,)`, `means` :math:`(K, D)` and either `scale_tril` :math:`(K, D, D)`,
    the Cholesky factors of the covariances (`covariance_type="full"`), or `variances`
    :math:`(K, D)` (`covariance_type="diag"`). Buffers are float64; :meth:`fit` and
    :meth:`log_prob` compute in float64 on the device of their input.

    References:
        | Maximum Likelihood from Incomplete Data via the EM Algorithm (Dempster et al., 1977)
        | https://doi.org/10.1111/j.2517-6161.1977.tb01600.x
        | k-means++: The Advantages of Careful Seeding (Arthur & Vassilvitskii, 2007)
        | https://dl.acm.org/doi/10.5555/1283383.1283494

    Arguments:
        n_components: The number of mixture components :math:`K`.
        dim: The number of latent features :math:`D`.
        covariance_type: `"full"` or `"diag"`.
        reg: Added to the covariance diagonal in every M-step (as sklearn's `reg_covar`),
            which keeps components from collapsing onto single points.

    Example:
        >>> z = torch.cat((torch.randn(200, 2) - 4, torch.randn(200, 2) + 4))
        >>> gmm = GaussianMixture(2, 2).fit(z)
        >>> gmm.log_prob(z[:3]).shape
        torch.Size([3])
    """

    def __init__(
        self,
        n_components: int,
        dim: int,
        covariance_type: str = "full",
        reg: float = 1e-6,
    ) -> None:
        super().__init__()

        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"GaussianMixture: covariance_type={covariance_type!r}, expected one of {COVARIANCE_TYPES}"
            )
        if n_components < 1 or dim < 1:
            raise ValueError(f"GaussianMixture: n_components={n_components} and dim={dim} must be >= 1")

        self.n_components = n_components
        self.dim = dim
        self.covariance_type = covariance_type
        self.reg = reg

        f64 = torch.float64
        self.register_buffer("weights", torch.full((n_components,), 1 / n_components, dtype=f64))
        self.register_buffer("means", torch.zeros(n_components, dim, dtype=f64))
        if covariance_type == "full":
            eye = torch.eye(dim, dtype=f64).expand(n_components, dim, dim).clone()
            self.register_buffer("scale_tril", eye)
        else:
            self.register_buffer("variances", torch.ones(n_components, dim, dtype=f64))
        # Mean log-likelihood per sample at the end of EM, and whether EM met `tol`.
        self.register_buffer("lower_bound", torch.tensor(-math.inf, dtype=f64))
        self.register_buffer("converged", torch.tensor(False))

    def config(self) -> dict:
        r"""Returns the constructor arguments, to rebuild the module before :py:`load_state_dict`."""

        return {
            "n_components": self.n_components,
            "dim": self.dim,
            "covariance_type": self.covariance_type,
            "reg": self.reg,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def n_parameters(self) -> int:
        r"""Returns the number of free parameters (as counted by BIC)."""

        K, D = self.n_components, self.dim
        cov = K * D * (D + 1) // 2 if self.covariance_type == "full" else K * D
        return cov + K * D + K - 1

    def _component_log_prob(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        r"""Returns :math:`\log w_k + \log \mathcal{N}(z \mid \mu_k, \Sigma_k)`, shape (N, K), float64."""

        weights, means, cov = params
        D = z.shape[1]
        if self.covariance_type == "full":
            half_logdet = cov.diagonal(dim1=1, dim2=2).log().sum(1)  # (K,)
        else:
            half_logdet = 0.5 * cov.log().sum(1)
        const = weights.log() - half_logdet - 0.5 * D * math.log(2 * math.pi)

        maha = []
        for k in range(self.n_components):  # one (N, D) temporary at a time, not (K, N, D)
            diff = z - means[k]
            if self.covariance_type == "full":
                y = torch.linalg.solve_triangular(cov[k], diff.T, upper=False)  # (D, N)
                maha.append(y.square().sum(0))
            else:
                maha.append((diff.square() / cov[k]).sum(1))

        return const - 0.5 * torch.stack(maha, dim=1)

    def _params(self, device: torch.device) -> tuple[Tensor, ...]:
        cov = self.scale_tril if self.covariance_type == "full" else self.variances
        return tuple(t.to(device=device, dtype=torch.float64) for t in (self.weights, self.means, cov))

    def _check(self, z: Tensor, where: str) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"GaussianMixture.{where}: z has shape {tuple(z.shape)}, expected (N, {self.dim})")
        return z.to(torch.float64)

    def log_prob(self, z: Tensor) -> Tensor:
        r"""Returns :math:`\log p(z)`.

        Arguments:
            z: Latents, shape :math:`(N, D)`.

        Returns:
            Per-object log densities, shape :math:`(N,)`, on `z`'s device, in `z`'s
            dtype if floating point, float64 otherwise.
        """

        x = self._check(z, "log_prob")
        lp = torch.logsumexp(self._component_log_prob(x, self._params(x.device)), dim=1)
        return lp.to(z.dtype) if z.is_floating_point() else lp

    def bic(self, z: Tensor) -> float:
        r"""Returns the Bayesian information criterion :math:`-2 \log L + p \log N` (lower is better).

        References:
            | Estimating the Dimension of a Model (Schwarz, 1978)
            | https://doi.org/10.1214/aos/1176344136
        """

        x = self._check(z, "bic")
        return float(-2 * self.log_prob(x).sum() + self.n_parameters() * math.log(x.shape[0]))

    def _m_step(self, x: Tensor, resp: Tensor) -> tuple[Tensor, ...]:
        r"""Returns weights, means and covariance factors given responsibilities (N, K)."""

        N, D = x.shape
        eps = 10 * torch.finfo(torch.float64).eps
        nk = resp.sum(0) + eps  # (K,)
        means = (resp.T @ x) / nk[:, None]

        if self.covariance_type == "full":
            covs = []
            for k in range(self.n_components):
                diff = x - means[k]  # centred first: no cancellation in E[zz^T] - mu mu^T
                covs.append((resp[:, k, None] * diff).T @ diff)
            eye = torch.eye(D, dtype=x.dtype, device=x.device)
            cov = torch.linalg.cholesky(torch.stack(covs) / nk[:, None, None] + self.reg * eye)
        else:
            cov = (resp.T @ x.square()) / nk[:, None] - means.square() + self.reg
            cov = cov.clamp_min(self.reg)

        return nk / N, means, cov

    def _kmeans_pp(self, x: Tensor, generator: torch.Generator) -> Tensor:
        r"""Returns hard labels (N,) from k-means++ seeding refined by a few Lloyd steps."""

        N = x.shape[0]
        K = self.n_components
        idx = torch.randint(N, (1,), generator=generator, device="cpu").item()
        centers = [x[idx]]
        d2 = (x - centers[0]).square().sum(1)

        for _ in range(1, K):
            total = d2.sum()
            if total <= 0:  # fewer distinct points than components
                idx = torch.randint(N, (1,), generator=generator, device="cpu").item()
            else:
                probs = (d2 / total).cpu()
                idx = torch.multinomial(probs, 1, generator=generator).item()
            centers.append(x[idx])
            d2 = torch.minimum(d2, (x - x[idx]).square().sum(1))

        centers = torch.stack(centers)
        for _ in range(10):
            labels = torch.cdist(x, centers).argmin(1)
            for k in range(K):
                members = x[labels == k]
                if len(members) > 0:
                    centers[k] = members.mean(0)

        return torch.cdist(x, centers).argmin(1)

    def fit(
        self,
        z: Tensor,
        max_iter: int = 200,
        tol: float = 1e-4,
        seed: int = 0,
    ) -> "GaussianMixture":
        r"""Fits the mixture by expectation-maximisation, from a k-means++ start.

        Arguments:
            z: Latents, shape :math:`(N, D)`, on any device; EM runs there in float64.
            max_iter: The maximum number of EM iterations.
            tol: Stop when the mean log-likelihood per sample improves by less than this.
            seed: Seeds the k-means++ start; the same seed and data give the same fit.

        Returns:
            The module itself, with buffers on `z`'s device.
        """

        x = self._check(z, "fit")
        N = x.shape[0]
        if N < self.n_components:
            raise ValueError(f"GaussianMixture.fit: {N} samples for {self.n_components} components")
        if not torch.isfinite(x).all():
            raise ValueError("GaussianMixture.fit: z holds NaN or infinite values; drop them first")

        generator = torch.Generator().manual_seed(seed)
        labels = self._kmeans_pp(x, generator)
        resp = torch.nn.functional.one_hot(labels, self.n_components).to(x.dtype)
        params = self._m_step(x, resp)

        lower_bound = -math.inf
        converged = False
        for _ in range(max_iter):
            log_joint = self._component_log_prob(x, params)  # E-step
            log_norm = torch.logsumexp(log_joint, dim=1)
            resp = (log_joint - log_norm[:, None]).exp()
            params = self._m_step(x, resp)

            previous, lower_bound = lower_bound, log_norm.mean().item()
            if abs(lower_bound - previous) < tol:
                converged = True
                break

        weights, means, cov = params
        self.weights = weights
        self.means = means
        if self.covariance_type == "full":
            self.scale_tril = cov
        else:
            self.variances = cov
        self.lower_bound = torch.tensor(lower_bound, dtype=torch.float64, device=x.device)
        self.converged = torch.tensor(converged, device=x.device)

        return self

    @classmethod
    def fit_bic(
        cls,
        z: Tensor,
        components: tuple[int, ...] = (1, 2, 4, 8),
        covariance_type: str = "full",
        seed: int = 0,
        **kwargs,
    ) -> "GaussianMixture":
        r"""Fits one mixture per number of components and returns the one of lowest BIC.

        Arguments:
            z: Latents, shape :math:`(N, D)`.
            components: The candidate numbers of components; those above :math:`N` are skipped.
            covariance_type: `"full"` or `"diag"`.
            seed: Passed to :meth:`fit`.
            kwargs: `reg` goes to the constructor, `max_iter` and `tol` to :meth:`fit`.

        Example:
            >>> z = torch.randn(300, 2)
            >>> GaussianMixture.fit_bic(z, components=(1, 2, 3)).n_components
            1
        """

        reg = kwargs.pop("reg", 1e-6)
        best, best_bic = None, math.inf
        for K in components:
            if K > z.shape[0]:
                continue
            gmm = cls(K, z.shape[1], covariance_type=covariance_type, reg=reg)
            gmm.fit(z, seed=seed, **kwargs)
            bic = gmm.bic(z)
            if bic < best_bic:
                best, best_bic = gmm, bic

        if best is None:
            raise ValueError(f"GaussianMixture.fit_bic: no candidate in {components} fits {z.shape[0]} samples")
        return best
