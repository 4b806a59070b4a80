"""The configuration the online preference trainers share: :class:`OnlinePreferenceConfig`
(the generation, scoring and ``beta`` fields of the original configs, TRL 1.13's defaults) and the
per-epoch schedules of its list fields. Every scalar field is checked once, against the table
:data:`nashkern.rl.checks.FIELD_RULES`; the subclasses' ``__post_init__`` add only what the table
cannot say (choices that depend on another field, warnings).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

from transformers import TrainingArguments

from .checks import check_fields


@dataclass
class OnlinePreferenceConfig(TrainingArguments):
    """Training arguments shared by the online preference trainers (the generation, scoring and
    ``beta`` fields of the original configs). Fields named in ``_schedules`` take a float or a
    list (one value per epoch; the last value is kept after the list ends)."""

    _schedules: ClassVar[Tuple[str, ...]] = ("beta",)

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per completion."})
    max_length: int = field(default=512, metadata={
        "help": "Maximum prompt + completion length; prompts are truncated from the left."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_k: Optional[int] = field(default=0, metadata={"help": "Top-k filtering (0 or None: off)."})
    top_p: Optional[float] = field(default=1.0, metadata={
        "help": "Top-p filtering, in (0, 1] (1 or None: off)."})
    min_p: Optional[float] = field(default=None, metadata={"help": "Min-p filtering (None: off)."})
    repetition_penalty: Optional[float] = field(default=1.0, metadata={
        "help": "Repetition penalty (1 or None: off)."})
    missing_eos_penalty: Optional[float] = field(default=None, metadata={
        "help": "Subtracted from the scores of completions without EOS."})
    beta: List[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "KL weight: a float or one value per epoch (last one kept)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the models."})
    reward_model_path: Optional[str] = field(default=None, metadata={"help": "Reward model path."})
    judge: Optional[str] = field(default=None, metadata={"help": "Judge name (pair_rm)."})
    model_init_kwargs: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "kwargs of AutoModelForCausalLM.from_pretrained when the model is a path."})
    reward_weights: Optional[List[float]] = field(default=None, metadata={
        "help": "Weights of the reward functions (default: all 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False."})
    nonfinite_scores: str = field(default="raise", metadata={
        "help": "A NaN/inf reward, reward-model score or judge probability: 'raise' (an error "
                "naming the scorer and the rows, before any weight changes) or 'skip' (those "
                "prompts are dropped from the loss and counted in scores/nonfinite_count)."})
    allow_unfused_head: bool = field(default=False, metadata={
        "help": "When the output head cannot be separated from the model (so the fused "
                "log-probs cannot run): False raises; True runs the model's own logits in row "
                "chunks, with a warning."})
    warmup_ratio: Optional[float] = field(default=None, metadata={
        "help": "Linear warmup over this fraction of the steps (sets warmup_steps; the "
                "original script's argument)."})
    # -- TRL 1.13's remaining fields (see COMPAT.md): same names, defaults and meaning ---------
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow custom code shipped with a checkpoint: policy, reward model and reward "
                "tokenizer loads from a path."})
    generation_kwargs: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "Overrides of the sampling fields (GenerationConfig names: do_sample, "
                "temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens); other "
                "keys are rejected (nashkern's sampler does not implement them)."})
    cache_implementation: Optional[str] = field(default=None, metadata={
        "help": "KV cache of nashkern's generation: None / 'dynamic', 'static' (prompt + "
                "max_new_tokens slots allocated up front) or 'offloaded' (accelerator only)."})
    compile_decode: Optional[str] = field(default=None, metadata={
        "help": "Compile each model's one-token decode forward (a static KV cache of max_length "
                "positions + torch.compile, fixed shapes): None (eager), 'default', "
                "'reduce-overhead' (CUDA graphs on a GPU) or 'max-autotune-no-cudagraphs'. "
                "Compiled at the first step, reused by the next ones; a new batch size or "
                "max_length recompiles (nashkern.rl.compiled_decode). Not with tensor "
                "parallelism, FSDP or ZeRO-3."})
    use_vllm: bool = field(default=False, metadata={
        "help": "Not supported (the trainer raises): nashkern samples with its own KV-cached "
                "sampler, the mixture needing both models' logits at every token."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "Accepted, unused."})
    vllm_structured_outputs_regex: Optional[str] = field(default=None, metadata={
        "help": "Accepted, unused."})
    vllm_gpu_memory_utilization: Optional[float] = field(default=0.55, metadata={
        "help": "Accepted, unused."})
    vllm_mode: str = field(default="colocate", metadata={"help": "Accepted, unused."})
    vllm_server_base_url: Optional[str] = field(default=None, metadata={
        "help": "Accepted, unused."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Accepted, unused."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Accepted, unused."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Accepted, unused."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Accepted, unused."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Accepted, unused."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Accepted, unused."})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "DeepSpeed ZeRO-3: gather the policy's weights for generation."})
    # TRL's defaults that differ from TrainingArguments': bf16 unless fp16, checkpointing on
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "bf16 mixed precision; unset: True unless fp16 (TRL's default)."})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={
        "help": "Deprecated alias of activation_checkpointing; unset: True (TRL's default)."})

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs",
                                                                 "generation_kwargs"]

    def __post_init__(self):
        for name in self._schedules:
            setattr(self, name, _as_list(name, getattr(self, name)))
        check_fields(self)  # every scalar field against nashkern.rl.checks.FIELD_RULES
        if self.warmup_ratio is not None:
            self.warmup_steps = float(self.warmup_ratio)
        if self.max_length is not None and self.max_new_tokens >= self.max_length:
            warnings.warn(  # TRL 1.13 warns here too
                f"max_new_tokens ({self.max_new_tokens}) >= max_length ({self.max_length}): every "
                f"prompt is cut to its last token. To keep prompts, make max_length > "
                f"max_new_tokens + the prompt length.", UserWarning, stacklevel=3)
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        self._trl_defaults()
        super().__post_init__()
        for name in self._schedules:  # TRL 1.13: a single value is a float, not a list
            values = getattr(self, name)
            if len(values) == 1:
                setattr(self, name, values[0])

    def _trl_defaults(self) -> None:
        """TRL 1.13's defaults where they differ from ``TrainingArguments``': ``bf16`` True
        unless ``fp16`` (with the error TRL gives where bf16 is unavailable, clearer), and
        activation (gradient) checkpointing on unless set either way."""
        if self.bf16 is None:
            self.bf16 = not self.fp16
            if self.bf16 and not self.use_cpu and not _bf16_available():
                raise ValueError(
                    f"{type(self).__name__} defaults to bf16=True (as TRL 1.13 does), and this "
                    f"machine has no bf16-capable accelerator: pass use_cpu=True (bf16 autocast "
                    f"on the CPU) or bf16=False (float32)")
        if self.gradient_checkpointing is not None:
            return
        if _HAS_ACTIVATION_CHECKPOINTING:  # transformers >= 5.23: the new name, the old an alias
            if self.activation_checkpointing is None:
                self.activation_checkpointing = True
        else:  # older releases know gradient_checkpointing only
            self.gradient_checkpointing = True


# ``TrainingArguments.activation_checkpointing`` exists from transformers 5.23 (with
# ``gradient_checkpointing`` kept as its deprecated alias); before, only the old name.
_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {
    f.name for f in dataclasses.fields(TrainingArguments)}


def _bf16_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def _as_list(name, value) -> List[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a float or a list of floats, got {value!r}")
    try:
        value = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float or a list of floats, got {value!r}") from None
    if not value:
        raise ValueError(f"{name} must be a float or a non-empty list of floats")
    return value


def _per_epoch(values: Union[float, List[float]], epoch: float) -> float:
    # The original indexed the list with the float ``state.epoch`` (a TypeError for a list);
    # the documented behaviour is one value per epoch, the last one kept.
    if isinstance(values, (int, float)):
        return float(values)
    return values[min(int(epoch or 0), len(values) - 1)]
