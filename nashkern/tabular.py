"""The tabular algorithms of *Nash Learning from Human Feedback* (Munos et al., 2023) on a finite
response set ``Y = {0, …, n−1}``: Nash-MD, the tabular counterpart of Nash-EMA-PG (self-play
against the policy of the averaged logits, :func:`nash_ema`), the baselines the paper discusses
(iterated best response, self-play, RLHF through a fitted Bradley–Terry reward), the exact
regularised Nash equilibrium (solved independently of those iterations and certified by its
duality gap) and the exploitability. Everything is float64 torch; policies are ``[n]``
probability vectors.

The game (``PreferenceGame``): ``P[y, y'] = P(y ≻ y')`` with ``P + Pᵀ = 1``, reference ``μ``,
regularisation ``τ ≥ 0``. With ``P(π ≻ π') = πᵀ P π'`` the regularised preference is

    P_τ(π ≻ π') = P(π ≻ π') − τ KL(π‖μ) + τ KL(π'‖μ),

a symmetric two-player constant-sum game with value 1/2 and, for τ > 0, a unique equilibrium
``π*_τ`` (the fixed point ``π*_τ ∝ μ · exp(P(· ≻ π*_τ) / τ)``).

Exploitability (the symmetric game's duality gap, halved) of a policy π:

    gap_τ(π) = max_π' P_τ(π' ≻ π) − 1/2
             = max_π' [P(π' ≻ π) − τ KL(π'‖μ)] − [1/2 − τ KL(π‖μ)]
             = τ · log Σ_y μ(y) exp(P(y ≻ π) / τ) + τ KL(π‖μ) − 1/2      (closed-form inner max,
                                                                          attained at BR_τ(π))
             = τ · KL(π ‖ BR_τ(π)),     BR_τ(π) ∝ μ · exp(P(· ≻ π) / τ),

and for τ = 0: ``max_y P(y ≻ π) − 1/2``. It is ≥ 0 and 0 exactly at the equilibrium.

Nash-MD (the paper's Section 5), step ``η`` with ``ητ ≤ 1``:

    π_t^μ ∝ π_t^(1−ητ) · μ^(ητ)                       (geometric mixture, log space)
    π_{t+1} ∝ π_t^μ · exp(η · P(· ≻ π_t^μ))

The geometric mixture goes through :func:`nashkern.naive.mix_logits` (the ops' definition:
``(1−c)·a + c·b`` in log space, exact at ``c ∈ {0, 1}``) and a log-softmax, as the samplers do.

One-step inequality (the form of the paper's Theorem 1, re-derived here with the constant
``η²/8``): for ``ητ ≤ 1``,

    KL(π*_τ‖π_{t+1}) ≤ (1 − ητ) · KL(π*_τ‖π_t) + η²/8.

Proof sketch: the update is ``argmax_π η⟨π, g⟩ − KL(π‖π_t^μ)`` with ``g = P(· ≻ π_t^μ)``, so exactly
``KL(π*‖π_{t+1}) = KL(π*‖π_t^μ) − KL(π_{t+1}‖π_t^μ) − η⟨π* − π_{t+1}, g⟩``; the mixture gives
``KL(π*‖π_t^μ) = (1−ητ)KL(π*‖π_t) + ητ[KL(π*‖μ) − KL(π_t^μ‖μ)] − (1−ητ)KL(π_t^μ‖π_t)``; the
equilibrium property ``P_τ(π* ≻ π_t^μ) ≥ 1/2`` cancels the τ·KL terms, leaving
``η⟨π_{t+1} − π_t^μ, g − 1/2⟩ − KL(π_{t+1}‖π_t^μ) ≤ η d/2 − d²/2 ≤ η²/8`` with
``d = ‖π_{t+1} − π_t^μ‖₁`` (Pinsker; the term ``−(1−ητ)KL(π_t^μ‖π_t) ≤ 0`` is dropped). Hence,
for a constant step,
``KL(π*‖π_T) ≤ (1−ητ)^T KL(π*‖π_0) + η/(8τ)·(1 − (1−ητ)^T)`` and, for ``η_t = 2/(τ(t+2))``,
``KL(π*‖π_T) ≤ 1/(2τ²(T+1))`` for T ≥ 1 (multiply the inequality by ``(t+1)(t+2)`` and sum).
See :func:`nash_md_kl_bound`.
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .naive import mix_logits

DTYPE = torch.float64
Step = Union[float, Callable[[int], float]]


def _as_policy(name: str, p, n: Optional[int] = None, *, tol: float = 1e-9) -> Tensor:
    p = torch.as_tensor(p, dtype=DTYPE)
    if p.dim() != 1 or (n is not None and p.numel() != n):
        size = "" if n is None else f" with n = {n}"
        raise ValueError(f"{name} must be a probability vector [n]{size}, "
                         f"got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or abs(float(p.sum()) - 1) > tol:
        raise ValueError(f"{name} must be finite, non-negative and sum to 1 (got sum "
                         f"{float(p.sum()):.6g}, min {float(p.min()):.3g})")
    return p


def kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim of ``[..., n]`` probability vectors (terms with p = 0 count 0;
    +inf when q = 0 < p)."""
    pos = p > 0
    return torch.where(pos, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p)).sum(-1)


