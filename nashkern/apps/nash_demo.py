"""``nashkern nash-demo``: does Nash-MD find the Nash equilibrium? The paper's tabular algorithms
(:mod:`nashkern.tabular`) and the LM trainers (:class:`~nashkern.rl.nash_md.NashMDTrainer`,
:class:`~nashkern.rl.nash_ema.NashEMATrainer`) on the same non-transitive preference game.

The LM game: one prompt (``"q"``), a tiny causal LM whose completion is one token
(``max_new_tokens=1``) among the responses ``y0 … y{n−1}``; its tokenizer's vocabulary is those
responses, the prompt token and three specials. The reference μ is the initial policy: its lm_head
is set so that the distribution over the responses at the prompt is exactly the game's μ and the
non-response tokens get ``e⁻¹²``-times less mass (a non-response completion loses every
comparison, so it stays negligible). Routes:

* ``judge`` — the Nash route: a :class:`PreferenceMatrixJudge` decides each (policy, mixture)
  pair by *sampling* from ``P`` (a Bernoulli draw per pair);
* ``bt`` — the reward-model route: the same trainer with a reward function returning the
  Bradley–Terry reward fitted to ``P`` (:func:`nashkern.tabular.fit_bradley_terry`), so its
  preference is ``σ(r(y) − r(y'))``, a transitive model of ``P``.

Mapping (tabular ↔ trainer): ``beta = τ``; ``mixture_coef = c = ητ`` (the opponent of both is
``π^(1−c) μ^c``). The trainer's expected gradient is that of ``β KL(π‖μ) − P(π ≻ sg(π_mix))``,
stationary at ``π̂_c ∝ μ exp(P(· ≻ π̂_c^c)/β)`` — exactly the fixed point of tabular Nash-MD with
the constant step ``η = c/τ`` (``solve_equilibrium(game, coef=c)``), which tends to ``π*_τ`` as
``c → 0`` (``KL(π*_τ‖π̂_c) ≤ η/(8τ)``). What is approximate: the learning rate replaces the exact
mirror step (Adam on the network's weights, not a natural-gradient step on the policy), and each
step sees a batch of sampled pairs and sampled judgements instead of the exact ``P(· ≻ π_mix)``.

Nash-EMA (:class:`~nashkern.rl.nash_ema.NashEMATrainer`, tabular :func:`nashkern.tabular.nash_ema`):
the opponent is the policy of the EMA of the parameters (decay ``ema_decay``, the paper's β), so
the expected gradient vanishes where ``θ̄ = θ`` and ``π ∝ μ exp(P(· ≻ π)/β)``: at π*_τ itself,
with no ``c``-bias; whether the iteration gets there is not guaranteed (the EMA damps
self-play's cycling for a suitable decay, too small a decay cycles, too large a one is slow).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .. import tabular as tb
from ..rl.judges import BasePairwiseJudge

SPECIAL = ["<pad>", "<eos>", "<unk>"]
PROMPT = "q"
NON_RESPONSE_LOGIT_GAP = 12.0  # non-response tokens start e^-12 below the least likely response


def responses(n: int) -> List[str]:
    return [f"y{i}" for i in range(n)]


def response_tokenizer(names: Sequence[str]):
    """Word-level ``PreTrainedTokenizerFast``: specials (pad=0, eos=1, unk=2), the prompt token
    (3), then one token per response (4 …)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [PROMPT] + list(names))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


class PreferenceMatrixJudge(BasePairwiseJudge):
    """Decides each pair ``(a, b)`` of response texts by sampling: ``a`` wins with probability
    ``P[a, b]``. A completion that is not a response loses to one that is (two non-responses:
    -1, undecided)."""

    def __init__(self, P: torch.Tensor, names: Sequence[str], seed: int = 0):
        P = torch.as_tensor(P, dtype=torch.float64)
        if P.shape != (len(names), len(names)):
            raise ValueError(f"P must be [n, n] with n = len(names) = {len(names)}, got "
                             f"{tuple(P.shape)}")
        self.P = P.tolist()
        self.index = {name: i for i, name in enumerate(names)}
        self.rng = random.Random(seed)

    def judge(self, prompts, completions, shuffle_order=True):
        out = []
        for a, b in completions:
            i, j = self.index.get(a.strip()), self.index.get(b.strip())
            if i is None or j is None:
                out.append(-1 if i is None and j is None else (1 if i is None else 0))
            else:
                out.append(0 if self.rng.random() < self.P[i][j] else 1)
        return out


def reward_function(reward: torch.Tensor, names: Sequence[str]):
    """A reward function (``nashkern`` signature) returning ``reward[y]`` for response ``y`` and
    ``min(reward) − 20`` for anything else (it loses every comparison: σ(−20) ≈ 2e-9)."""
    values = {name: float(r) for name, r in zip(names, reward)}
    losing = float(min(values.values())) - 20.0

    def bradley_terry_reward(prompts, completions, completion_ids=None, **kwargs):
        return [values.get(c.strip(), losing) for c in completions]

    return bradley_terry_reward


