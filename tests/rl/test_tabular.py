"""The paper's tabular claims (``nashkern.tabular``), every threshold derived.

Games: ``cyclic`` — rock-paper-scissors-like, ``P(0≻1) = 0.9, P(1≻2) = 0.7, P(2≻0) = 0.8``, μ =
(0.5, 0.3, 0.2); ``random7`` — ``P = (1 + A)/2`` with A skew-symmetric uniform in (−1, 1), 7
responses, μ = softmax(N(0, 1)); ``interior5`` — a random 5-response P whose unregularised
equilibrium is a given fully mixed x (for the τ = 0 claims, which need an interior equilibrium).
"""

import pytest
import torch

from nashkern import tabular as tb
from nashkern.naive import mix_logits

F64 = torch.float64


def _cyclic(tau):
    return tb.PreferenceGame(tb.cyclic_preferences([0.9, 0.7, 0.8]),
                             torch.tensor([0.5, 0.3, 0.2], dtype=F64), tau)


def _random7(tau):
    g = torch.Generator().manual_seed(0)
    P = tb.random_preferences(7, g)
    return tb.PreferenceGame(P, torch.softmax(torch.randn(7, generator=g, dtype=F64), 0), tau)


def _interior5(tau):
    g = torch.Generator().manual_seed(1)
    x = torch.softmax(torch.randn(5, generator=g, dtype=F64), 0)
    return tb.PreferenceGame(tb.random_preferences_with_equilibrium(x, g),
                             torch.full((5,), 0.2, dtype=F64), tau), x


GAMES = {"cyclic": _cyclic, "random7": _random7}


# ------------------------------------------------------------------------------------------------
# the game, the mixture, the exploitability, the solver
# ------------------------------------------------------------------------------------------------
def test_game_validation_names_the_argument():
    P = tb.cyclic_preferences([0.9, 0.7, 0.8])
    mu = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    bad = P.clone()
    bad[0, 1] = 0.8  # P[0,1] + P[1,0] = 0.9
    with pytest.raises(ValueError, match=r"P \+ Pᵀ = 1"):
        tb.PreferenceGame(bad, mu, 0.1)
    with pytest.raises(ValueError, match="square"):
        tb.PreferenceGame(P[:2], mu, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tb.PreferenceGame(P * 2 - 0.5, mu, 0.1)
    with pytest.raises(ValueError, match="mu"):
        tb.PreferenceGame(P, torch.tensor([0.5, 0.5, 0.1], dtype=F64), 0.1)
    with pytest.raises(ValueError, match="mu .*positive"):
        tb.PreferenceGame(P, torch.tensor([0.5, 0.5, 0.0], dtype=F64), 0.1)
    with pytest.raises(ValueError, match="tau"):
        tb.PreferenceGame(P, mu, -0.1)
    with pytest.raises(ValueError, match="eta"):
        tb.nash_md(tb.PreferenceGame(P, mu, 0.1), 11.0, 3)  # eta * tau > 1
    with pytest.raises(ValueError, match="pi0"):
        tb.nash_md(tb.PreferenceGame(P, mu, 0.1), 1.0, 3, pi0=torch.ones(3, dtype=F64))


def test_geometric_mixture_is_the_ops_definition():
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(6, generator=g, dtype=F64), 0)
    mu = torch.softmax(torch.randn(6, generator=g, dtype=F64), 0)
    for c in (0.0, 0.3, 1.0):
        direct = pi ** (1 - c) * mu ** c
        torch.testing.assert_close(tb.geometric_mixture(pi, mu, c), direct / direct.sum(),
                                   rtol=1e-14, atol=0)
        torch.testing.assert_close(tb.geometric_mixture(pi, mu, c),
                                   torch.softmax(mix_logits(pi.log(), mu.log(), c), 0))


