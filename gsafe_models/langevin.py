r"""Langevin dynamics: a short-run sampler of energy-based models, and constrained Langevin training.

Two uses of one equation, :math:`dq = p\,dt,\ dp = -\nabla U(q)\,dt - \gamma p\,dt + \sqrt{2\gamma\tau}\,dW`:

- :func:`langevin_sample` runs its overdamped limit on *inputs* :math:`x` of an energy
  :math:`E(x)` (unadjusted Langevin, ULA): samples of :math:`p(x) \propto e^{-E(x)}`, or, with the
  step and the noise decoupled as Du & Mordatch (2019) and Nijkamp et al. (2019) do, the
  short-run chains that train an energy-based model (:mod:`gsafe_models.ebm`);
- :class:`ConstrainedLangevin` runs the underdamped dynamics on the *weights* of a network, with
  :math:`U` the training loss at temperature :math:`\tau`, every weight of a convolution or a
  linear layer kept on a circle constraint :math:`|w| \le r` (Leimkuhler et al. 2021): an
  optimiser that explores a flat basin instead of descending to a sharp point, for robustness to
  small perturbations of the input.

References:
    | Implicit Generation and Generalization in Energy-Based Models (Du & Mordatch, 2019)
    | https://arxiv.org/abs/1903.08689
    | On the Anatomy of MCMC-Based Maximum Likelihood Learning of Energy-Based Models
    | (Nijkamp et al., 2019) https://arxiv.org/abs/1903.12370
    | Constraint-based regularization of neural networks (Leimkuhler, Pouchon & Vlaar, 2020)
    | https://arxiv.org/abs/2006.10114
    | Better Training using Weight-Constrained Stochastic Dynamics (Leimkuhler, Vlaar, Pouchon &
    | Storkey, 2021) https://arxiv.org/abs/2106.10704
    | Rational Construction of Stochastic Numerical Methods for Molecular Sampling (Leimkuhler &
    | Matthews, 2013), the BAOAB splitting https://arxiv.org/abs/1203.5428
"""

from __future__ import annotations

__all__ = ["langevin_sample", "ConstrainedLangevin"]

import math

from collections.abc import Callable, Iterable

import torch

from torch import Tensor