def _prompt_ids(model, tok) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids.to(next(model.parameters()).device)


def response_ids(tok, names: Sequence[str]) -> List[int]:
    return [tok.convert_tokens_to_ids(name) for name in names]


def make_policy(tok, names: Sequence[str], mu: torch.Tensor, *, hidden: int = 16,
                seed: int = 0):
    """A tiny Qwen2-style causal LM (untied head) whose next-token distribution at the prompt is
    μ on the responses (non-responses ``NON_RESPONSE_LOGIT_GAP`` nats below): the head's rows are
    shifted along the prompt's final hidden state ``h`` so that ``logits = target``."""
    from .tiny import tiny_causal_lm

    model = tiny_causal_lm(seed=seed, vocab_size=len(tok), hidden=hidden, layers=1,
                           tie_word_embeddings=False)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_prompt_ids(model, tok), output_hidden_states=True)
        h = out.hidden_states[-1][0, -1].double()  # the head's input at the prompt
        W = model.get_output_embeddings().weight
        log_mu = torch.as_tensor(mu, dtype=torch.float64).log()
        target = torch.full((len(tok),), float(log_mu.min()) - NON_RESPONSE_LOGIT_GAP,
                            dtype=torch.float64)
        target[response_ids(tok, names)] = log_mu
        shift = (target - W.double() @ h)[:, None] * h[None, :] / h.dot(h)
        W += shift.to(W.dtype)
    model.train()
    return model


@torch.no_grad()
def response_distribution(model, tok, names: Sequence[str]) -> torch.Tensor:
    """The policy's next-token distribution at the prompt, restricted to the responses and
    renormalised (float64 ``[n]``)."""
    was = model.training
    model.eval()
    try:
        logits = model(input_ids=_prompt_ids(model, tok)).logits[0, -1].double()
    finally:
        model.train(was)
    return torch.softmax(logits[response_ids(tok, names)], -1).cpu()


@dataclass
class LMRun:
    route: str
    policies: torch.Tensor  # [steps + 1, n] the distribution over Y after each step
    seconds: float