def geometric_mixture(pi: Tensor, mu: Tensor, coef: float) -> Tensor:
    """``π^(1−c) · μ^c`` normalised, computed in log space (:func:`nashkern.naive.mix_logits`)."""
    return torch.log_softmax(mix_logits(pi.log(), mu.log(), coef), -1).exp()


def check_preferences(P, atol: float = 1e-9) -> Tensor:
    """``P`` as float64 ``[n, n]``, checked: square, n ≥ 2, entries in [0, 1], ``P + Pᵀ = 1``."""
    P = torch.as_tensor(P, dtype=DTYPE)
    if P.dim() != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
        raise ValueError(f"P must be a square [n, n] matrix with n >= 2, got {tuple(P.shape)}")
    if not bool(torch.isfinite(P).all()) or bool((P < 0).any()) or bool((P > 1).any()):
        raise ValueError("P must hold probabilities P[y, y'] = P(y ≻ y') in [0, 1]")
    err = float((P + P.T - 1).abs().max())
    if err > atol:
        raise ValueError(f"P must satisfy P + Pᵀ = 1 (P(y ≻ y') + P(y' ≻ y) = 1, so "
                         f"P[y, y] = 1/2); max |P + Pᵀ − 1| = {err:.3g} > atol {atol}")
    return P


@dataclass(frozen=True)
class PreferenceGame:
    """The (regularised) preference game: ``P`` ``[n, n]``, reference ``mu`` ``[n]`` (positive),
    ``tau ≥ 0``. Validated on construction (``P + Pᵀ = 1`` within ``atol``, entries in [0, 1])."""

    P: Tensor
    mu: Tensor
    tau: float
    atol: float = 1e-9

    def __post_init__(self):
        P = check_preferences(self.P, self.atol)
        mu = _as_policy("mu", self.mu, P.shape[0])
        if bool((mu <= 0).any()):
            raise ValueError("mu (the reference policy) must be positive on every response")
        if not (isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool)
                and math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "tau", float(self.tau))

    @property
    def n(self) -> int:
        return self.P.shape[0]

    def with_tau(self, tau: float) -> "PreferenceGame":
        return PreferenceGame(self.P, self.mu, tau, self.atol)

    def win_rates(self, pi: Tensor) -> Tensor:
        """``P(y ≻ π)`` for every response y: ``[..., n]`` for policies ``[..., n]``."""
        return pi @ self.P.T

    def preference(self, pi: Tensor, other: Tensor) -> Tensor:
        """``P(π ≻ π')`` (``π`` may be a batch ``[m, n]``)."""
        return pi @ self.P @ other

    def regularised_preference(self, pi: Tensor, other: Tensor) -> Tensor:
        """``P_τ(π ≻ π') = P(π ≻ π') − τ KL(π‖μ) + τ KL(π'‖μ)``."""
        return self.preference(pi, other) - self.tau * (kl(pi, self.mu) - kl(other, self.mu))

    def best_response(self, pi: Tensor) -> Tensor:
        """``argmax_π' P_τ(π' ≻ π)``: ``∝ μ exp(P(· ≻ π)/τ)``; for τ = 0 the first best pure
        response (a one-hot vector)."""
        w = self.win_rates(pi)
        if self.tau == 0:
            return torch.nn.functional.one_hot(w.argmax(), self.n).to(DTYPE)
        return torch.softmax(self.mu.log() + w / self.tau, -1)

    def exploitability(self, pi: Tensor) -> Tensor:
        """``max_π' P_τ(π' ≻ π) − 1/2`` (module docstring), with the closed-form inner max;
        ``[...]`` for policies ``[..., n]``."""
        w = self.win_rates(pi)
        if self.tau == 0:
            return w.amax(-1) - 0.5
        t = self.tau
        return t * torch.logsumexp(self.mu.log() + w / t, -1) + t * kl(pi, self.mu) - 0.5


