"""What the online preference trainers share: :class:`OnlinePreferenceConfig` and
:class:`OnlinePreferenceTrainer`, a thin ``transformers.Trainer`` subclass.

The base class (its config in :mod:`nashkern.rl.config`, its set-up steps in
:mod:`nashkern.rl.trainer_setup`) sets up the models (a path is loaded with ``trust_remote_code`` off; PEFT from
``peft_config`` or a ``PeftModel``; the reference is ``ref_model``, else the PEFT base with the
adapters disabled, else a frozen copy), the tokenizer (pad = EOS when it has no pad token), the
scorer (exactly one of ``reward_model``, ``judge``, ``reward_funcs``; the reward tokenizer is kept
only when it differs from the policy's), the prompt collator, the sampling generator (re-seeded
from (seed, rank, step, micro-batch) at every step, so a resumed run draws what the uninterrupted
run drew), decoding, scoring, metric gathering and logging, and ``training_step``.

The trainers accept TRL 1.13's arguments (positional order, ``reward_funcs`` as models / paths /
callables, ``reward_processing_classes``) and config fields with TRL's defaults next to nashkern's
own ``reward_model=`` / ``judge=`` keywords; ``COMPAT.md`` lists them and every difference.

A method subclass (:class:`~nashkern.rl.nash_md.NashMDTrainer`, :class:`~nashkern.rl.xpo.XPOTrainer`,
:class:`~nashkern.rl.online_dpo.OnlineDPOTrainer`) implements ``compute_loss``: generation →
scoring → fused log-probs (:func:`~nashkern.rl.completion_stats.completion_stats`, no ``[B, T, V]``
logits) → its loss (:mod:`nashkern.rl.losses`) → ``self._record_metrics``.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from . import engines, tensor_parallel
from .checks import (check_finite_loss, finite_rows, is_conversational, judge_choices, kept_mean,
                     nonfinite_parameters, scorer_name)
from .generation import GenerationOutput, SamplingParams
from .judges import BasePairwiseJudge
from .completion_stats import completion_stats
from .pairs import first_preferred, sequence_logps
from .scoring import (ModelRewardFunc, apply_missing_eos_penalty, reward_funcs_scores,
                      reward_model_scores, reward_texts, same_tokenizer)
from .config import OnlinePreferenceConfig, _per_epoch
from .tp_checkpoint import TensorParallelCheckpoints, optimizer_checkpoints_allowed
from .trainer_setup import (PromptCollator, TrainerSetup, _disable_dropout,
                            _merge_reward_processing_classes, _set_reward_pad_token)

#: TRL 1.13's reward function: a reward model, its path, or a callable
#: ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``.
RewardFunc = Union[str, nn.Module, Callable[..., List[Optional[float]]]]


_is_conversational = is_conversational


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------


class _OptimizerTimer(TrainerCallback):
    """``time/optimizer`` of :meth:`OnlinePreferenceTrainer._timed`: from
    ``on_pre_optimizer_step`` to ``on_optimizer_step`` (the optimizer's ``step``)."""

    def __init__(self, trainer):
        self._trainer, self._phase = trainer, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._phase = self._trainer._timed("optimizer")
        self._phase.__enter__()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._phase is not None:
            self._phase.__exit__(None, None, None)
            self._phase = None


class OnlinePreferenceTrainer(TrainerSetup, TensorParallelCheckpoints, Trainer):
    """Base class of the online preference trainers (see the module docstring). Subclasses set
    ``config_class`` and implement ``compute_loss``."""

    config_class = OnlinePreferenceConfig
    #: a reward model in reward_funcs without a tokenizer: load the one at its path (TRL 1.13's
    #: XPO / Online DPO) or use the policy's (False: TRL 1.13's Nash-MD)
    _reward_tokenizer_from_path = True
    #: the method and its paper, named in the model card (model_card.Paper or None); a subclass's
    #: default output_dir and its model-card tag are the method name, lower-case and hyphenated
    #: (set by __init_subclass__: "Online DPO" -> "online-dpo")
    _method_name = "online preference optimisation"
    _paper = None
    _tag_names = ["nashkern"]
    _default_output_dir = "online-preference"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._default_output_dir = cls._method_name.lower().replace(" ", "-")
        cls._tag_names = ["nashkern", cls._default_output_dir]

    def __init__(self, model: Union[str, nn.Module], ref_model: Optional[nn.Module] = None,
                 reward_funcs: Optional[Union[RewardFunc, List[RewardFunc]]] = None,
                 args: Optional[OnlinePreferenceConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None,
                 processing_class: Optional[PreTrainedTokenizerBase] = None,
                 reward_processing_classes=None, peft_config=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), preprocess_logits_for_metrics=None, *,
                 reward_model: Optional[Union[str, nn.Module]] = None,
                 judge: Optional[BasePairwiseJudge] = None,
                 reward_processing_class: Optional[PreTrainedTokenizerBase] = None):
        # Positional order: TRL 1.13's (model, ref_model, reward_funcs, args, data_collator,
        # train_dataset, eval_dataset, processing_class, reward_processing_classes, peft_config,
        # ...); nashkern's own reward_model= / judge= / reward_processing_class= are keywords.
        args = args if args is not None else self.config_class(output_dir=self._default_output_dir)
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got "
                            f"{type(args).__name__}")
        self._check_generation_args(args)
        reward_funcs = self._check_scorers(args, reward_model, judge, reward_funcs)
        reward_processing_classes = _merge_reward_processing_classes(
            reward_processing_classes, reward_processing_class)
        model, model_path = self._load_policy(model, args)
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model cannot be the same object: omit ref_model to "
                             "use a frozen copy (or the PEFT base) as the reference")
        tok = self._load_tokenizer(processing_class, model_path, args)
        model = self._wrap_peft(model, peft_config)
        self.ref_model = self._make_reference(model, ref_model)
        reward_model, reward_processing_class, reward_funcs = self._split_reward_funcs(
            args, reward_model, reward_processing_classes, reward_funcs, tok)
        self.reward_model, reward_processing_class = self._load_reward_model(
            reward_model, reward_processing_class, args)
        if self.reward_model is not None:
            _set_reward_pad_token(self.reward_model, reward_processing_class or tok)
        self.reward_processing_class = (None if same_tokenizer(tok, reward_processing_class)
                                        else reward_processing_class)
        self.judge = judge
        self.reward_funcs = reward_funcs
        if args.disable_dropout:
            _disable_dropout(model)
            if self.ref_model is not None:
                _disable_dropout(self.ref_model)
        self._check_reward_model(tok)
        self._check_lengths(model, args)
        self._check_vocabularies(model, tok)
        self._check_datasets(tok, train_dataset=train_dataset, eval_dataset=eval_dataset)
        args.remove_unused_columns = False
        with optimizer_checkpoints_allowed(model, args):  # TP: saved per rank (tp_checkpoint)
            super().__init__(model=model, args=args,
                             data_collator=data_collator or PromptCollator(tok),
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tok, compute_metrics=compute_metrics,
                             callbacks=callbacks, optimizers=optimizers,
                             preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        self._engine = engines.engine_of_accelerator(self.accelerator)
        if args.nonfinite_scores == "skip" and self._engine == "deepspeed":
            # the correction of an all-dropped micro-batch rescales the accumulated gradient
            # between the engine's backward and its step; only ZeRO-3's gradient partitions
            # have a per-rank accessor for that (deepspeed.utils.safe_set_local_grad)
            raise ValueError("nonfinite_scores='skip' is not supported under DeepSpeed ZeRO "
                             f"stage {self.accelerator.state.deepspeed_plugin.zero_stage}: a "
                             "micro-batch whose prompts were all dropped would scale the step "
                             "down. Use ZeRO stage 3, FSDP or DDP, or nonfinite_scores='raise'")
        self._prepare_reference()
        if self.reward_model is not None:
            self.reward_model.to(self.accelerator.device)
        for f in self.reward_funcs or []:
            if isinstance(f, ModelRewardFunc):
                f.model.to(self.accelerator.device)
        self.generation_config = self._make_generation_config(args, tok)
        try:  # the sampling parameters of every step, checked now rather than at step 1
            self._sampling_params()
        except ValueError as e:
            raise ValueError(f"{e} (the generation config built from the config's sampling "
                             f"fields and generation_kwargs={args.generation_kwargs!r})") from None
        self.stats: Dict[str, List[float]] = defaultdict(list)
        self.last_samples: List[Dict[str, Any]] = []
        self._compiled_decode = self._make_compiled_decode(model, args)  # None: eager decode
        self._generator = None
        self._micro_step, self._micro = None, 0  # (optimizer step, micro-batch) of the last draw
        self._evaluating = False  # inside evaluate(): metrics go to _eval_stats
        self._eval_stats: Dict[str, List[float]] = defaultdict(list)
        self._truncation_warned = False
        self._keep = None  # bool [B]: the prompts kept by the last _kept_rows (None: not run)
        self.add_callback(_OptimizerTimer(self))


    # -- schedules ----------------------------------------------------------------------------
    def _scheduled(self, name: str) -> float:
        return _per_epoch(getattr(self.args, name), self.state.epoch)

    @property
    def beta(self) -> float:
        return self._scheduled("beta")

    @property
    def use_vllm(self) -> bool:
        """TRL 1.13's attribute; always False (``use_vllm=True`` is refused at construction)."""
        return bool(self.args.use_vllm)

    # -- step pieces --------------------------------------------------------------------------
    def _sampling_params(self) -> SamplingParams:
        """This step's sampling parameters, read from ``self.generation_config``."""
        g = self.generation_config
        greedy = not g.do_sample  # the temperature does not matter (it may then be 0)
        return SamplingParams(max_new_tokens=g.max_new_tokens,
                              temperature=1.0 if greedy or g.temperature is None
                              else g.temperature,
                              top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
                              repetition_penalty=g.repetition_penalty,
                              do_sample=bool(g.do_sample))

    def _generation_kwargs(self, generator: torch.Generator) -> Dict[str, Any]:
        """Keyword arguments of :func:`~nashkern.rl.generation.generate` for this step."""
        tok = self.processing_class
        params = self._sampling_params()
        # max_new_tokens >= max_length (a warning at config time, as TRL): prompts keep 1 token.
        # max_length=None: no length limit of the config's; prompts are cut only to what the
        # model's positions hold (max_position_embeddings, when the config has one)
        max_length = self.args.max_length
        if max_length is None:
            max_length = self._position_limit
        if max_length is not None:
            max_length = max(max_length, params.max_new_tokens + 1)
        return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    params=params, max_length=max_length, generator=generator,
                    cache_implementation=getattr(self.generation_config,
                                                 "cache_implementation", None),
                    compiled_decode=self._compiled_decode,
                    **self._engine_generation_kwargs())

    def _engine_generation_kwargs(self) -> Dict[str, Any]:
        """Rank-synchronised stepping and the gathering the training engine needs
        (:mod:`nashkern.rl.engines`)."""
        policy, ref = self.model_wrapped, self.ref_model
        gather = self.args.ds3_gather_for_generation
        return dict(synced_gpus=engines.needs_synced_generation(policy, ref),
                    gather_context=lambda: self._generation_context(policy, ref, gather))

    @contextlib.contextmanager
    def _generation_context(self, policy, ref, gather_zero3: bool):
        """The engine's gathering (:func:`~nashkern.rl.engines.generation_context`) under the
        training's mixed precision (``bf16`` / ``fp16``: accelerate's autocast): generation calls
        the unwrapped models, bypassing the engine's own input casting, so a reference whose
        nested FSDP1 units compute in bf16 would otherwise get float32 inputs from its root."""
        with self.accelerator.autocast(), engines.generation_context(
                policy, ref, gather_zero3=gather_zero3):
            yield

    def _ref(self, unwrapped):
        """``(reference model, context factory)``: the given / copied reference, or the PEFT
        model itself under ``disable_adapter`` (the base model)."""
        if self.ref_model is not None:
            return self.ref_model, None
        return unwrapped, unwrapped.disable_adapter  # PEFT base, adapters disabled

    def _gen(self, device) -> torch.Generator:
        """The sampling generator, re-seeded from (seed, process, optimizer step, micro-batch)
        at every call: samples depend only on where training is, so a run resumed from a
        checkpoint draws exactly what the uninterrupted run drew, and ranks draw differently."""
        step = int(self.state.global_step)
        self._micro = self._micro + 1 if self._micro_step == step else 0
        self._micro_step = step
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        # the ranks of a tensor-parallel group run one computation: they draw the same samples
        rank = tensor_parallel.sampler_rank(self.model, self.args.process_index)
        key = [self.args.seed, rank, step, self._micro]
        if self._evaluating:  # evaluation draws its own numbers: training's stay as they were
            key.append(1)
        self._generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
                                        >> np.uint64(1)))
        return self._generator

    def _decode(self, ids, mask) -> List[str]:
        return [self.processing_class.decode(row[m.bool()], skip_special_tokens=True)
                for row, m in zip(ids, mask)]

    def _scores(self, inputs, gen: GenerationOutput, completions: List[str]) -> torch.Tensor:
        """Scores ``[N]`` (reward model or reward functions, ``missing_eos_penalty`` applied) of
        ``N`` completions, ``N`` a multiple of the batch: the prompts repeat in order (the
        stacked samples of :func:`~nashkern.rl.pairs.concat_generations`)."""
        tok = self.processing_class
        reps = len(completions) // len(inputs["prompts"])
        if self.reward_model is not None:
            full = self._reward_model_texts(inputs, completions, reps)
            scores = reward_model_scores(
                self.reward_model, gen.input_ids, gen.attention_mask,
                pad_token_id=tok.pad_token_id, texts=full,
                reward_tokenizer=self.reward_processing_class)
            finite_rows(scores, f"reward_model {type(self.reward_model).__name__}",
                        self.args.nonfinite_scores, inputs["prompts"])
        else:
            raw = inputs["raw_prompts"] * reps
            comps = completions
            if _is_conversational(raw[0]):
                comps = [[{"role": "assistant", "content": c}] for c in completions]
            ids = [row[m.bool()].tolist() for row, m in zip(gen.completion_ids,
                                                              gen.completion_mask)]
            columns = {k: list(v) * reps for k, v in inputs.get("columns", {}).items()}
            columns.setdefault("trainer_state", self.state)  # as TRL 1.13 passes it
            scores = reward_funcs_scores(self.reward_funcs, raw, comps, ids,
                                         weights=self.args.reward_weights,
                                         nonfinite=self.args.nonfinite_scores, **columns)
        scores = scores.to(gen.completion_ids.device)
        return apply_missing_eos_penalty(scores, gen.completion_ids, tok.eos_token_id,
                                         self.args.missing_eos_penalty)

    def _reward_model_texts(self, inputs, completions: List[str], reps: int) -> List[str]:
        """Texts the reward model scores when its tokenizer differs from the policy's: the
        conversation rendered by the reward tokenizer's chat template (TRL 1.13) when the
        prompts are conversational and it has one, else the policy's prompt text + completion."""
        raw = inputs["raw_prompts"] * reps
        rtok = self.reward_processing_class
        if rtok is not None and _is_conversational(raw[0]) and getattr(rtok, "chat_template",
                                                                       None):
            return reward_texts(raw, [[{"role": "assistant", "content": c}] for c in completions],
                                rtok)
        return [p + c for p, c in zip(inputs["prompts"] * reps, completions)]

    def _judge_choices(self, prompts: List[str], pairs: List[Tuple[str, str]]) -> List[int]:
        return judge_choices(self.judge, self.judge.judge(prompts, pairs), len(pairs))

    def _kept_rows(self, values: Sequence[Optional[torch.Tensor]], batch_size: int, device,
                   prompts=None) -> torch.Tensor:
        """Bool ``[B]``: the prompts whose values (``[B]`` each, None skipped) are all finite.
        Under ``nonfinite_scores="raise"`` a non-finite value raises, naming the judge (the
        reward functions / model have raised already in :meth:`_scores`); under ``"skip"`` the
        number of dropped prompts, summed over processes (each prompt once: one rank per
        tensor-parallel group), is recorded as ``scores/nonfinite_count``."""
        source = f"judge {scorer_name(self.judge)}" if self.judge is not None else "the scores"
        keep = torch.ones(batch_size, dtype=torch.bool, device=device)
        for v in values:
            if v is not None:
                keep &= finite_rows(v, source, self.args.nonfinite_scores, prompts).to(device)
        if self.args.nonfinite_scores == "skip":
            # the ranks of a tensor-parallel group hold the same prompts: one of them counts
            counts = tensor_parallel.sampler_rank(self.model, self.args.process_index) \
                == self.args.process_index
            dropped = self.accelerator.gather(((~keep).sum() * int(counts)).reshape(1)).sum()
            self._record_metrics({"scores/nonfinite_count": float(dropped)})
        self._keep = keep.detach()
        return keep

    def _pair_logps(self, model, pairs, ref, ref_ctx):
        """Per-sequence log-probs of ``chosen ‖ rejected`` rows (:mod:`~nashkern.rl.pairs`) under
        the policy (with grad) and the reference, in ONE fused pass of each model:
        ``((chosen, rejected), (ref_chosen, ref_rejected))``, each ``[B]``."""
        st = completion_stats(model, pairs.input_ids, pairs.attention_mask, pairs.context_length,
                              ref_model=ref, ref_context=ref_ctx,
                              allow_unfused=self.args.allow_unfused_head)
        return (pairs.split(sequence_logps(st.logprobs, pairs.completion_mask)),
                pairs.split(sequence_logps(st.ref_logprobs, pairs.completion_mask)))

    @staticmethod
    def _kept_mean(per_row: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return kept_mean(per_row, keep)

    def _preference(self, inputs, samples: GenerationOutput, texts: List[str]):
        """For stacked ``first ‖ second`` samples (``2B`` rows): ``(first_chosen [B] bool,
        scores [2B] or None)`` from the judge, or from one scoring pass over the ``2B`` rows."""
        B = len(inputs["prompts"])
        device = samples.completion_ids.device
        if self.judge is not None:
            choices = self._judge_choices(inputs["prompts"], list(zip(texts[:B], texts[B:])))
            return first_preferred(judge_choices=choices, device=device), None
        scores = self._scores(inputs, samples, texts)
        return first_preferred(scores=scores[:B], other_scores=scores[B:]), scores

    # -- metrics ------------------------------------------------------------------------------
    def _record_metrics(self, metrics: Dict[str, Union[torch.Tensor, float]]) -> None:
        """Append one value per metric to ``self.stats``: tensors (per prompt, ``[B]``) are
        gathered across processes and averaged; floats (schedules) are kept as they are."""
        stats = self._eval_stats if self._evaluating else self.stats
        keep = self._keep
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and k.startswith("loss/") and keep is not None \
                    and v.dim() == 1 and v.shape[0] == keep.shape[0] and not bool(keep.all()):
                # nonfinite_scores="skip": a dropped prompt's loss terms are no loss values
                # (NaN: averaged out below, as its scores are), not zeros
                v = torch.where(keep.to(v.device), v.detach().float(), float("nan"))
            if isinstance(v, torch.Tensor):
                v = self.accelerator.gather_for_metrics(v.detach().float().reshape(-1))
                # rows dropped under nonfinite_scores="skip" carry NaN scores: averaged out
                # (their number is scores/nonfinite_count)
                v = v[torch.isfinite(v)].mean().item() if bool(torch.isfinite(v).any()) \
                    else float("nan")
            stats[k].append(float(v))

    @contextlib.contextmanager
    def _timed(self, phase: str):
        """Wall time of one phase of the step, logged as ``time/<phase>`` (seconds, the mean
        over the micro-batches since the last log): ``generation``, ``scoring``, ``statistics``
        (log-prob / KL forward and the loss), ``backward``, ``optimizer``. On a CUDA device the
        phase boundaries synchronise the device (a few syncs per step, next to generation's one
        per token) so that each phase is charged its own kernels. Training only: evaluation's
        metrics stay reproducible."""
        if self._evaluating:
            yield
            return
        device = self.accelerator.device
        sync = device.type == "cuda" and torch.cuda.is_available()
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            self.stats[f"time/{phase}"].append(time.perf_counter() - t0)

    def _records(self, model) -> bool:
        """Whether this ``compute_loss`` records metrics: in training and in ``evaluate()``."""
        return model.training or self._evaluating

    # -- Trainer hooks ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss")

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._warn_long_prompts(inputs)
        self._keep = None
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        check_finite_loss(loss, int(self.state.global_step))
        loss = loss / self.args.gradient_accumulation_steps
        skip = self.args.nonfinite_scores == "skip"
        with self._timed("backward"):
            if self._engine in ("zero3", "deepspeed"):
                factor = self._deepspeed_backward(loss, skip)
            else:
                self.accelerator.backward(loss)
                factor = self._skip_window_factor() if skip else 1.0
                if factor != 1.0:
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(factor)
        return self._logged_loss(loss.detach(), factor) if skip else loss.detach()

    def _deepspeed_backward(self, loss: torch.Tensor, skip: bool) -> float:
        """What accelerate's DeepSpeed backward does (the accumulation boundary, the engine's
        backward, at the boundary the engine's step), with the loss already divided by the
        accumulation steps (``scale_wrt_gas=False``, as ``transformers.Trainer``: DeepSpeed would
        divide it again) and, in "skip" mode, the accumulated gradient rescaled between the
        boundary's backward and the step (:meth:`_skip_window_factor`; ZeRO-3's fp32 gradient
        partitions, DeepSpeed's own accessors). Returns the factor applied (1.0: none)."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        boundary = self.accelerator.sync_gradients
        engine.set_gradient_accumulation_boundary(is_boundary=boundary)
        engine.backward(loss, scale_wrt_gas=False)
        factor = self._skip_window_factor() if skip else 1.0
        if factor != 1.0:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            for p in engine.module.parameters():
                if p.requires_grad:
                    safe_set_local_grad(p, safe_get_local_grad(p) * factor)
        if boundary:
            engine.step()
        return factor

    def _skip_window_factor(self) -> float:
        """``nonfinite_scores="skip"``: a micro-batch whose prompts were all dropped contributes
        no gradient (its loss is 0), but the others were divided by the full number of
        micro-batches. Counted over the accumulation window and all processes (one small
        all-reduce at its last micro-batch, after the backward: the gradients are reduced,
        nothing clipped or stepped yet), the factor ``micro-batches / non-empty micro-batches``
        that makes the accumulated gradient the mean over the micro-batches that had data; 1.0
        before the window's last micro-batch and when none (or every one) was empty."""
        keep = self._keep
        empty = keep is not None and not bool(keep.any())
        self._window = getattr(self, "_window", [0, 0])
        self._window[0] += 1
        self._window[1] += 0 if empty else 1
        if not self.accelerator.sync_gradients:
            return 1.0
        counts = torch.tensor(self._window, dtype=torch.float32, device=self.accelerator.device)
        self._window = [0, 0]
        counts = self.accelerator.reduce(counts, reduction="sum")
        total, nonempty = float(counts[0]), float(counts[1])
        return 1.0 if nonempty in (0.0, total) else total / nonempty

    def _logged_loss(self, loss: torch.Tensor, factor: float) -> torch.Tensor:
        """The value ``transformers.Trainer`` adds up for its ``loss`` log ("skip" mode): the
        window's returns sum to ``factor`` times this rank's summed micro-batch losses, so that
        the logged loss (their mean over the processes) is the mean over the non-empty
        micro-batches, as the gradient is, not averaged with the dropped ones' zeros. A step
        whose every micro-batch was dropped logs 0 (no gradient either)."""
        self._window_loss = getattr(self, "_window_loss", 0.0) + loss
        if not self.accelerator.sync_gradients:
            return loss
        window, self._window_loss = self._window_loss, 0.0
        return loss + (factor - 1.0) * window

    def _warn_long_prompts(self, inputs) -> None:
        """Prompts longer than ``max_length - max_new_tokens`` tokens are truncated from the left
        by :func:`~nashkern.rl.generation.generate`: say so (once per trainer, with a count)."""
        if self.args.max_length is None:
            return
        room = self.args.max_length - self.args.max_new_tokens
        n = int((inputs["attention_mask"].sum(1) > room).sum())
        if n and not self._truncation_warned:
            self._truncation_warned = True
            warnings.warn(f"{n} prompt(s) of this batch are longer than max_length - "
                          f"max_new_tokens = {room} tokens and are truncated from the left "
                          "(further truncations are not reported)", UserWarning)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """Refuses to save non-finite weights (a NaN model never reaches disk unannounced).
        A save the user asks for writes the model card (``README.md``) next to the weights
        (checkpoints write it into ``output_dir``, ``push_to_hub`` writes its own)."""
        bad = nonfinite_parameters(self.model) if self.model is not None else []
        if bad:
            raise FloatingPointError(f"not saving the model to {output_dir or self.args.output_dir}"
                                     f": non-finite weights in {bad}")
        out = super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self.create_model_card(output_dir=output_dir)
        return out

    def _save_checkpoint(self, model, trial):
        """The model card in ``output_dir`` with every checkpoint (as TRL 1.13), then the
        checkpoint."""
        self.create_model_card()
        return super()._save_checkpoint(model, trial)

    def create_model_card(self, model_name: Optional[str] = None,
                          dataset_name: Optional[Union[str, List[str]]] = None,
                          tags: Optional[Union[str, List[str]]] = None, *,
                          output_dir: Optional[str] = None, dataset=None, finetuned_from=None,
                          license: Optional[str] = None, language=None, **unused) -> None:
        """Write ``README.md`` (:func:`~nashkern.rl.model_card.model_card`) into ``output_dir``
        (default ``args.output_dir``), on the main process: TRL 1.13's arguments
        (``model_name``, ``dataset_name``, ``tags``; what ``push_to_hub(**kwargs)`` passes on),
        and ``transformers.Trainer``'s ``dataset`` / ``finetuned_from`` / ``license`` /
        ``language``; the remaining ones of ``Trainer.create_model_card`` (``tasks``,
        ``dataset_tags``, ``dataset_args``) are accepted and not used. The base model is
        ``finetuned_from``, else the policy's ``config._name_or_path``; the tags are
        ``generated_from_trainer``, the trainer's own, the model's ``model_tags`` and ``tags``."""
        from .model_card import model_card

        unknown = set(unused) - {"tasks", "dataset_tags", "dataset_args"}
        if unknown:
            raise TypeError(f"create_model_card() got unexpected keyword arguments "
                            f"{sorted(unknown)}")
        if not self.is_world_process_zero():
            return
        out = output_dir or self.args.output_dir
        if model_name is None:
            model_name = (self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id
                          else os.path.basename(os.path.normpath(out)))
        inner = engines.inner_module(self.model)
        base = getattr(getattr(inner, "config", None), "_name_or_path", None)
        if hasattr(inner, "get_base_model"):  # PEFT: the base model's path
            base = getattr(getattr(inner.get_base_model(), "config", None), "_name_or_path",
                           base)
        tag_list = ["generated_from_trainer", *self._tag_names,
                    *(getattr(inner, "model_tags", None) or []),
                    *([tags] if isinstance(tags, str) else (tags or []))]
        if dataset_name is None:
            dataset_name = dataset
        text = model_card(model_name=model_name, trainer_name=type(self).__name__,
                          method=self._method_name, paper=self._paper,
                          base_model=finetuned_from or base or None, dataset_name=dataset_name,
                          tags=tag_list, hub_model_id=getattr(self, "hub_model_id", None),
                          license=license, language=language)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
            f.write(text)

    # -- evaluation: the method's loss and metrics on eval prompts, no update -----------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        self._warn_long_prompts(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach().mean(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix: str = "eval"):
        """Generation + scoring + loss on every eval batch (``prediction_step``), without an
        update; the method's metrics come back as ``<prefix>_<metric>`` (as in TRL's online
        trainers) next to ``<prefix>_loss``. Training's samples and sampler state are kept."""
        saved = (self.last_samples, self._micro_step, self._micro)
        self._evaluating, self._micro_step = True, None
        self._eval_stats.clear()
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                          ignore_keys=ignore_keys,
                                          metric_key_prefix=metric_key_prefix)
        finally:
            self._evaluating = False
            self.last_samples, self._micro_step, self._micro = saved
        for k, v in self._eval_stats.items():
            out.metrics[f"{metric_key_prefix}_{k}"] = sum(v) / len(v)
        self._eval_stats.clear()
        return out

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if self.stats and self.model is not None and "loss" in logs:
            for k, v in self.stats.items():
                finite = [x for x in v if np.isfinite(x)]
                if finite:  # all-NaN: every prompt of the window dropped (no value to log)
                    logs[k] = sum(finite) / len(finite)
            self.stats.clear()
        return super().log(logs, start_time)