def train_lm(P: torch.Tensor, mu: torch.Tensor, *, route: str, beta: float, mixture_coef: float,
             steps: int, batch_size: int = 16, learning_rate: float = 0.005, hidden: int = 16,
             seed: int = 0, output_dir: Optional[str] = None, method: str = "nash_md",
             ema_decay: float = 0.9) -> LMRun:
    """Train the tiny LM with :class:`NashMDTrainer` (``method="nash_md"``, opponent
    ``π^(1−c)·μ^c``, ``c = mixture_coef``) or :class:`~nashkern.rl.nash_ema.NashEMATrainer`
    (``method="nash_ema"``, the opponent the policy of the parameter EMA with decay
    ``ema_decay``; ``mixture_coef`` unused) on the game (``route``: ``"judge"``, the preference
    ``P`` sampled by a judge, or ``"bt"``, the fitted Bradley–Terry reward) and record its
    distribution over the responses after every step. ``mu`` (the reference, set into the
    initial model) and ``P`` are validated as a :class:`~nashkern.tabular.PreferenceGame`.
    ``output_dir``: the trainer's (nothing is saved); a temporary directory when None."""
    import tempfile

    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from ..rl.nash_ema import NashEMAConfig, NashEMATrainer
    from ..rl.nash_md import NashMDConfig, NashMDTrainer

    if route not in ("judge", "bt"):
        raise ValueError(f"route must be 'judge' or 'bt', got {route!r}")
    if method not in ("nash_md", "nash_ema"):
        raise ValueError(f"method must be 'nash_md' or 'nash_ema', got {method!r}")
    game = tb.PreferenceGame(P, mu, beta)
    P, mu = game.P, game.mu
    names = responses(game.n)
    tok = response_tokenizer(names)
    model = make_policy(tok, names, mu, hidden=hidden, seed=seed)
    scorer = (dict(judge=PreferenceMatrixJudge(P, names, seed=seed)) if route == "judge" else
              dict(reward_funcs=reward_function(tb.fit_bradley_terry(P), names)))
    policies = [response_distribution(model, tok, names)]

    class Track(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            policies.append(response_distribution(model, tok, names))

    with tempfile.TemporaryDirectory(prefix="nash_demo_") as tmp:
        Config, Trainer = ((NashMDConfig, NashMDTrainer) if method == "nash_md" else
                           (NashEMAConfig, NashEMATrainer))
        opponent = (dict(mixture_coef=mixture_coef) if method == "nash_md" else
                    dict(ema_decay=ema_decay))
        cfg = Config(
            output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, lr_scheduler_type="constant", max_new_tokens=1,
            temperature=1.0, beta=beta, kl_estimator="full", **opponent,
            logging_steps=max(steps, 1), report_to="none", save_strategy="no", use_cpu=True,
            bf16=False,
            seed=seed, disable_tqdm=True, log_level="error")
        trainer = Trainer(
            model=model, args=cfg, processing_class=tok,
            train_dataset=Dataset.from_dict({"prompt": [PROMPT] * batch_size}),
            callbacks=[Track()], **scorer)
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
        start = time.perf_counter()
        trainer.train()
    return LMRun(route, torch.stack(policies), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# the demo
# ------------------------------------------------------------------------------------------------
DEMO_WINS = (0.99, 0.6, 0.7)   # y0 ≻ y1 (0.99), y1 ≻ y2 (0.6), y2 ≻ y0 (0.7): non-transitive
DEMO_MU = (0.6, 0.3, 0.1)


def demo_game(tau: float) -> tb.PreferenceGame:
    return tb.PreferenceGame(tb.cyclic_preferences(DEMO_WINS),
                             torch.tensor(DEMO_MU, dtype=torch.float64), tau)


def tabular_runs(game: tb.PreferenceGame, coef: float, steps: int,
                 ema_decay: float = 0.9) -> Dict[str, torch.Tensor]:
    """Trajectories ``[steps + 1, n]`` of the tabular methods (RLHF: its optimum, repeated)."""
    eta = coef / game.tau
    rlhf = tb.rlhf_policy(game, tb.fit_bradley_terry(game.P))
    return {
        "Nash-MD, eta_t = 2/(tau(t+2))": tb.nash_md(game, tb.decreasing_step(game.tau), steps),
        f"Nash-MD, eta = {eta:g}": tb.nash_md(game, eta, steps),
        f"Nash-EMA, eta = {eta:g}, beta_ema = {ema_decay:g}": tb.nash_ema(game, eta, ema_decay,
                                                                          steps),
        f"self-play (OMD), eta = {eta:g}": tb.self_play(game, eta, steps),
        "best response": tb.iterated_best_response(game, steps),
        "fictitious play": tb.fictitious_play(game, steps),
        "RLHF (BT reward + KL)": rlhf.expand(steps + 1, -1),
    }


def _tail_max(gaps: torch.Tensor) -> float:
    """The largest exploitability over the last 20% of a curve: a cycling method's final
    iterate can be a lucky snapshot; this column shows whether it has settled."""
    return float(gaps[-max(1, len(gaps) // 5):].max())


@dataclass
class Curve:
    panel: str            # "tabular, τ = …" or "tiny LM, beta = …"
    method: str
    tau: float
    policies: torch.Tensor  # [steps + 1, n]
    exploitability: torch.Tensor  # [steps + 1]
    kl_to_nash: torch.Tensor      # [steps + 1] KL(π*_τ‖π_t)
    final: torch.Tensor   # [n] the last iterate (LM: mean of the last 10% of steps)
    seconds: float = 0.0


def collect_curves(*, beta: float, mixture_coef: float, tabular_steps: int, lm_steps: int,
                   batch_size: int, learning_rate: float, seed: int = 0,
                   ema_decay: float = 0.9) -> List[Curve]:
    """Every method's full curve on the demo game: the tabular methods at τ = beta and
    τ = beta/2, the LM trainers (Nash-MD both routes, Nash-EMA with the judge) at beta."""
    game = demo_game(beta)
    curves = []
    for g in (game, game.with_tau(beta / 2)):
        star = tb.solve_equilibrium(g).policy
        for name, traj in tabular_runs(g, mixture_coef, tabular_steps, ema_decay).items():
            gaps, dists = tb.trajectory_metrics(g, traj, star)
            curves.append(Curve(f"tabular, τ = {g.tau:g}", name, g.tau, traj, gaps, dists,
                                traj[-1]))
    star = tb.solve_equilibrium(game).policy
    for method, route, label in (
            ("nash_md", "judge", "NashMDTrainer, judge samples P"),
            ("nash_ema", "judge", f"NashEMATrainer (beta_ema {ema_decay:g}), judge samples P"),
            ("nash_md", "bt", "NashMDTrainer, fitted BT reward")):
        lm = train_lm(game.P, game.mu, route=route, beta=beta, mixture_coef=mixture_coef,
                      steps=lm_steps, batch_size=batch_size, learning_rate=learning_rate,
                      seed=seed, method=method, ema_decay=ema_decay)
        gaps, dists = tb.trajectory_metrics(game, lm.policies, star)
        k = max(1, lm_steps // 10)  # the LM's last iterate is noisy: average the last 10%
        curves.append(Curve(f"tiny LM, beta = {beta:g}", label, beta,
                            lm.policies, gaps, dists, lm.policies[-k:].mean(0), lm.seconds))
    return curves


def _fmt(p) -> str:
    return "(" + ", ".join(f"{float(x):.3f}" for x in p) + ")"


def run(args) -> int:
    torch.set_num_threads(1)  # tiny model: thread-pool overhead dominates
    game = demo_game(args.beta)
    fixed = tb.solve_equilibrium(game, coef=args.mixture_coef).policy
    print(f"nashkern nash-demo: responses y0 y1 y2, P(y0≻y1) = {DEMO_WINS[0]}, P(y1≻y2) = "
          f"{DEMO_WINS[1]}, P(y2≻y0) = {DEMO_WINS[2]} (non-transitive), μ = {_fmt(game.mu)}; "
          f"tabular at τ = {game.tau:g} and τ = {game.tau / 2:g}, the LM at beta = τ = "
          f"{game.tau:g}; mixture_coef = ητ = {args.mixture_coef:g} (η = mixture_coef / τ)\n")
    for g in (game, game.with_tau(game.tau / 2)):
        eq = tb.solve_equilibrium(g)
        print(f"τ = {g.tau:g}: π*_τ = {_fmt(eq.policy)} (certified: exploitability "
              f"{abs(eq.gap):.0e}); reference μ: exploitability "
              f"{float(g.exploitability(g.mu)):.4f}, KL(π*‖μ) {float(tb.kl(eq.policy, g.mu)):.4f}")
    curves = collect_curves(beta=args.beta, mixture_coef=args.mixture_coef,
                            tabular_steps=args.tabular_steps, lm_steps=args.lm_steps,
                            batch_size=args.batch_size, learning_rate=args.learning_rate,
                            seed=args.seed, ema_decay=args.ema_decay)
    print(f"\n{'τ':14s}{'method':56s}{'final policy':>24s}{'exploitability':>16s}"
          f"{'KL(π*‖π)':>10s}{'max expl. last 20%':>20s}{'min expl. (step)':>20s}")
    for c in curves:
        g = game.with_tau(c.tau)
        star = tb.solve_equilibrium(g).policy
        kind = f"{'LM' if c.panel.startswith('tiny') else 'tabular'} {c.tau:g}"
        name = c.method + (f" ({c.seconds:.0f} s)" if c.seconds else "")
        # max(·, 0): float64 rounding leaves −1e-17 at the equilibrium
        best = int(c.exploitability.argmin())
        print(f"{kind:14s}{name:56s}{_fmt(c.final):>24s}"
              f"{max(float(g.exploitability(c.final)), 0.0):16.4f}"
              f"{max(float(tb.kl(star, c.final)), 0.0):10.4f}"
              f"{max(_tail_max(c.exploitability), 0.0):20.4f}"
              f"{max(float(c.exploitability[best]), 0.0):13.4f} ({best:3d})")
    print(f"\n(tabular: the last of {args.tabular_steps} iterates; LM: the mean distribution "
          f"over the last 10% of {args.lm_steps} steps of {args.batch_size} pairs, learning rate "
          f"{args.learning_rate:g}. The trainer is stationary at Nash-MD's constant-step fixed "
          f"point π̂ = {_fmt(fixed)}: exploitability {float(game.exploitability(fixed)):.4f}, "
          f"KL(π*‖π̂) {float(tb.kl(tb.solve_equilibrium(game).policy, fixed)):.4f}; Nash-EMA's "
          f"only fixed point is π*_τ itself (θ̄ = θ there), reached when the EMA damps "
          f"self-play's cycling: no theorem, see nashkern.tabular.nash_ema.)")
    plot_curves(curves, float(game.exploitability(fixed)),
                os.path.join(os.path.abspath(args.output_dir), "exploitability.png"))
    return 0


def plot_curves(curves: List[Curve], fixed_point_exploitability: float, path: str) -> None:
    """One panel per ``Curve.panel``: exploitability per iteration / step (log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    panels = list(dict.fromkeys(c.panel for c in curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for a, panel in zip(axes[0], panels):
        for c in curves:
            if c.panel == panel:
                gaps = c.exploitability
                a.plot(range(len(gaps)), gaps.clamp_min(1e-10).numpy(), label=c.method)
        if panel.startswith("tiny LM"):
            a.axhline(fixed_point_exploitability, color="gray", ls="--",
                      label="Nash-MD fixed point π̂ (the trainer's target)")
        a.set_yscale("log"), a.set_title(f"{panel}: last-iterate exploitability", fontsize=9)
        a.set_xlabel("training step" if panel.startswith("tiny LM") else "iteration")
        a.set_ylabel("max_π' P_τ(π' ≻ π) − 1/2"), a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")
