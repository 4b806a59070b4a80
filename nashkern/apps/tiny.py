"""Tiny Qwen2-style models and a character-level tokenizer built locally (no hub): used by the
demo and the tests."""
from __future__ import annotations

import string

CHARS = string.ascii_lowercase + string.digits + " .,!?'-:\n"
SPECIAL = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(padding_side: str = "left", pad: bool = True):
    """Character-level ``PreTrainedTokenizerFast`` (pad=0, eos=1) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    kw = dict(pad_token="<pad>") if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   padding_side=padding_side, **kw)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2_config(vocab_size: int = len(SPECIAL) + len(CHARS), hidden: int = 32,
                      layers: int = 2, **kw):
    from transformers import Qwen2Config

    cfg = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
               eos_token_id=1, bos_token_id=None)
    cfg.update(kw)
    return Qwen2Config(**cfg)


def tiny_causal_lm(seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_qwen2_config(**kw))


def tiny_reward_model(seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_qwen2_config(num_labels=1, **kw))
