"""The set-up steps of the online preference trainers, apart from the step.

:class:`TrainerSetup` holds what ``OnlinePreferenceTrainer.__init__`` (:mod:`nashkern.rl.online`)
calls once, in this order: the generation and scorer arguments checked, the policy loaded (a path
with ``trust_remote_code`` off) and its tokenizer, PEFT, the reference (``ref_model``, else the
PEFT base with the adapters disabled, else a frozen copy) and its engine preparation, the reward
model / reward functions split and loaded with their tokenizers, the generation config, and the
model, length, vocabulary and dataset checks. The functions here load models for the trainers and
the CLI (:func:`model_load_kwargs`, :func:`load_reward_model`) and collate prompts
(:class:`PromptCollator`, the default data collator). What a training or evaluation step runs
stays in :mod:`nashkern.rl.online`.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerBase)

from . import engines
from .checks import check_prompt_dataset, check_prompts, is_conversational
from .generation import CACHE_IMPLEMENTATIONS
from .scoring import ModelRewardFunc


def _embedding_rows(model) -> Optional[int]:
    """Rows of a model's input embedding (None when it has none)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


class PromptCollator:
    """Prompt-only examples -> left-padded ``input_ids`` / ``attention_mask`` + prompt texts
    (the chat template applied to conversational prompts) + the raw prompts and the other
    columns (passed to reward functions as keyword arguments)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features):
        # rows of a streaming dataset are first seen here (map-style ones at construction too)
        check_prompts([f.get("prompt") if isinstance(f, dict) else f for f in features],
                      "a batch of prompts", self.tokenizer)
        texts = []
        for f in features:
            p = f["prompt"]
            if is_conversational(p):
                p = self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            texts.append(p)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        empty = (enc["attention_mask"].sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt {texts[empty[0]]!r} tokenizes to no tokens: a prompt needs "
                             "at least one token")
        columns = {k: [f[k] for f in features] for k in features[0] if k != "prompt"}
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "prompts": texts, "raw_prompts": [f["prompt"] for f in features],
                "columns": columns}


def model_load_kwargs(model_init_kwargs: Optional[Dict[str, Any]] = None, *,
                      trust_remote_code: bool = False) -> Dict[str, Any]:
    """``from_pretrained`` kwargs of a policy / reference loaded from a path.

    ``trust_remote_code`` stays off unless asked. flash-attention is used when it can be and is
    never required: with no ``attn_implementation`` given, ``"flash_attention_2"`` is chosen
    when the ``flash_attn`` package is installed, a GPU is present and the model is loaded in
    bf16/fp16 (flash-attention's dtypes); otherwise transformers' default (SDPA) stays."""
    kw = dict(model_init_kwargs or {})
    kw.setdefault("trust_remote_code", trust_remote_code)
    if "attn_implementation" not in kw:
        dtype = kw.get("dtype", kw.get("torch_dtype"))
        half = dtype in (torch.bfloat16, torch.float16, "bfloat16", "float16", "bf16", "fp16")
        if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
            kw["attn_implementation"] = "flash_attention_2"
    return kw


def _resolve_dtype(model_init_kwargs: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """TRL 1.13's ``model_init_kwargs["dtype"]``: ``"auto"``, None, a ``torch.dtype`` or its
    name (``"bfloat16"``), anything else an error."""
    if not model_init_kwargs or "dtype" not in model_init_kwargs:
        return model_init_kwargs
    kw, dtype = dict(model_init_kwargs), model_init_kwargs["dtype"]
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"model_init_kwargs['dtype'] must be 'auto' or a torch dtype name "
                             f"(e.g. 'float32'), got {dtype!r}")
        kw["dtype"] = getattr(torch, dtype)
    elif not (dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise ValueError(f"model_init_kwargs['dtype'] must be 'auto' or a torch dtype, got "
                         f"{dtype!r}")
    return kw


def load_reward_model(path: str, args=None) -> nn.Module:
    """A reward model from a path, as TRL 1.13 loads one: ``AutoModelForSequenceClassification``
    with ``num_labels=1`` and ``model_init_kwargs`` (``trust_remote_code`` from the config
    unless given there)."""
    kw = dict(_resolve_dtype(getattr(args, "model_init_kwargs", None)) or {})
    kw.setdefault("trust_remote_code", bool(getattr(args, "trust_remote_code", False)))
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)


def load_reward_tokenizer(path: str, args=None):
    """The tokenizer of a reward model loaded from ``path`` (``revision`` from
    ``model_init_kwargs``, ``trust_remote_code`` from the config, as TRL 1.13)."""
    revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
    return AutoTokenizer.from_pretrained(
        path, revision=revision, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def _set_reward_pad_token(reward_model: nn.Module, tokenizer) -> None:
    """The reward model reads its score at the last non-padding token, so its config must
    know the padding id its inputs use: the tokenizer's (EOS when it has none), as TRL 1.13."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(reward_model, "config", None) is not None:
        reward_model.config.pad_token_id = tokenizer.pad_token_id


def _is_reward_model(f) -> bool:
    return isinstance(f, (str, nn.Module))


def _merge_reward_processing_classes(classes, single):
    """TRL's ``reward_processing_classes`` (a tokenizer or a list aligned with reward_funcs)
    and nashkern's ``reward_processing_class`` name the same thing: at most one of them."""
    if classes is not None and single is not None:
        raise ValueError("reward_processing_classes (TRL 1.13's name) and "
                         "reward_processing_class (nashkern's) were both given: pass one")
    return classes if classes is not None else single


#: GenerationConfig fields nashkern's sampler implements (generation_kwargs may set them).
_SAMPLING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                    "repetition_penalty", "use_cache", "cache_implementation")


