"""Tiny models and tokenizer shared by the trainer / generation tests (built locally, no hub)."""
import pytest
import torch

from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm, tiny_qwen2_config, tiny_reward_model  # noqa: F401


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models are dominated by thread-pool overhead on a shared 2-core box: run them on one
    intra-op thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