# ------------------------------------------------------------------------------------------------
# the iterations: each returns the [T + 1, n] trajectory π_0, …, π_T
# ------------------------------------------------------------------------------------------------
def _step_size(eta: Step, t: int) -> float:
    return float(eta(t) if callable(eta) else eta)


def _run(game: PreferenceGame, steps: int, pi0: Optional[Tensor], update) -> Tensor:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    steps = int(steps)
    pi = game.mu.clone() if pi0 is None else _as_policy("pi0", pi0, game.n)
    out = torch.empty(steps + 1, game.n, dtype=DTYPE)
    out[0] = pi
    for t in range(steps):
        pi = update(pi, t)
        out[t + 1] = pi
    return out


def _check_eta(game: PreferenceGame, eta: float, t: int) -> None:
    if not (eta > 0 and eta * game.tau <= 1 + 1e-12):
        raise ValueError(f"the step size must satisfy 0 < eta and eta * tau <= 1 (the mixture "
                         f"weight), got eta = {eta} at t = {t} with tau = {game.tau}")


def nash_md_step(game: PreferenceGame, pi: Tensor, eta: float) -> Tensor:
    """One Nash-MD step: ``π' ∝ π^μ · exp(η P(· ≻ π^μ))``, ``π^μ ∝ π^(1−ητ) μ^(ητ)``."""
    mix = geometric_mixture(pi, game.mu, eta * game.tau)
    return torch.log_softmax(mix.log() + eta * game.win_rates(mix), -1).exp()


def self_play_step(game: PreferenceGame, pi: Tensor, eta: float) -> Tensor:
    """One self-play step: ``π' ∝ π^(1−ητ) μ^(ητ) exp(η P(· ≻ π))`` (opponent: π itself)."""
    prior = geometric_mixture(pi, game.mu, eta * game.tau)
    return torch.log_softmax(prior.log() + eta * game.win_rates(pi), -1).exp()


def _mirror_descent(step_fn, game, eta, steps, pi0):
    def update(pi, t):
        e = _step_size(eta, t)
        _check_eta(game, e, t)
        return step_fn(game, pi, e)

    return _run(game, steps, pi0, update)


def nash_md(game: PreferenceGame, eta: Step, steps: int, pi0: Optional[Tensor] = None) -> Tensor:
    """Nash-MD (:func:`nash_md_step` with ``η_t``). ``eta``: a float or ``t -> η_t`` (e.g.
    :func:`decreasing_step`); ``η_t τ ≤ 1``. ``pi0`` defaults to μ."""
    return _mirror_descent(nash_md_step, game, eta, steps, pi0)


def self_play(game: PreferenceGame, eta: Step, steps: int,
              pi0: Optional[Tensor] = None) -> Tensor:
    """Self-play as online mirror descent on the regularised game *without* the mixture opponent
    (:func:`self_play_step`): the same KL step as Nash-MD, the opponent being the current policy.
    At τ = 0 it is multiplicative weights, and Nash-MD and self-play coincide; for τ > 0 it is
    magnetic mirror descent (Sokota et al., 2022), which converges when ``η`` is small enough
    relative to ``τ`` and fails to when it is not (``tests/rl/test_tabular.py``)."""
    return _mirror_descent(self_play_step, game, eta, steps, pi0)


def nash_ema_step(game: PreferenceGame, pi: Tensor, opponent: Tensor, eta: float) -> Tensor:
    """One Nash-EMA step: ``π' ∝ π^(1−ητ) μ^(ητ) exp(η P(· ≻ π̄))``, the opponent ``π̄`` being
    the policy of the averaged logits (:func:`nash_ema`)."""
    prior = geometric_mixture(pi, game.mu, eta * game.tau)
    return torch.log_softmax(prior.log() + eta * game.win_rates(opponent), -1).exp()