@pytest.mark.parametrize("name", list(GAMES))
@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_exploitability_is_the_max_over_deviations(name, tau):
    """gap_τ(π) = max_π' P_τ(π' ≻ π) − 1/2: no deviation beats it, the best response attains it,
    and for τ > 0 it equals τ·KL(π‖BR_τ(π))."""
    game = GAMES[name](tau)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        pi = torch.softmax(2 * torch.randn(game.n, generator=g, dtype=F64), 0)
        gap = game.exploitability(pi)
        others = torch.softmax(3 * torch.randn(2000, game.n, generator=g, dtype=F64), -1)
        values = game.regularised_preference(others, pi) - 0.5
        assert float(values.max()) <= float(gap) + 1e-12
        br = game.best_response(pi)
        torch.testing.assert_close(game.regularised_preference(br, pi) - 0.5, gap, rtol=0,
                                   atol=1e-12)
        if tau > 0:
            torch.testing.assert_close(gap, tau * tb.kl(pi, br), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(GAMES))
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.1])
def test_equilibrium_is_certified(name, tau):
    game = GAMES[name](tau)
    eq = tb.solve_equilibrium(game)
    assert abs(float(eq.policy.sum()) - 1) < 1e-12 and bool((eq.policy >= 0).all())
    assert 0 <= eq.gap + 1e-15 and eq.gap <= (1e-10 if tau == 0 else 1e-12)
    if tau > 0:  # π* = BR_τ(π*)
        torch.testing.assert_close(game.best_response(eq.policy), eq.policy, rtol=1e-10, atol=0)