class TrainerSetup:
    """The set-up steps of :class:`~nashkern.rl.online.OnlinePreferenceTrainer` (a mixin: its
    ``__init__`` calls each once, around ``Trainer.__init__``, in the order written there; a
    subclass overrides a step only to change that step)."""

    def _check_scorers(self, args, reward_model, judge, reward_funcs):
        """Exactly one of reward_model / judge / reward_funcs; returns reward_funcs as a list."""
        if isinstance(reward_funcs, Callable) and not isinstance(reward_funcs, nn.Module):
            reward_funcs = [reward_funcs]
        if reward_funcs is not None and not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]  # a model or a path (TRL 1.13's reward_funcs)
        given = [n for n, v in (("reward_model", reward_model), ("judge", judge),
                                ("reward_funcs", reward_funcs)) if v]
        if reward_model is not None and any(_is_reward_model(f) for f in reward_funcs or []):
            raise ValueError(
                "a reward model was given twice: as reward_model= (nashkern's keyword) and inside "
                "reward_funcs (TRL 1.13's argument); pass it once, in either place")
        if len(given) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one of reward_model, judge or "
                             f"reward_funcs; got {given or 'none'}")
        if judge is not None and not callable(getattr(judge, "judge", None)):
            raise TypeError(f"judge must have a judge(prompts, completion_pairs) method (a "
                            f"BasePairwiseJudge), got {type(judge).__name__}")
        for i, f in enumerate(reward_funcs or []):
            if not (callable(f) or isinstance(f, str)):  # str: a reward model's path / id
                raise TypeError(f"reward_funcs[{i}] must be a callable, a reward model or its "
                                f"path, got {type(f).__name__}")
        if args.reward_weights is not None and (
                not reward_funcs or len(args.reward_weights) != len(reward_funcs)):
            raise ValueError(f"reward_weights ({len(args.reward_weights)}) needs one weight per "
                             f"reward function ({len(reward_funcs or [])})")
        return list(reward_funcs) if reward_funcs else reward_funcs

    def _check_generation_args(self, args) -> None:
        """``use_vllm`` (unsupported), ``cache_implementation`` and the ``generation_kwargs``
        keys, before anything is loaded."""
        if args.use_vllm:
            raise ValueError(
                f"use_vllm=True is not supported by nashkern's {type(self).__name__}: completions "
                f"are sampled by nashkern's own KV-cached sampler (Nash-MD's mixture samples need "
                f"the policy's and the reference's logits at every token, which vLLM does not "
                f"expose). Set use_vllm=False; the vllm_* fields are accepted and ignored.")
        if args.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got "
                             f"{args.cache_implementation!r}")
        from transformers import GenerationConfig

        get_defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
        defaults = get_defaults() if get_defaults is not None else vars(GenerationConfig())
        for k, v in (args.generation_kwargs or {}).items():
            if k in _SAMPLING_FIELDS or k in ("pad_token_id", "bos_token_id", "eos_token_id"):
                continue
            if k not in defaults or (v is not None and defaults[k] != v):
                raise ValueError(
                    f"generation_kwargs[{k!r}]={v!r} is not supported: nashkern's sampler "
                    f"implements {', '.join(_SAMPLING_FIELDS)} (other GenerationConfig fields "
                    f"only at their default values)")

    def _split_reward_funcs(self, args, reward_model, reward_processing_classes, reward_funcs,
                            tok):
        """TRL 1.13's ``reward_funcs`` (models, paths, callables) -> nashkern's scorers
        ``(reward_model, its tokenizer, reward functions)``; sets ``self.reward_weights``.

        A path is loaded as :func:`load_reward_model`. A single reward model (and weight 1) is
        the ``reward_model`` path (scored on the policy's tokens when it shares the policy's
        tokenizer); models mixed with callables or other models become
        :class:`~nashkern.rl.scoring.ModelRewardFunc`. A model's tokenizer is its entry of
        ``reward_processing_classes``, else loaded from its path (``config._name_or_path``),
        else the policy's."""
        if not reward_funcs:
            self.reward_weights = (None if reward_model is None
                                   else torch.ones(1, dtype=torch.float32))
            rtok = reward_processing_classes
            if isinstance(rtok, (list, tuple)):
                if len(rtok) != 1 or reward_model is None:
                    raise ValueError("reward_processing_classes: one tokenizer for the one reward "
                                     f"model, got {rtok!r}")
                rtok = rtok[0]
            return reward_model, rtok, reward_funcs
        n = len(reward_funcs)
        classes = reward_processing_classes
        if not isinstance(classes, (list, tuple)):
            classes = [classes] * n if n == 1 or classes is None else None
        if classes is None or len(classes) != n:
            raise ValueError(f"reward_processing_classes needs one entry per reward function "
                             f"({n}), got {reward_processing_classes!r}")
        weights = [1.0] * n if args.reward_weights is None else list(args.reward_weights)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        models, funcs = [], []
        for f, rtok in zip(reward_funcs, classes):
            if isinstance(f, str):
                path, f = f, load_reward_model(f, args)
                rtok = rtok if rtok is not None else load_reward_tokenizer(path, args)
            elif isinstance(f, nn.Module) and rtok is None:
                rtok = self._default_reward_tokenizer(f, tok, args)
            if isinstance(f, nn.Module):
                _set_reward_pad_token(f, rtok)
                f.eval()
                f.requires_grad_(False)
                models.append((f, rtok))
                f = ModelRewardFunc(f, rtok, max_length=None)
            funcs.append(f)
        if len(funcs) == 1 and models and weights == [1.0]:
            return models[0][0], models[0][1], None
        return None, None, funcs

    def _default_reward_tokenizer(self, reward_model, tok, args):
        """A reward model given without a tokenizer: TRL 1.13 loads the one saved at its path
        (``config._name_or_path``); a model with no path (built in memory) uses the policy's."""
        path = getattr(getattr(reward_model, "config", None), "_name_or_path", "") or ""
        if path and self._reward_tokenizer_from_path:
            try:
                return load_reward_tokenizer(path, args)
            except (OSError, ValueError) as e:
                raise ValueError(f"could not load the reward model's tokenizer from {path!r} "
                                 f"({e}); pass it as reward_processing_classes") from e
        vocab = getattr(getattr(reward_model, "config", None), "vocab_size", None)
        if vocab is not None and len(tok) > vocab:
            raise ValueError(f"the reward model's vocabulary ({vocab}) is smaller than the "
                             f"policy tokenizer's ({len(tok)}): pass the reward model's tokenizer "
                             f"as reward_processing_classes")
        return tok

    def _make_generation_config(self, args, tok):
        """``trainer.generation_config``: TRL 1.13's ``GenerationConfig`` (sampling fields, then
        ``generation_kwargs`` over them). nashkern's sampler reads it at every step, so changing
        it changes the sampling; ``use_cache`` is True (nashkern's generation always caches)."""
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=args.max_new_tokens, do_sample=True,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, use_cache=True,
                  min_p=args.min_p, cache_implementation=args.cache_implementation)
        kw.update(args.generation_kwargs or {})
        for k in ("pad_token_id", "eos_token_id"):
            if kw.get(k) != getattr(tok, k):
                raise ValueError(f"generation_kwargs[{k!r}]={kw[k]!r} differs from the "
                                 f"tokenizer's ({getattr(tok, k)}): nashkern stops and pads "
                                 f"with the tokenizer's tokens")
        if kw.get("cache_implementation") not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"generation_kwargs['cache_implementation'] must be one of "
                             f"{CACHE_IMPLEMENTATIONS}, got {kw['cache_implementation']!r}")
        return GenerationConfig(**{k: v for k, v in kw.items() if v is not None})

    def _make_compiled_decode(self, model, args):
        """(After ``Trainer.__init__``.) The compiled one-token decode forward of
        ``args.compile_decode`` (None: eager), made once for the trainer's life; raises, naming
        the field, where it cannot be used: no ``max_length``, a cache other than static, an
        architecture without static-cache compile support (policy or reference), tensor
        parallelism, FSDP or ZeRO-3."""
        mode = args.compile_decode
        if mode is None:
            return None
        from .compiled_decode import CompiledDecode, compile_problem
        from .tensor_parallel import model_shard

        def refuse(why):
            raise ValueError(f"compile_decode={mode!r}: {why} (compile_decode=None: the eager "
                             "decode)")

        if args.max_length is None:
            refuse("the static cache holds max_length positions (prompt + completion), and "
                   "max_length is None (the model's whole position range would be allocated): "
                   "set max_length")
        cache = getattr(self.generation_config, "cache_implementation", None)
        if cache not in (None, "static"):
            refuse(f"the compiled decode uses a static KV cache, and cache_implementation (or "
                   f"generation_kwargs['cache_implementation']) is {cache!r} (None or 'static' "
                   f"go with it)")
        for name, m in (("model", model), ("ref_model", self.ref_model)):
            problem = None if m is None else compile_problem(m)
            if problem is not None:
                refuse(f"{name}: {problem}")
        dtensor = getattr(getattr(torch, "distributed", None), "tensor", None)
        dtensor = getattr(dtensor, "DTensor", None)
        if model_shard(model) is not None or (dtensor is not None and any(
                isinstance(p, dtensor) for p in model.parameters())):
            refuse("the model is tensor-parallel (sharded weights)")
        zero3 = self.is_deepspeed_enabled and getattr(
            getattr(self.accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3
        if self.is_fsdp_enabled or zero3:
            refuse("the training engine shards the weights (FSDP / DeepSpeed ZeRO-3: every "
                   "forward gathers them)")
        return CompiledDecode(mode)

    def _load_policy(self, model, args):
        """The policy (loaded when ``model`` is a path) -> (model, path or None)."""
        model_path = model if isinstance(model, str) else None
        if model_path is not None:
            kw = model_load_kwargs(_resolve_dtype(args.model_init_kwargs),
                                   trust_remote_code=args.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model_path, **kw)
        elif args.model_init_kwargs is not None:
            raise ValueError("model_init_kwargs was given but model is already instantiated: it "
                             "applies only when model is a path (as in TRL 1.13)")
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ValueError(f"model must be a causal language model with an output embedding "
                             f"(an AutoModelForCausalLM), got {type(model).__name__}")
        return model, model_path

    @staticmethod
    def _load_tokenizer(processing_class, model_path, args=None):
        """The policy's tokenizer, with a pad token (EOS when it has none) and an EOS token."""
        if processing_class is None:
            if model_path is None:
                raise ValueError("processing_class (the tokenizer) is required when model is "
                                 "not a path")
            processing_class = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=bool(args is not None and args.trust_remote_code))
        if hasattr(processing_class, "tokenizer") and not isinstance(
                processing_class, PreTrainedTokenizerBase):
            raise TypeError(f"processing_class must be a tokenizer: nashkern's trainers are "
                            f"text-only, got a {type(processing_class).__name__} (see COMPAT.md)")
        tok = processing_class
        if tok.pad_token is None:
            warnings.warn("the tokenizer has no pad token: using the EOS token as padding")
            tok.pad_token = tok.eos_token
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token")
        return tok

    def _wrap_peft(self, model, peft_config):
        """Wrap the policy in PEFT adapters when ``peft_config`` is given; sets ``is_peft``."""
        self.is_peft = False
        if peft_config is not None and type(model).__name__.startswith("Peft"):
            raise ValueError("model is already a PeftModel and peft_config was given: merge and "
                             "unload the existing adapter first, or omit peft_config (as TRL 1.13)")
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as e:
                raise ImportError("peft_config needs the `peft` package: pip install peft") from e
            model = get_peft_model(model, peft_config)
            self.is_peft = True
        elif type(model).__name__.startswith("Peft"):
            self.is_peft = True
        return model

    def _make_reference(self, model, ref_model):
        """The frozen reference: ``ref_model``, else None under PEFT (the base with adapters
        disabled), else a frozen copy of the policy."""
        if ref_model is None and not self.is_peft:
            ref_model = engines.copy_reference(model)  # a ZeRO-3-initialised one shard by shard
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
        return ref_model

    def _prepare_reference(self):
        """(After ``Trainer.__init__``, which made the accelerator.) The reference prepared by
        the training engine: sharded under FSDP1 / FSDP2 / ZeRO-3 (frozen, no optimizer), never
        a full copy per rank; on the device otherwise."""
        if self.ref_model is not None:
            self.ref_model = engines.prepare_reference(self.accelerator, self.ref_model)

    @staticmethod
    def _load_reward_model(reward_model, reward_processing_class, args=None):
        """The frozen reward model (loaded when a path) -> (model or None, its tokenizer)."""
        if isinstance(reward_model, str):
            path = reward_model
            reward_model = load_reward_model(path, args)
            if reward_processing_class is None:
                reward_processing_class = load_reward_tokenizer(path, args)
        if reward_model is not None:
            labels = getattr(getattr(reward_model, "config", None), "num_labels", 1)
            if labels != 1:
                raise ValueError(f"reward_model ({type(reward_model).__name__}) has num_labels="
                                 f"{labels}; a reward model returns one score per sequence "
                                 "(num_labels=1)")
            reward_model.eval()
            reward_model.requires_grad_(False)
        return reward_model, reward_processing_class

    def _check_reward_model(self, tok):
        """A reward model that reads the policy's token ids (no reward tokenizer of its own)
        must cover the policy tokenizer's vocabulary."""
        if self.reward_model is None or self.reward_processing_class is not None:
            return
        n = _embedding_rows(self.reward_model)
        if n is not None and n < len(tok):
            raise ValueError(f"reward_model ({type(self.reward_model).__name__}) has a vocabulary "
                             f"of {n} tokens, smaller than the policy tokenizer's {len(tok)}: "
                             "pass its own tokenizer as reward_processing_class (completions are "
                             "then re-tokenised for it)")

    def _check_vocabularies(self, model, tok):
        """The tokenizer's ids fit the policy's embedding, and the reference scores the same
        vocabulary as the policy."""
        n = _embedding_rows(model)
        if n is not None and len(tok) > n:
            raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's embedding only "
                             f"{n} rows: resize_token_embeddings(len(tokenizer)) first")
        if self.ref_model is not None:
            rows = [getattr(getattr(m, "get_output_embeddings", lambda: None)(), "weight", None)
                    for m in (model, self.ref_model)]
            if all(w is not None for w in rows) and rows[0].shape[0] != rows[1].shape[0]:
                raise ValueError(f"ref_model's vocabulary ({rows[1].shape[0]}) differs from the "
                                 f"policy's ({rows[0].shape[0]}): the reference must share the "
                                 "policy's tokenizer")

    def _check_lengths(self, model, args):
        """``max_length`` (prompt + completion) must fit the policy's positions. Longer prompts
        are truncated from the left to ``max_length - max_new_tokens`` tokens, with a warning."""
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        limit = getattr(cfg, "max_position_embeddings", None)
        self._position_limit = limit if isinstance(limit, int) else None
        if not isinstance(limit, int):
            return
        if args.max_length is not None and args.max_length > limit:
            raise ValueError(f"max_length ({args.max_length}) exceeds the model's "
                             f"max_position_embeddings ({limit}); set max_length <= {limit} "
                             "(prompts longer than max_length - max_new_tokens are truncated "
                             "from the left)")
        new_tokens = (args.generation_kwargs or {}).get("max_new_tokens", args.max_new_tokens)
        where = "generation_kwargs['max_new_tokens']" \
            if "max_new_tokens" in (args.generation_kwargs or {}) else "max_new_tokens"
        # a prompt keeps at least one token: generation spans up to max_new_tokens + 1 positions
        if isinstance(new_tokens, int) and new_tokens + 1 > limit:
            raise ValueError(f"{where} ({new_tokens}) + 1 prompt token exceeds the model's "
                             f"max_position_embeddings ({limit}): set {where} <= {limit - 1}")

    def _check_datasets(self, tokenizer=None, **datasets):
        """Every given dataset has a 'prompt' column, at least one row and well-formed prompts
        (:func:`~nashkern.rl.checks.check_prompt_dataset`; streaming datasets are checked batch
        by batch; transformers asks them for ``max_steps``)."""
        for split, ds in datasets.items():
            check_prompt_dataset(split, ds, tokenizer)
