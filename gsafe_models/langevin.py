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
    r"""Creates an optimiser that trains by constrained underdamped Langevin dynamics.

    Each step is the minibatch form of the BAOAB splitting (Leimkuhler & Matthews 2013): a kick
    by the gradient (B), half a drift (A), an Ornstein-Uhlenbeck update of the momenta (O) that
    brings the heat bath at temperature :math:`\tau`, and half a drift (A). With a minibatch
    gradient the two half-kicks of consecutive steps merge into one.

    Constrained parameters (default: every tensor of two or more dimensions, the weights of
    convolutions and linear layers) live on circle constraints (Leimkuhler et al. 2021): weight
    :math:`w = r \cos(s / r)` for an arclength :math:`s` on a circle of radius :math:`r`, so
    :math:`|w| \le r` always; the dynamics run on :math:`s`, where the constrained Langevin
    dynamics is exactly the unconstrained one with the gradient :math:`\partial L / \partial s =
    -\sin(s / r)\, \partial L / \partial w`. Biases and norms are unconstrained.

    At :math:`\tau = 0` it is heavy-ball descent (momentum :math:`e^{-\gamma h}`) on the
    constrained weights. The stationary law of the weights is :math:`\propto e^{-L/\tau}` on the
    constraint set: a flat region of the loss holds more of it than a sharp one.

    Arguments:
        params: Parameters or parameter groups; a group may set `constrained` (bool) itself.
        lr: The step size :math:`h` (a learning-rate scheduler scales it).
        friction: :math:`\gamma`, per unit time.
        temperature: :math:`\tau`, in units of the loss.
        radius: :math:`r` of the circle constraints.

    References:
        | Better Training using Weight-Constrained Stochastic Dynamics (Leimkuhler et al., 2021)
        | https://arxiv.org/abs/2106.10704

    Example:
        >>> w = torch.nn.Parameter(torch.full((2, 2), 0.3))
        >>> opt = ConstrainedLangevin([w], lr=0.1, temperature=0.0, radius=0.5)
        >>> for _ in range(300):
        ...     opt.zero_grad(); (w - 0.9).square().sum().backward(); opt.step()
        >>> round(float(w.max()), 3)  # the constraint holds: |w| <= r
        0.5
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.05,
        friction: float = 1.0,
        temperature: float = 1e-6,
        radius: float = 1.0,
        constrained: bool | None = None,
    ) -> None:
        if lr <= 0 or friction < 0 or temperature < 0 or radius <= 0:
            raise ValueError(f"ConstrainedLangevin: lr={lr}, friction={friction}, temperature={temperature}, radius={radius}: "
                             "lr and radius must be > 0, friction and temperature >= 0")
        defaults = dict(lr=lr, friction=friction, temperature=temperature, radius=radius, constrained=constrained)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            h, gamma, tau, r = group["lr"], group["friction"], group["temperature"], group["radius"]
            decay = math.exp(-gamma * h)
            kick = math.sqrt(max(tau * (1.0 - decay**2), 0.0))
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                on_circle = group["constrained"] if group["constrained"] is not None else w.ndim >= 2
                if not state:
                    state["p"] = torch.zeros_like(w)
                    if on_circle:
                        # arclength of the current weight on the circle, |w| clipped inside it
                        state["s"] = r * torch.arccos((w / r).clamp(-1 + 1e-6, 1 - 1e-6))
                p = state["p"]
                g = w.grad
                if on_circle:
                    s = state["s"]
                    g = -torch.sin(s / r) * g
                    q = s
                else:
                    q = w
                p.add_(g, alpha=-h)                      # B
                q.add_(p, alpha=0.5 * h)                 # A
                p.mul_(decay)                            # O
                if kick > 0:
                    p.add_(torch.randn_like(p), alpha=kick)
                q.add_(p, alpha=0.5 * h)                 # A
                if on_circle:
                    w.copy_(r * torch.cos(q / r))
        return loss