def langevin_sample(
    energy: Callable[[Tensor], Tensor],
    x: Tensor,
    steps: int,
    step_size: float,
    noise: float | None = None,
    clip: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Runs `steps` Langevin updates :math:`x \leftarrow x - \alpha \nabla_x E(x) + \sigma \xi` and
    returns the detached end points, same shape as `x`.

    With :math:`\sigma = \sqrt{2\alpha}` (the default) this is the unadjusted Langevin algorithm,
    whose chains sample :math:`p(x) \propto e^{-E(x)}` as :math:`\alpha \to 0`. EBM training uses a
    smaller :math:`\sigma` (short-run chains, Nijkamp et al. 2019). The energy's parameters get
    no gradient.

    Arguments:
        energy: Maps a batch :math:`(N, \dots)` to energies :math:`(N,)`; differentiable in `x`.
        x: The chains' starting points :math:`(N, \dots)`.
        steps: The number of updates.
        step_size: :math:`\alpha`.
        noise: :math:`\sigma`; default :math:`\sqrt{2\alpha}`.
        clip: Clamps each gradient element to :math:`[-c, c]` (stabilises early training), or None.
        generator: Seeds the noise (on CPU; moved to `x`'s device).

    Example:
        >>> x = langevin_sample(lambda x: 0.5 * x.square().sum(1), torch.zeros(4000, 1), 200, 0.05)
        >>> round(float(x.var()), 1)
        1.0
    """

    sigma = math.sqrt(2.0 * step_size) if noise is None else float(noise)
    x = x.detach().clone()
    for _ in range(int(steps)):
        x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        if clip is not None:
            grad = grad.clamp(-clip, clip)
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if generator is not None else torch.randn_like(x)
        x = (x.detach() - step_size * grad + sigma * xi).detach()
    return x


class ConstrainedLangevin(torch.optim.Optimizer):
    r"""Creates an optimiser that trains by constrained, preconditioned underdamped Langevin dynamics.

    The weights :math:`q` follow :math:`dq = M^{-1} p\,dt,\ dp = -\nabla L\,dt - \gamma p\,dt +
    \sqrt{2 \gamma \tau} M^{1/2} dW`, whose stationary law is :math:`\propto e^{-L(q)/\tau}`: at
    temperature :math:`\tau > 0` the weights keep exploring the low-loss region instead of
    settling on one point, and a wide, flat basin holds more of that law than a sharp one. Each
    step is the minibatch form of the BAOAB splitting (Leimkuhler & Matthews 2013: a kick by the
    gradient, half a drift, an Ornstein-Uhlenbeck update of the momenta, half a drift; with a
    minibatch gradient the half-kicks of consecutive steps merge). Written with the per-step
    displacement :math:`v = h M^{-1} p`, momentum :math:`\beta = e^{-\gamma h}` and
    :math:`\eta = h^2 = \text{lr}\,(1 - \beta)`:

    .. math:: v \leftarrow v - \eta G g, \quad q \leftarrow q + v / 2, \quad
              v \leftarrow \beta v + \sqrt{\eta \tau (1 - \beta^2) G}\, \xi, \quad q \leftarrow q + v / 2,

    so at :math:`\tau = 0` it is heavy-ball descent whose steady step is :math:`\text{lr}\, G g`.
    The mass :math:`M = G^{-1}` is the diagonal RMSprop preconditioner
    :math:`G = 1 / (\sqrt{\hat v} + \epsilon)` of preconditioned SGLD (Li et al. 2016) with
    `precondition`, so `lr` means what Adam's does; without it, :math:`G = 1`.

    Constrained parameters (default: every tensor of two or more dimensions, the weights of
    convolutions and linear layers) live on circle constraints (Leimkuhler et al. 2021): weight
    :math:`w = r \cos(s / r)` for an arclength :math:`s` on a circle of radius :math:`r`, so
    :math:`|w| \le r` always; the dynamics run on :math:`s`, where the constrained dynamics is the
    unconstrained one with the gradient :math:`\partial L / \partial s = -\sin(s / r)\,
    \partial L / \partial w`. Biases and norms are unconstrained.

    Arguments:
        params: Parameters or parameter groups; a group may set `constrained` (bool) itself.
        lr: The steady step size for a constant gradient (in units of :math:`G g`).
        momentum: :math:`\beta = e^{-\gamma h}`, in :math:`[0, 1)`.
        temperature: :math:`\tau`, in units of the loss.
        radius: :math:`r` of the circle constraints.
        precondition: Use the RMSprop preconditioner (second-moment decay `beta2`, floor `eps`).

    References:
        | Better Training using Weight-Constrained Stochastic Dynamics (Leimkuhler et al., 2021)
        | https://arxiv.org/abs/2106.10704
        | Preconditioned Stochastic Gradient Langevin Dynamics for Deep Neural Networks
        | (Li et al., 2016) https://arxiv.org/abs/1512.07666

    Example:
        >>> w = torch.nn.Parameter(torch.full((2, 2), 0.3))
        >>> opt = ConstrainedLangevin([w], lr=0.05, temperature=0.0, radius=0.5)
        >>> for _ in range(300):
        ...     opt.zero_grad(); (w - 0.9).square().sum().backward(); opt.step()
        >>> round(float(w.max()), 3)  # the constraint holds: |w| <= r
        0.5
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.9,
        temperature: float = 1e-6,
        radius: float = 1.0,
        precondition: bool = True,
        beta2: float = 0.999,
        eps: float = 1e-6,
        constrained: bool | None = None,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or temperature < 0 or radius <= 0:
            raise ValueError(f"ConstrainedLangevin: lr={lr}, momentum={momentum}, temperature={temperature}, radius={radius}: "
                             "lr and radius must be > 0, momentum in [0, 1), temperature >= 0")
        defaults = dict(lr=lr, momentum=momentum, temperature=temperature, radius=radius, precondition=precondition,
                        beta2=beta2, eps=eps, constrained=constrained)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, tau, r = group["momentum"], group["temperature"], group["radius"]
            eta = group["lr"] * (1.0 - beta)
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                on_circle = group["constrained"] if group["constrained"] is not None else w.ndim >= 2
                if not state:
                    state["v"] = torch.zeros_like(w)
                    state["step"] = 0
                    if group["precondition"]:
                        state["sq"] = torch.zeros_like(w)
                    if on_circle:
                        # arclength of the current weight on the circle, |w| clipped inside it
                        state["s"] = r * torch.arccos((w / r).clamp(-1 + 1e-6, 1 - 1e-6))
                v = state["v"]
                g = -torch.sin(state["s"] / r) * w.grad if on_circle else w.grad
                q = state["s"] if on_circle else w
                state["step"] += 1
                if group["precondition"]:
                    sq = state["sq"].mul_(group["beta2"]).addcmul_(g, g, value=1 - group["beta2"])
                    G = 1.0 / ((sq / (1 - group["beta2"] ** state["step"])).sqrt() + group["eps"])
                else:
                    G = torch.ones_like(g)
                v.addcmul_(G, g, value=-eta)             # B
                q.add_(v, alpha=0.5)                     # A
                v.mul_(beta)                             # O
                if tau > 0:
                    v.addcmul_(torch.randn_like(v), (eta * tau * (1 - beta**2) * G).sqrt())
                q.add_(v, alpha=0.5)                     # A
                if on_circle:
                    w.copy_(r * torch.cos(q / r))
        return loss