def test_equilibrium_of_the_interior_game_is_the_planted_one():
    game, x = _interior5(0.0)
    torch.testing.assert_close(tb.solve_equilibrium(game).policy, x, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Nash-MD: the paper's last-iterate convergence
# ------------------------------------------------------------------------------------------------
TAU = 0.1
T = 2000


@pytest.mark.parametrize("name", list(GAMES))
@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
def test_nash_md_last_iterate_converges_at_the_theorems_rate(name, schedule):
    """Nash-MD's last iterate obeys the one-step inequality of ``nashkern.tabular`` at every step,

        KL(π*‖π_{t+1}) ≤ (1 − η_t τ) KL(π*‖π_t) + η_t²/8          (η_t τ ≤ 1),

    hence ``KL(π*‖π_t) ≤ B_t`` (``B_{t+1} = (1 − η_t τ) B_t + η_t²/8``, ``B_0 = KL(π*‖μ)``), and
    its exploitability ``gap_τ(π_t) ≤ ½(1 + τ span log(π_t/μ)) sqrt(2 B_t)``
    (:func:`exploitability_bound`). Constant ``η = 0.1`` (ητ = 0.01): ``B_T = 0.99^T B_0 +
    (η/8τ)(1 − 0.99^T)`` → ``η/(8τ) = 0.125`` (the O(η) floor of a constant step). Decreasing
    ``η_t = 2/(τ(t+2))``: ``B_T ≤ 1/(2τ²(T+1))`` (= 0.025 at T = 2000): the last iterate converges
    to π*_τ itself. The thresholds are these bounds, nothing else."""
    game = GAMES[name](TAU)
    star = tb.solve_equilibrium(game).policy
    eta = 0.1 if schedule == "constant" else tb.decreasing_step(TAU)
    traj = tb.nash_md(game, eta, T)
    gaps, dists = tb.trajectory_metrics(game, traj, star)
    etas = torch.tensor([eta(t) if callable(eta) else eta for t in range(T)], dtype=F64)
    slack = 1e-12  # float64 rounding of KL
    assert bool((dists[1:] <= (1 - etas * TAU) * dists[:-1] + etas ** 2 / 8 + slack).all())
    bound = tb.nash_md_kl_bound(float(dists[0]), TAU, eta, T)
    assert bool((dists <= bound + slack).all())
    for t in range(0, T + 1, 100):
        assert float(gaps[t]) <= tb.exploitability_bound(game, traj[t], float(bound[t])) + slack
    if schedule == "decreasing":
        closed_form = 1 / (2 * TAU ** 2 * (torch.arange(1, T + 1, dtype=F64) + 1))
        assert bool((dists[1:] <= closed_form + slack).all())
    else:
        closed_form = (1 - 0.1 * TAU) ** T * float(dists[0]) + 0.1 / (8 * TAU)
        assert float(bound[-1]) <= closed_form + 1e-12
    assert float(dists[-1]) < float(dists[0]) and float(gaps[-1]) < float(gaps[0])


@pytest.mark.parametrize("name", list(GAMES))
def test_nash_md_constant_step_settles_on_its_fixed_point(name):
    """With a constant step Nash-MD converges to the fixed point ``π̂ ∝ μ exp(P(· ≻ π̂^c)/τ)``,
    ``c = ητ`` (``solve_equilibrium(coef=c)``, the same point the Nash-MD policy gradient is
    stationary at with ``beta = τ, mixture_coef = c``), and its KL to π*_τ is within the limit of
    the bound above, ``η/(8τ)``."""
    game = GAMES[name](TAU)
    eta = 1.0
    fixed = tb.solve_equilibrium(game, coef=eta * TAU).policy
    traj = tb.nash_md(game, eta, 1000)
    assert float(tb.kl(fixed, traj[-1])) < 1e-12
    star = tb.solve_equilibrium(game).policy
    assert float(tb.kl(star, fixed)) <= eta / (8 * TAU)


# ------------------------------------------------------------------------------------------------
# the baselines do not converge in the last iterate
# ------------------------------------------------------------------------------------------------
def _pure_exploitability_floor(game):
    """Every pure policy δ_y is exploitable by ``max_y' P(y' ≻ y) − 1/2``; the least of these
    over y (> 0 iff there is no Condorcet winner) bounds the exploitability of any pure policy
    (τ = 0) from below."""
    return float(game.P.max(0).values.min()) - 0.5


@pytest.mark.parametrize("which", ["cyclic", "interior5"])
def test_unregularised_self_play_and_best_responses_do_not_converge(which):
    """τ = 0 (where Nash-MD and self-play are the same multiplicative-weights update).

    Self-play (MWU) moves *away* from an interior equilibrium x at every step: with
    ``P(y ≻ x) = 1/2`` for every y, ``P(x ≻ π) = 1/2`` for every π, so
    ``KL(x‖π_{t+1}) − KL(x‖π_t) = −η P(x ≻ π_t) + log Σ π_t e^{η P(·≻π_t)} ≥ −η/2 + η/2 = 0``
    (Jensen, ``Σ π_t P(· ≻ π_t) = 1/2``). Best response and fictitious play play pure policies
    after the first step, whose exploitability is at least the pure floor (> 0: no Condorcet
    winner)."""
    game, x = _interior5(0.0) if which == "interior5" else (_cyclic(0.0), None)
    if x is None:
        x = tb.solve_equilibrium(game).policy
    assert bool((x > 0).all())
    pi0 = torch.softmax(torch.log(game.mu) + 0.1, 0)
    traj = tb.self_play(game, 0.1, 3000, pi0=pi0)
    _, dists = tb.trajectory_metrics(game, traj, x)
    assert bool((dists[1:] >= dists[:-1] - 1e-13).all()) and float(dists[-1]) > float(dists[0])
    floor = _pure_exploitability_floor(game)
    assert floor > 0
    for run in (tb.iterated_best_response(game, 300), tb.fictitious_play(game, 300)):
        gaps, _ = tb.trajectory_metrics(game, run, x)
        assert float(gaps[1:].min()) >= floor - 1e-12


@pytest.mark.parametrize("name", list(GAMES))
def test_regularised_self_play_and_best_response_are_repelled_where_nash_md_converges(name):
    """τ = 0.05, ητ = 0.5 (``mixture_coef = 0.5``, the trainers' default): the linearisation of
    the self-play map and of the best-response map at π*_τ has spectral radius > 1 — π*_τ repels
    them, so their last iterates cannot converge to it (from almost every start) — while the
    Nash-MD map is a local contraction at its fixed point (radius < 1) and, with the decreasing
    step, obeys the bound of the convergence test. Witness on the trajectories: over the last
    500 of 3000 iterates self-play's and best response's exploitability never drops below 1e-3
    (not a derived number: 10⁹ times the solver's certificate), while Nash-MD's (decreasing
    step) is below its derived bound."""
    tau = 0.05
    game = GAMES[name](tau)
    eta = 0.5 / tau
    star = tb.solve_equilibrium(game).policy
    br_step = lambda g, pi, e: g.best_response(pi)  # noqa: E731
    assert tb.step_spectral_radius(tb.self_play_step, game, star, eta) > 1
    assert tb.step_spectral_radius(br_step, game, star, eta) > 1
    fixed = tb.solve_equilibrium(game, coef=eta * tau).policy
    assert tb.step_spectral_radius(tb.nash_md_step, game, fixed, eta) < 1
    steps = 3000
    for run in (tb.self_play(game, eta, steps), tb.iterated_best_response(game, steps)):
        gaps, _ = tb.trajectory_metrics(game, run, star)
        assert float(gaps[-500:].min()) > 1e-3
    nmd = tb.nash_md(game, tb.decreasing_step(tau), steps)
    gaps, dists = tb.trajectory_metrics(game, nmd, star)
    bound = 1 / (2 * tau ** 2 * (steps + 1))
    assert float(dists[-1]) <= bound
    assert float(gaps[-1]) <= tb.exploitability_bound(game, nmd[-1], bound)


def test_regularised_self_play_converges_with_a_small_step():
    """The other side, stated so nobody over-reads the previous test: with ``ητ = 0.1`` at
    τ = 0.1 regularised self-play (magnetic mirror descent) is a local contraction at π*_τ and
    its last iterate converges — without Nash-MD's O(η) bias. Nash-MD's advantage is its
    guarantee for every ``η ≤ 1/τ`` (the one-step inequality), not a faster rate."""
    game = _cyclic(0.1)
    star = tb.solve_equilibrium(game).policy
    eta = 1.0
    assert tb.step_spectral_radius(tb.self_play_step, game, star, eta) < 1
    traj = tb.self_play(game, eta, 1000)
    assert float(tb.kl(star, traj[-1])) < 1e-12


# ------------------------------------------------------------------------------------------------
# Nash-EMA: self-play against the policy of the averaged logits
# ------------------------------------------------------------------------------------------------
def test_nash_ema_end_points():
    """β = 0 is self-play, iterate for iterate (bit for bit); β = 1 keeps the opponent at π_0, so
    the policy goes to the best response BR_τ(π_0) (at the rate (1 − ητ)^t of the KL step)."""
    game = _cyclic(0.1)
    eta = 5.0
    assert torch.equal(tb.nash_ema(game, eta, 0.0, 50), tb.self_play(game, eta, 50))
    pi0 = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    traj, opponents = tb.nash_ema(game, eta, 1.0, 60, pi0=pi0, return_opponents=True)
    assert bool((opponents - pi0).abs().max() < 1e-15)
    assert float(tb.kl(game.best_response(pi0), traj[-1])) < 1e-15


@pytest.mark.parametrize("name", list(GAMES))
def test_nash_ema_fixed_point_is_the_equilibrium_and_convergence_is_local(name):
    """What holds for Nash-EMA and what does not, at τ = 0.05, ητ = 0.5 (where self-play
    cycles). (1) Its fixed point is π*_τ itself (θ̄ = θ, then the self-play fixed point):
    one step from (π*, π*) returns π*, and a converging run ends at π*_τ exactly (KL < 1e-12),
    not at Nash-MD's constant-step point π̂ (KL(π*‖π̂) > 1e-3). (2) Convergence is decided by
    the spectral radius at π*_τ, which depends on β and on the game: β = 0.95 gives < 1 on both
    games and the last iterate converges; β = 0.5 gives > 1 and it does not (exploitability
    over the last 500 of 2000 iterates stays above 1e-3, as for self-play): no guarantee like
    Nash-MD's one-step inequality."""
    tau = 0.05
    game = GAMES[name](tau)
    eta = 0.5 / tau
    star = tb.solve_equilibrium(game).policy
    torch.testing.assert_close(tb.nash_ema_step(game, star, star, eta), star, rtol=0, atol=1e-13)
    fixed = tb.solve_equilibrium(game, coef=eta * tau).policy
    assert float(tb.kl(star, fixed)) > 1e-3
    steps = 2000
    assert tb.nash_ema_spectral_radius(game, eta, 0.95) < 1
    traj = tb.nash_ema(game, eta, 0.95, steps)
    assert float(tb.kl(star, traj[-1])) < 1e-12
    assert tb.nash_ema_spectral_radius(game, eta, 0.5) > 1
    gaps, _ = tb.trajectory_metrics(game, tb.nash_ema(game, eta, 0.5, steps), star)
    assert float(gaps[-500:].min()) > 1e-3
    with pytest.raises(ValueError, match="decay"):
        tb.nash_ema(game, eta, 1.5, 1)


# ------------------------------------------------------------------------------------------------
# RLHF: a Bradley–Terry reward, then the KL-regularised optimum
# ------------------------------------------------------------------------------------------------
def test_bradley_terry_fit_recovers_the_reward():
    r = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.2, 0.0], dtype=F64)
    fitted = tb.fit_bradley_terry(tb.bradley_terry_preferences(r))
    torch.testing.assert_close(fitted, r - r.mean(), rtol=0, atol=1e-9)