def nash_ema(game: PreferenceGame, eta: Step, decay: float, steps: int,
             pi0: Optional[Tensor] = None, *, return_opponents: bool = False):
    """Nash-EMA, the tabular counterpart of Nash-EMA-PG: the KL step of self-play against the
    policy ``π̄_t = softmax(θ̄_t)`` of an exponential moving average of the policy's logits
    (its parameters here, ``θ_t = log π_t``):

        π_{t+1} ∝ π_t^(1−ητ) μ^(ητ) exp(η P(· ≻ π̄_t)),      θ̄_{t+1} = β θ̄_t + (1−β) log π_{t+1},

    ``θ̄_0 = log π_0``, ``β = decay`` (the paper's β: 0 is :func:`self_play` exactly; 1 keeps the
    opponent at π_0, and π_t tends to the best response ``BR_τ(π_0)``).

    What holds (``tests/rl/test_tabular.py``): for β < 1 a fixed point has ``θ̄ = log π`` and
    ``π ∝ μ exp(P(· ≻ π)/τ)``, i.e. the only fixed point is the regularised equilibrium π*_τ
    itself (no O(η) bias, unlike Nash-MD's constant step); whether the iteration converges to
    it is a local property, the spectral radius of the joint map (:func:`nash_ema_spectral_radius`)
    — no global or last-iterate theorem like Nash-MD's (β → 1 slows the opponent down, which
    damps self-play's cycling where its radius exceeds 1, at the price of a slower rate).
    Returns the ``[T + 1, n]`` policies, and with ``return_opponents`` also the opponents
    ``π̄_t`` ``[T + 1, n]``."""
    beta = float(decay)
    if not 0 <= beta <= 1:
        raise ValueError(f"decay must be in [0, 1] (0: self-play, 1: a fixed opponent), got "
                         f"{decay}")
    start = game.mu.clone() if pi0 is None else _as_policy("pi0", pi0, game.n)
    theta_bar = start.log()
    opponents = [start]

    def update(pi, t):
        nonlocal theta_bar
        e = _step_size(eta, t)
        _check_eta(game, e, t)
        # β = 0: the opponent is the policy itself (no round trip through its logits)
        new = nash_ema_step(game, pi, pi if beta == 0 else torch.softmax(theta_bar, -1), e)
        theta_bar = beta * theta_bar + (1 - beta) * new.log()
        opponents.append(new if beta == 0 else torch.softmax(theta_bar, -1))
        return new

    out = _run(game, steps, start, update)
    return (out, torch.stack(opponents)) if return_opponents else out


def nash_ema_spectral_radius(game: PreferenceGame, eta: float, decay: float,
                             at: Optional[Tensor] = None) -> float:
    """Spectral radius of the linearisation of Nash-EMA's joint map ``(log π, θ̄) ↦ (log π',
    θ̄')`` (each modulo constants) at ``(at, at)``, by default at π*_τ (its fixed point): < 1
    means the iteration converges to π*_τ from close enough, > 1 that it cannot (from almost
    every start)."""
    pi = solve_equilibrium(game).policy if at is None else at
    n = game.n
    basis = torch.linalg.qr(torch.eye(n, dtype=DTYPE) - 1.0 / n).Q[:, : n - 1]
    log_pi = pi.log()

    def f(z):
        p = torch.softmax(log_pi + basis @ z[: n - 1], -1)
        bar = log_pi + basis @ z[n - 1:]
        new = nash_ema_step(game, p, torch.softmax(bar, -1), eta).log()
        new_bar = decay * bar + (1 - decay) * new
        return torch.cat([basis.T @ new, basis.T @ new_bar])

    J = torch.autograd.functional.jacobian(f, torch.zeros(2 * (n - 1), dtype=DTYPE))
    return float(torch.linalg.eigvals(J).abs().max())


def step_spectral_radius(step_fn, game: PreferenceGame, pi: Tensor, eta: float) -> float:
    """Spectral radius of the linearisation at ``pi`` of the map ``log π ↦ log step_fn(π)`` on
    the log-policies modulo constants (the tangent space of the simplex in log coordinates).
    At a fixed point: < 1 means locally attracting, > 1 repelling (the iteration cannot converge
    to it from almost every start)."""
    n = game.n
    basis = torch.linalg.qr(torch.eye(n, dtype=DTYPE) - 1.0 / n).Q[:, : n - 1]  # ⟂ all-ones

    def f(z):
        out = step_fn(game, torch.softmax(pi.log() + basis @ z, -1), eta).log()
        return basis.T @ out

    J = torch.autograd.functional.jacobian(f, torch.zeros(n - 1, dtype=DTYPE))
    return float(torch.linalg.eigvals(J).abs().max())


