"""``NashEMAConfig`` and ``NashEMATrainer``: Nash-EMA-PG, the second deep-learning algorithm of
*Nash Learning from Human Feedback* (Munos et al., 2023), beside Nash-MD-PG.

Nash-MD-PG plays the policy ``π_θ`` against the geometric mixture ``π_θ^(1−β)·μ^β``; Nash-EMA-PG
plays it against ``π_θ̄``, the policy whose parameters are an exponential moving average of the
policy's past parameters:

    θ̄_0 = θ_0,      θ̄_t = β·θ̄_(t−1) + (1−β)·θ_t      (after every optimizer step)

with the paper's meaning of β (``ema_decay`` here, since ``beta`` is the KL weight τ in these
configs): **β = 0 is self-play** (the opponent is the current policy: no average is kept, and
the step is Nash-MD's at ``mixture_coef = 0`` sample for sample); **β = 1 keeps θ̄ at the
initial parameters θ_0**, a best response against the initial policy (the reference μ when the
policy starts as the reference, as in the paper, where both are the SFT model). In between, the
opponent is a parameter-space average of past policies (not the average of their distributions,
as fictitious play's would be).

Everything else is Nash-MD's step (:class:`~nashkern.rl.nash_md.NashMDTrainer`, of which this is
a subclass overriding only where the opponent comes from): scoring by reward model / judge /
reward functions, ``P(policy ≻ opponent)``, the KL to the reference (``beta``, ``kl_estimator``),
the fused statistics, :func:`~nashkern.rl.losses.nash_md_loss` and the metrics
(``rewards/rejected``, ``val/ref_contain_eos_token`` and ``last_samples["mixture"]`` are the
opponent's; ``ema_decay`` is logged instead of ``mixture_coef``).

What the average costs (:mod:`nashkern.rl.ema`): one float32 copy of this rank's local shards of
the trainable parameters (the adapters only with PEFT; sharded like the policy under FSDP1 /
FSDP2 / ZeRO-3), updated after each optimizer step, saved with each checkpoint and restored on
resume; the opponent's samples come from the policy module itself with θ̄ swapped in for the
generation (a transient backup of the trainable shards; no second model), through the same
KV-cached sampler.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple

import torch
from transformers import TrainerCallback

from . import engines
from .ema import ParameterEMA
from .generation import generate
from .nash_md import NashMDTrainer
from .config import OnlinePreferenceConfig, _as_list

EMA_STATE_NAME = "nash_ema.pt"  # file name in a checkpoint (sharded engines: one per rank)


@dataclass
class NashEMAConfig(OnlinePreferenceConfig):
    """Training arguments of :class:`NashEMATrainer`: the shared online fields (generation,
    scoring, ``beta`` = the KL weight τ) and ``ema_decay`` = the paper's β of Nash-EMA-PG.

    ``beta`` and ``ema_decay`` take a float or a list (one value per epoch; the last value is
    kept after the list ends)."""

    _schedules: ClassVar[Tuple[str, ...]] = ("beta", "ema_decay")

    ema_decay: List[float] = field(default_factory=lambda: [0.9], metadata={
        "help": "The paper's β of Nash-EMA-PG: the opponent's parameters are θ̄ ← β·θ̄ + "
                "(1−β)·θ after every optimizer step, θ̄_0 = θ_0. 0: self-play (the opponent is "
                "the current policy; no average kept); 1: θ̄ stays at the initial parameters "
                "(a best response against the initial policy, the reference when the policy "
                "starts as it). A float in [0, 1] or one per epoch."})
    kl_estimator: str = field(default="sample", metadata={
        "help": "'sample': Σ sg(logπ−logμ)·logπ (as Nash-MD); 'full': exact per-token KL."})



class _UpdateEMA(TrainerCallback):
    """θ̄ ← β·θ̄ + (1−β)·θ right after each optimizer step (before the scheduler step)."""

    def __init__(self, trainer: "NashEMATrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._update_ema()


class NashEMATrainer(NashMDTrainer):
    """Nash-EMA-PG (Munos et al., 2023): Nash-MD's step with the opponent sampled from the
    policy's parameter EMA (module docstring). Same arguments as :class:`NashMDTrainer`."""

    config_class = NashEMAConfig
    _method_name = "Nash-EMA"  # the paper (Munos et al., 2023) is Nash-MD's, inherited

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ema: Optional[ParameterEMA] = None
        self.add_callback(_UpdateEMA(self))

    # -- schedules ----------------------------------------------------------------------------
    @property
    def mixture_coef(self) -> float:
        """0: Nash-EMA's opponent is not mixed with the reference."""
        return 0.0

    @property
    def ema_decay(self) -> float:
        return self._scheduled("ema_decay")

    @property
    def keeps_ema(self) -> bool:
        """False when every scheduled β is 0 (pure self-play: the opponent is the policy, no
        average is needed)."""
        return any(d > 0 for d in _as_list("ema_decay", self.args.ema_decay))

    # -- the average --------------------------------------------------------------------------
    def _ema_module(self):
        """The module whose parameters the optimizer updates, as the average holds them: the
        FSDP1 wrapper (its flat parameters) and the ZeRO-3 engine (whose parameter cache
        :func:`~nashkern.rl.ema.release_gathered` empties), else the model inside DDP /
        DeepSpeed ZeRO-1/2 (FSDP2 and a single process: the model itself)."""
        wrapped = self.model_wrapped if self.model_wrapped is not None else self.model
        return wrapped if engines.engine_of(wrapped) in ("fsdp1", "zero3") else \
            engines.inner_module(wrapped)

    @property
    def ema(self) -> Optional[ParameterEMA]:
        """The parameter average (None with β = 0 throughout), made from the current
        parameters on first use (θ̄_0 = θ_0)."""
        if not self.keeps_ema:
            return None
        module = self._ema_module()
        if self._ema is not None and self._ema.model is not module:
            if self._ema.num_updates:
                raise RuntimeError("the policy was re-wrapped by the engine after its EMA started "
                                   "averaging: the EMA cannot follow it")
            self._ema = None  # made before the engine wrapped the model (e.g. evaluate first)
        if self._ema is None:
            self._ema = ParameterEMA(module)
        return self._ema

    def _update_ema(self) -> None:
        if self.keeps_ema and not self.accelerator.optimizer_step_was_skipped:
            self.ema.update(self.ema_decay)

    def _opponent_samples(self, unwrapped, ids, mask, ref, ref_ctx, coef, common):
        """The opponent's completions: the policy module with θ̄ swapped in (β = 0: the policy
        itself), through the same KV-cached sampler; ``common``'s generator is the stream
        derived from the step's generator, from which Nash-MD's mixture sample draws too
        (:meth:`NashMDTrainer._samples`)."""
        ema = self.ema
        if ema is None:
            return generate(unwrapped, ids, mask, **common)
        with ema.swapped_in():
            return generate(unwrapped, ids, mask, **common)

    def _opponent_metrics(self, coef) -> dict:
        return {"ema_decay": float(self.ema_decay)}

    # -- checkpoints: the average is saved and restored with the optimizer --------------------
    def _ema_path(self, folder: str) -> str:
        if self._ema is not None and self._ema.per_rank:
            return os.path.join(folder, f"nash_ema-rank{self.args.process_index}-of-"
                                        f"{self.args.world_size}.pt")
        return os.path.join(folder, EMA_STATE_NAME)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        ema = self.ema
        if ema is None:
            return
        if ema.per_rank or self.args.should_save:  # replicated: one file
            os.makedirs(output_dir, exist_ok=True)
            torch.save(ema.state_dict(), self._ema_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.keeps_ema:
            return
        ema = self.ema  # made on the engine-wrapped model (resume runs after the wrapping)
        path = self._ema_path(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming Nash-EMA from {checkpoint}: it holds no EMA state "
                f"({os.path.basename(path)}); a checkpoint of another trainer, or of another engine / number of processes, "
                f"cannot restore the opponent's parameters")
        ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