def test_rlhf_matches_nash_when_preferences_are_bradley_terry():
    """P = σ(r(y) − r(y')): at τ = 0 the equilibrium is the Condorcet winner argmax r, exactly
    RLHF's policy; at τ > 0 both the RLHF optimum (∝ μ e^{r/τ}) and π*_τ (∝ μ e^{P(·≻π*)/τ},
    P(y ≻ π*) increasing in r(y)) rank the responses by r in the ratio π/μ."""
    r = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.2, 0.0], dtype=F64)
    mu = torch.softmax(torch.tensor([0.3, 0.1, -0.2, -0.5, 0.4, 0.0], dtype=F64), 0)
    P = tb.bradley_terry_preferences(r)
    fitted = tb.fit_bradley_terry(P)
    game0 = tb.PreferenceGame(P, mu, 0.0)
    torch.testing.assert_close(tb.solve_equilibrium(game0).policy, tb.rlhf_policy(game0, fitted),
                               rtol=0, atol=1e-10)
    for tau in (0.05, 0.1, 1.0):
        game = game0.with_tau(tau)
        star = tb.solve_equilibrium(game).policy
        order = torch.argsort(r)
        assert bool((torch.diff((star / mu)[order]) > 0).all())
        assert bool((torch.diff((tb.rlhf_policy(game, fitted) / mu)[order]) > 0).all())


@pytest.mark.parametrize("name", list(GAMES))
def test_rlhf_misses_the_equilibrium_of_a_non_transitive_preference(name):
    """τ = 0: RLHF's policy is pure (argmax of the fitted reward), so its exploitability is at
    least the pure floor > 0 while the equilibrium's is ≤ 1e-10. τ = 0.1: the RLHF optimum's
    exploitability exceeds 1e-6 (10⁶ times the equilibrium's certificate) and the KL to π*_τ
    that Nash-MD is guaranteed after 2000 decreasing steps (``1/(2τ²·2001)``) is smaller than
    KL(π*_τ‖RLHF)."""
    game0 = GAMES[name](0.0)
    fitted = tb.fit_bradley_terry(game0.P)
    floor = _pure_exploitability_floor(game0)
    assert floor > 0
    assert float(game0.exploitability(tb.rlhf_policy(game0, fitted))) >= floor - 1e-12
    game = game0.with_tau(TAU)
    star = tb.solve_equilibrium(game).policy
    rlhf = tb.rlhf_policy(game, fitted)
    assert float(game.exploitability(rlhf)) > 1e-6
    assert float(tb.kl(star, rlhf)) > 1 / (2 * TAU ** 2 * (T + 1))