def iterated_best_response(game: PreferenceGame, steps: int,
                           pi0: Optional[Tensor] = None) -> Tensor:
    """``π_{t+1} = BR_τ(π_t) ∝ μ exp(P(· ≻ π_t)/τ)`` (pure best response at τ = 0)."""
    return _run(game, steps, pi0, lambda pi, t: game.best_response(pi))


def fictitious_play(game: PreferenceGame, steps: int,
                    pi0: Optional[Tensor] = None) -> Tensor:
    """Fictitious play: ``π_{t+1} = BR_τ(π̄_t)``, the best response to the average
    ``π̄_t = (π_0 + … + π_t)/(t+1)`` of the past policies (the average converges in a
    constant-sum game; the last iterate is a best response: pure at τ = 0)."""
    total = torch.zeros(game.n, dtype=DTYPE)

    def update(pi, t):
        nonlocal total
        total = total + pi
        return game.best_response(total / (t + 1))

    return _run(game, steps, pi0, update)


def decreasing_step(tau: float) -> Callable[[int], float]:
    """``η_t = 2 / (τ (t + 2))``: the schedule of the ``1/(2τ²(T+1))`` bound (η_0 τ = 1)."""
    if not tau > 0:
        raise ValueError(f"decreasing_step needs tau > 0, got {tau}")
    return lambda t: 2.0 / (tau * (t + 2))


def nash_md_kl_bound(kl0: float, tau: float, eta: Step, steps: int) -> Tensor:
    """The bound ``B_t`` on ``KL(π*_τ‖π_t)``, t = 0…steps, from the one-step inequality
    ``B_{t+1} = (1 − η_t τ) B_t + η_t²/8``, ``B_0 = KL(π*_τ‖π_0)`` (module docstring)."""
    out = torch.empty(steps + 1, dtype=DTYPE)
    b = float(kl0)
    out[0] = b
    for t in range(steps):
        e = _step_size(eta, t)
        b = (1 - e * tau) * b + e * e / 8
        out[t + 1] = b
    return out


# ------------------------------------------------------------------------------------------------
# RLHF: a Bradley–Terry reward fitted to P, then the KL-regularised optimum
# ------------------------------------------------------------------------------------------------
def bradley_terry_preferences(reward: Tensor) -> Tensor:
    """``P[y, y'] = σ(r(y) − r(y'))``."""
    r = torch.as_tensor(reward, dtype=DTYPE)
    return torch.sigmoid(r[:, None] - r[None, :])


def fit_bradley_terry(P: Tensor, weights: Optional[Tensor] = None, *, iters: int = 100,
                      tol: float = 1e-12) -> Tensor:
    """Maximum-likelihood Bradley–Terry reward ``r`` ``[n]`` (mean 0) for the preference matrix
    ``P``: maximises ``Σ_{y,y'} w(y,y') [P(y≻y') log σ(r_y − r_y') + P(y'≻y) log σ(r_y' − r_y)]``
    (the expected log-likelihood of comparisons of pairs drawn with weights ``w``; default: all
    pairs equally, e.g. ``w = μ μᵀ`` for pairs sampled from the reference). Newton's method on
    this concave objective, stopped when the gradient's max-norm is below ``tol`` (a response
    that wins or loses every comparison with probability 1 has an infinite ML reward: it comes
    back large, ≈ ±log(1/tol)); a RuntimeError when Newton does not get there."""
    P = check_preferences(P)
    n = P.shape[0]
    w = torch.ones(n, n, dtype=DTYPE) if weights is None else torch.as_tensor(weights, dtype=DTYPE)
    if w.shape != P.shape or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be finite, non-negative and [n, n] like P "
                         f"{tuple(P.shape)}, got {tuple(w.shape)}")
    w = w.clone().fill_diagonal_(0)

    def neg_loglik(r):
        d = r[:, None] - r[None, :]
        return -(w * P * torch.nn.functional.logsigmoid(d)).sum()

    r = torch.zeros(n, dtype=DTYPE)
    proj = torch.eye(n, dtype=DTYPE) - 1.0 / n  # mean-zero gauge
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(neg_loglik, r)
        H = torch.autograd.functional.hessian(neg_loglik, r) + torch.ones(n, n, dtype=DTYPE) / n
        step = torch.linalg.solve(H, g)
        r = proj @ (r - step)
        if float(g.abs().max()) < tol:
            return r
    raise RuntimeError(f"fit_bradley_terry did not converge in {iters} Newton steps (gradient "
                       f"{float(g.abs().max()):.3g}): with some P[y, y'] in {{0, 1}} a response "
                       f"can win or lose every comparison, and its maximum-likelihood reward is "
                       f"infinite")


