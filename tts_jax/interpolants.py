"""Interpolant paths, conversions between model outputs, ODE/SDE steps and time grids.

Convention (docs/algorithms.md): time ``t`` in [0, 1], **t = 1 is noise, t = 0 is data**, and
``x_t = alpha_t * x0 + sigma_t * eps`` with ``eps ~ N(0, I)``. Every function is batched over a
leading particle axis ``N``; ``t`` may be a scalar or a ``[N]`` vector (one time per particle,
used by asynchronous samplers such as rollover budget forcing).

References: Lipman et al. 2023 / Liu et al. 2023 (linear path), Song et al. 2021 (VP SDE and the
reverse-time SDE), Kim et al. 2025 "Inference-Time Scaling for Flow Models via Stochastic
Generation and Rollover Budget Forcing" (ODE->SDE and linear->VP conversion, the sqrt grid).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
# velocity(x [N, ...], t [N]) -> [N, ...]; any model parameters are bound by the caller.
VelocityFn = Callable[[Array, Array], Array]


def _per_particle(t: Array, x: Array) -> Array:
    """Broadcast a scalar or ``[N]`` time against ``x [N, ...]``."""
    t = jnp.asarray(t, x.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class Interpolant:
    """A path ``x_t = alpha(t) x0 + sigma(t) eps``; subclasses give the four coefficients."""

    def alpha(self, t: Array) -> Array:
        raise NotImplementedError

    def sigma(self, t: Array) -> Array:
        raise NotImplementedError

    def alpha_dot(self, t: Array) -> Array:
        raise NotImplementedError

    def sigma_dot(self, t: Array) -> Array:
        raise NotImplementedError

    def coefficients(self, t: Array, x: Array) -> tuple[Array, Array, Array, Array]:
        """``(alpha, sigma, alpha_dot, sigma_dot)`` broadcast against ``x``."""
        tt = _per_particle(t, x)
        return self.alpha(tt), self.sigma(tt), self.alpha_dot(tt), self.sigma_dot(tt)


@dataclasses.dataclass(frozen=True)
class Linear(Interpolant):
    """Rectified-flow path ``alpha = 1 - t``, ``sigma = t``."""

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def alpha_dot(self, t):
        return -jnp.ones_like(t)

    def sigma_dot(self, t):
        return jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class VP(Interpolant):
    """Variance-preserving path in continuous time (docs/algorithms.md 0.3).

    ``T(r) = 0.5 r^2 (b_max - b_min) + r b_min``, ``alpha = exp(-T/2)``,
    ``sigma = sqrt(1 - exp(-T))``.
    """

    b_min: float = 0.1
    b_max: float = 20.0

    def _T(self, t):
        return 0.5 * t**2 * (self.b_max - self.b_min) + t * self.b_min

    def _T_dot(self, t):
        return t * (self.b_max - self.b_min) + self.b_min

    def alpha(self, t):
        return jnp.exp(-0.5 * self._T(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-self._T(t)))

    def alpha_dot(self, t):
        return -0.5 * self._T_dot(t) * self.alpha(t)

    def sigma_dot(self, t):
        return 0.5 * jnp.exp(-self._T(t)) * self._T_dot(t) / self.sigma(t)


# --------------------------------------------------------------------------- conversions (0.1)


def velocity_to_x0(interp: Interpolant, u: Array, x: Array, t: Array) -> Array:
    """Tweedie x0-estimate from a velocity.

    ``x0 = (sigma u - sigma_dot x) / (alpha_dot sigma - sigma_dot alpha)``.
    """
    a, s, ad, sd = interp.coefficients(t, x)
    return (s * u - sd * x) / (ad * s - sd * a)


def velocity_to_eps(interp: Interpolant, u: Array, x: Array, t: Array) -> Array:
    """eps-estimate from a velocity.

    ``eps = (alpha u - alpha_dot x) / (alpha sigma_dot - alpha_dot sigma)``.
    """
    a, s, ad, sd = interp.coefficients(t, x)
    return (a * u - ad * x) / (a * sd - ad * s)


def velocity_to_score(interp: Interpolant, u: Array, x: Array, t: Array) -> Array:
    """Score ``grad log p_t(x) = -eps_hat / sigma`` (undefined at ``sigma = 0``)."""
    _, s, _, _ = interp.coefficients(t, x)
    return -velocity_to_eps(interp, u, x, t) / s


def x0_eps_to_velocity(interp: Interpolant, x0: Array, eps: Array, t: Array) -> Array:
    """Velocity ``alpha_dot x0 + sigma_dot eps``."""
    _, _, ad, sd = interp.coefficients(t, x0)
    return ad * x0 + sd * eps


def eps_to_velocity(interp: Interpolant, eps: Array, x: Array, t: Array) -> Array:
    """Velocity of an eps-prediction model.

    ``x0 = (x - sigma eps) / alpha``, then ``u = alpha_dot x0 + sigma_dot eps``.
    """
    a, s, ad, sd = interp.coefficients(t, x)
    x0 = (x - s * eps) / a
    return ad * x0 + sd * eps


# --------------------------------------------------------------------------- ODE / SDE (0.2)


# diffusion coefficient: (norm, t [N] or scalar, interpolant) -> g(t) with the shape of t, where
# ``norm`` is the coefficient's numbers (a pytree of arrays: a scalar for the built-in ones).
DiffusionFn = Callable[[Any, Array, Interpolant], Array]


def _zero(norm, t, interp):
    return jnp.zeros_like(t)


def _constant(norm, t, interp):
    return jnp.full_like(t, norm)


def _square(norm, t, interp):
    return norm * t**2


def _sigma(norm, t, interp):
    return norm * interp.sigma(t)


class DiffusionCoefficients(NamedTuple):
    """The built-in diffusion coefficients ``g(norm, t, interpolant)``, as values."""

    zero: DiffusionFn
    constant: DiffusionFn
    square: DiffusionFn
    sigma: DiffusionFn


diffusions = DiffusionCoefficients(zero=_zero, constant=_constant, square=_square, sigma=_sigma)
"""``zero`` (the ODE, ``g = 0``), ``constant`` (``g = norm``), ``square`` (``g = norm t^2``, the
Kim et al. 2025 default with norm 3), ``sigma`` (``g = norm sigma(t)``); ``diffusions.square`` and
the name ``"square"`` are the same coefficient."""

DIFFUSION_KINDS = diffusions._fields


@struct.dataclass
class Diffusion:
    """The free diffusion coefficient ``g(t)`` of the reverse SDE (docs/algorithms.md 0.2).

    A pytree like :class:`~tts_jax.models.base.FlowModel` and :class:`~tts_jax.rewards.base.Reward`:
    the numbers ``norm`` are array leaves, so sweeping the noise level never recompiles, and the
    coefficient ``kind`` is static.

    Attributes:
        norm: the coefficient's numbers: a float32 scalar for the built-in kinds, any pytree of
            arrays for a function of your own.
        kind: a name of :data:`diffusions` (``zero``, ``constant``, ``square``, ``sigma``) or any
            function ``(norm, t, interpolant) -> g`` returning ``g`` with the shape of ``t``
            (``[N]`` or a scalar; a module-level function: it is hashed by identity as a static
            field). The built-in functions are stored under their names, so
            ``Diffusion(norm, diffusions.square) == Diffusion(norm, "square")`` and
            ``kind == "zero"`` always identifies the ODE.
    """

    norm: Any
    kind: str | DiffusionFn = struct.field(pytree_node=False, default="square")

    def __post_init__(self):
        if callable(self.kind):
            for name, fn in zip(DIFFUSION_KINDS, diffusions, strict=True):
                if self.kind is fn:
                    object.__setattr__(self, "kind", name)
        elif self.kind not in DIFFUSION_KINDS:
            raise ValueError(
                f"unknown diffusion kind {self.kind!r}; known: {DIFFUSION_KINDS}, or a function "
                "(norm, t, interpolant) -> g"
            )

    @property
    def coefficient(self) -> DiffusionFn:
        """The function ``(norm, t, interpolant) -> g`` (the built-in one for a name)."""
        return getattr(diffusions, self.kind) if isinstance(self.kind, str) else self.kind

    def __call__(self, t: Array, interp: Interpolant) -> Array:
        """``g(t)`` with the shape of ``t``."""
        return self.coefficient(self.norm, jnp.asarray(t, jnp.float32), interp)


def ode() -> Diffusion:
    """``g = 0``: deterministic probability-flow sampling."""
    return Diffusion(np.float32(0.0), "zero")


def diffusion(kind: str | DiffusionFn = "square", norm: Any = 3.0) -> Diffusion:
    """Build a :class:`Diffusion` from a name of :data:`diffusions` or a function
    ``(norm, t, interpolant) -> g``.

    A number ``norm`` becomes a float32 array (a NumPy one for Python numbers, so building it
    dispatches no device computation; same compiled programs); a pytree (for a function of your
    own) gets its leaves converted the same way.
    """

    def as_float32(x):
        if isinstance(x, jax.Array):
            return jnp.asarray(x, jnp.float32)
        return np.asarray(x, np.float32)

    return Diffusion(jax.tree.map(as_float32, norm), kind)


def sde_drift(interp: Interpolant, u: Array, x: Array, t: Array, g: Array) -> Array:
    """Reverse-SDE drift ``u - 0.5 g^2 score`` that keeps the ODE's marginals.

    ``g`` is ``[N]`` or a scalar; where ``g = 0`` the drift is exactly ``u`` (the score,
    which may be infinite at ``sigma = 0``, never enters the result).
    """
    gg = _per_particle(g, x) ** 2
    score = velocity_to_score(interp, u, x, t)
    return u - 0.5 * jnp.where(gg > 0, gg * score, 0.0)


def euler_step(u: Array, x: Array, t: Array, t_next: Array) -> Array:
    """Euler ODE step ``x + u (t_next - t)``."""
    return x + u * _per_particle(t_next - t, x)


def sde_step_mean_std(
    interp: Interpolant, u: Array, x: Array, t: Array, t_next: Array, g: Array
) -> tuple[Array, Array]:
    """Gaussian proposal of one Euler-Maruyama step: mean ``x + f dt`` and std ``g sqrt(|dt|)``.

    Returns:
        ``(mean [N, ...], std [N] or scalar)``.
    """
    dt = t_next - t
    mean = x + sde_drift(interp, u, x, t, g) * _per_particle(dt, x)
    std = g * jnp.sqrt(jnp.abs(dt))
    return mean, std


def sde_step(
    key: Array, interp: Interpolant, u: Array, x: Array, t: Array, t_next: Array, g: Array
) -> Array:
    """Euler-Maruyama step ``x + (u - 0.5 g^2 score) dt + g sqrt(|dt|) z`` (g = 0: Euler ODE)."""
    mean, std = sde_step_mean_std(interp, u, x, t, t_next, g)
    z = jax.random.normal(key, x.shape, x.dtype)
    return mean + _per_particle(std, x) * z


def gaussian_log_prob(x: Array, mean: Array, std: Array) -> Array:
    """``log N(x; mean, std^2 I)`` summed over non-particle axes; ``std`` is ``[N]`` or scalar."""
    std = _per_particle(std, x)
    z = (x - mean) / std
    per = -0.5 * z**2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)
    return jnp.sum(per.reshape(x.shape[0], -1), axis=-1)


# --------------------------------------------------------------------------- re-noising


def forward_renoise(interp: Interpolant, key: Array, x: Array, s: Array, s_next: Array) -> Array:
    """Exact forward transition ``x_s -> x_{s'}`` (``s' > s``, towards noise).

    ``x' = a x + b eps`` with ``a = alpha(s') / alpha(s)``,
    ``b^2 = sigma(s')^2 - a^2 sigma(s)^2``
    (linear: ``a = (1 - s')/(1 - s)``; VP: ``a = sqrt(abar'/abar)``), as used by search over paths
    (Ma et al. 2025).
    """
    ss, sn = _per_particle(s, x), _per_particle(s_next, x)
    a = interp.alpha(sn) / interp.alpha(ss)
    b = jnp.sqrt(jnp.maximum(interp.sigma(sn) ** 2 - a**2 * interp.sigma(ss) ** 2, 0.0))
    return a * x + b * jax.random.normal(key, x.shape, x.dtype)


# --------------------------------------------------------------------------- linear -> VP (0.3)


@dataclasses.dataclass(frozen=True)
class LinearToVP:
    """Run a linear-path velocity model as a VP model (Kim et al. 2025, docs/algorithms.md 0.3).

    A VP state ``xbar`` at VP time ``r`` corresponds to the linear state ``x = xbar / c(r)`` at time
    ``t(r) = sbar / (abar + sbar)``, with ``c = abar + sbar`` (equal signal-to-noise ratios), and
    the
    VP velocity is ``ubar = (c_dot / c) xbar + c t_dot u(xbar / c, t(r))``.
    """

    vp: VP = VP()

    def linear_time(self, r: Array) -> Array:
        a, s = self.vp.alpha(r), self.vp.sigma(r)
        return s / (a + s)

    def scale(self, r: Array) -> Array:
        return self.vp.alpha(r) + self.vp.sigma(r)

    def velocity(self, linear_velocity: VelocityFn, xbar: Array, r: Array) -> Array:
        """VP velocity ``ubar(xbar, r)`` [N, ...] from the linear model's velocity."""
        rr = _per_particle(r, xbar)
        a, s = self.vp.alpha(rr), self.vp.sigma(rr)
        ad, sd = self.vp.alpha_dot(rr), self.vp.sigma_dot(rr)
        c = a + s
        c_dot = ad + sd
        t_dot = (a * sd - s * ad) / c**2
        t_lin = jnp.reshape(s / c, jnp.shape(r) if jnp.ndim(r) else ())
        u = linear_velocity(xbar / c, t_lin)
        return (c_dot / c) * xbar + c * t_dot * u


# --------------------------------------------------------------------------- time grids


def uniform_grid(num_steps: int) -> Array:
    """``num_steps + 1`` equally spaced times from 1 (noise) to 0 (data)."""
    return jnp.linspace(1.0, 0.0, num_steps + 1)


def sqrt_grid(num_steps: int) -> Array:
    """Kim et al. 2025 grid ``r_k = sqrt(1 - (k / M)^2)``, k = 0..M (dense near the noise end)."""
    k = jnp.arange(num_steps + 1) / num_steps
    return jnp.sqrt(1.0 - k**2)