def rlhf_policy(game: PreferenceGame, reward: Tensor) -> Tensor:
    """``argmax_π E_π[r] − τ KL(π‖μ) ∝ μ exp(r/τ)`` (τ = 0: the first argmax of r, one-hot)."""
    r = torch.as_tensor(reward, dtype=DTYPE)
    if game.tau == 0:
        return torch.nn.functional.one_hot(r.argmax(), game.n).to(DTYPE)
    return torch.softmax(game.mu.log() + r / game.tau, -1)


# ------------------------------------------------------------------------------------------------
# the exact equilibrium, independent of the iterations above
# ------------------------------------------------------------------------------------------------
@dataclass
class Equilibrium:
    policy: Tensor       # [n]
    gap: float           # exploitability of ``policy`` (the certificate); for coef > 0 the residual


def _support_enumeration(game: PreferenceGame, tol: float) -> Tensor:
    """τ = 0: the symmetric constant-sum game's equilibrium by support enumeration (n ≤ 12): on
    its support S, ``P(y ≻ π) = 1/2`` for y ∈ S (the value), ``≤ 1/2`` elsewhere."""
    n = game.n
    if n > 12:
        raise ValueError(f"the tau = 0 solver enumerates supports: n = {n} > 12 is too large")
    best = None
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            idx = torch.tensor(S)
            A = torch.cat([game.P[idx][:, idx], torch.ones(1, k, dtype=DTYPE)])
            b = torch.cat([torch.full((k,), 0.5, dtype=DTYPE), torch.ones(1, dtype=DTYPE)])
            x = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
            if bool((x < -tol).any()) or float((A @ x - b).abs().max()) > 1e-9:
                continue
            pi = torch.zeros(n, dtype=DTYPE)
            pi[idx] = x.clamp_min(0)
            pi = pi / pi.sum()
            gap = float(game.exploitability(pi))
            if best is None or gap < best[1]:
                best = (pi, gap)
            if gap <= tol:
                return pi
    if best is None:
        raise RuntimeError("support enumeration found no equilibrium candidate")
    return best[0]


def solve_equilibrium(game: PreferenceGame, *, coef: float = 0.0, tol: float = 1e-12,
                      max_newton: int = 100) -> Equilibrium:
    """The regularised Nash equilibrium ``π*_τ`` (``coef = 0``), certified by its exploitability.

    τ > 0: Newton's method (damped, backtracking on the residual norm) on the fixed-point
    equation in log space, ``s = log μ + P σ(s)/τ − logsumexp(·)``, started at ``log μ``.
    ``coef = c > 0`` solves instead ``π ∝ μ exp(P(· ≻ π^c)/τ)`` with ``π^c ∝ π^(1−c) μ^c``: the
    fixed point of Nash-MD with constant step ``η = c/τ`` and the stationary point of the
    Nash-MD policy gradient with ``beta = τ``, ``mixture_coef = c`` (its ``gap`` field is then
    the fixed-point residual). τ = 0: support enumeration (``coef`` must be 0)."""
    if game.tau == 0:
        if coef != 0:
            raise ValueError("coef > 0 needs tau > 0")
        pi = _support_enumeration(game, tol=max(tol, 1e-10))
        return Equilibrium(pi, float(game.exploitability(pi)))
    if not 0 <= coef < 1:
        raise ValueError(f"coef must be in [0, 1), got {coef}")
    log_mu, tau = game.mu.log(), game.tau

    def residual(s):
        pi = torch.softmax(s, -1)
        log_pi = torch.log_softmax(s, -1)  # (not pi.log(): no −inf / NaN grad on underflow)
        opp = pi if coef == 0 else torch.softmax(mix_logits(log_pi, log_mu, coef), -1)
        target = log_mu + game.P @ opp / tau
        return log_pi - torch.log_softmax(target, -1)

    s = log_mu.clone()
    r = residual(s)
    for _ in range(max_newton):
        if float(r.abs().max()) < tol:
            break
        J = torch.autograd.functional.jacobian(residual, s)
        # the residual is invariant to s + const: fix the gauge with the all-ones direction
        n = game.n
        step = torch.linalg.lstsq(J + torch.ones(n, n, dtype=DTYPE) / n, -r[:, None]).solution[:, 0]
        a, norm = 1.0, float(r.norm())
        while a > 1e-6:
            cand = s + a * step
            rc = residual(cand)
            if bool(torch.isfinite(rc).all()) and float(rc.norm()) < (1 - 1e-4 * a) * norm:
                break
            a /= 2
        s, r = cand, rc
    pi = torch.softmax(s, -1)
    certificate = float(game.exploitability(pi)) if coef == 0 else float(r.abs().max())
    if not certificate <= max(tol, 1e-10) * 10:
        raise RuntimeError(f"the equilibrium solver did not converge (certificate "
                           f"{certificate:.3g}); tau = {tau}, coef = {coef}")
    return Equilibrium(pi, certificate)


def exploitability_bound(game: PreferenceGame, pi: Tensor, kl_bound: float) -> float:
    """An upper bound on ``gap_τ(π)`` from an upper bound on ``KL(π*_τ‖π)``:

        gap_τ(π) ≤ max_π' [P_τ(π' ≻ π) − P_τ(π' ≻ π*)]                (P_τ(π' ≻ π*) ≤ 1/2)
                 = max_π' π'ᵀP(π − π*) + τ[Σ(π − π*) log(π/μ) − KL(π*‖π)]
                 ≤ ‖π − π*‖₁/2 · (1 + τ · span(log π/μ))               (Σ(π − π*) = 0)
                 ≤ ½ (1 + τ · span(log π/μ)) · sqrt(2 · KL(π*‖π))       (Pinsker),

    ``span(v) = max v − min v``."""
    log_ratio = pi.log() - game.mu.log()
    span = float(log_ratio.max() - log_ratio.min())
    return 0.5 * (1 + game.tau * span) * math.sqrt(2 * max(kl_bound, 0.0))


def trajectory_metrics(game: PreferenceGame, trajectory: Tensor, target: Tensor):
    """``(exploitability [T+1], KL(target‖π_t) [T+1])`` along a trajectory ``[T+1, n]``."""
    return game.exploitability(trajectory), kl(target, trajectory)


# ------------------------------------------------------------------------------------------------
# example games
# ------------------------------------------------------------------------------------------------
def cyclic_preferences(wins) -> Tensor:
    """A rock-paper-scissors-like (non-transitive) ``P`` on ``n = len(wins)`` responses: response
    ``i`` beats ``i+1 (mod n)`` with probability ``wins[i]``; all other pairs are ties (1/2)."""
    n = len(wins)
    P = torch.full((n, n), 0.5, dtype=DTYPE)
    for i, w in enumerate(wins):
        j = (i + 1) % n
        P[i, j], P[j, i] = float(w), 1 - float(w)
    return P


def random_preferences_with_equilibrium(x: Tensor, generator: Optional[torch.Generator] = None,
                                        scale: float = 1.0) -> Tensor:
    """A random ``P = (1 + A)/2`` whose unregularised (τ = 0) game has the fully mixed equilibrium
    ``x``: ``A = s · Mᵀ B M`` with ``B`` random skew-symmetric and ``M = I − x 1ᵀ`` (so ``A x = 0``,
    i.e. ``P(y ≻ x) = 1/2`` for every y), scaled so ``max |A| = scale ≤ 1``. For odd n the
    equilibrium is unique for almost every ``B`` (a skew matrix has even rank, here n − 1)."""
    x = _as_policy("x", x)
    n = x.numel()
    U = torch.randn(n, n, generator=generator, dtype=DTYPE)
    B = U - U.T
    M = torch.eye(n, dtype=DTYPE) - x[:, None] * torch.ones(1, n, dtype=DTYPE)
    A = M.T @ B @ M
    A = A * (scale / A.abs().max())
    return (1 + A) / 2


def random_preferences(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random preference matrix: ``P = (1 + A)/2`` with ``A`` skew-symmetric, entries uniform in
    (−1, 1) (non-transitive with high probability)."""
    U = torch.rand(n, n, generator=generator, dtype=DTYPE) * 2 - 1
    A = torch.triu(U, 1)
    return (1 + A - A.T) / 2
