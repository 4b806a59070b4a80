"""Bad input gets a clear error naming the argument, before anything is launched."""
import pytest
import torch

from nashkern import ops

V = 11


def z(*lead, dtype=torch.float32):
    return torch.randn(*lead, V, dtype=dtype)


def t(*lead):
    return torch.randint(0, V, lead)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.logprobs(z(3), torch.tensor([0, V, 1])), r"targets must be in \[0, 11\).*found 11"),
    (lambda: ops.logprobs(z(3), torch.tensor([0, -1, 1])), r"targets must be in \[0, 11\).*found -1"),
    (lambda: ops.logprobs(z(3), t(4)), r"targets must have the leading shape of logits"),
    (lambda: ops.logprobs(z(3), torch.zeros(3)), r"targets must be an integer tensor"),
    (lambda: ops.logprobs(z(3), None), r"targets must be a tensor"),
    (lambda: ops.logprobs(z(3).double(), t(3)), r"logits must be float32, bfloat16 or float16"),
    (lambda: ops.logprobs(torch.randn(3, 0), t(3)), r"V >= 1"),
    (lambda: ops.kl(z(3), z(4)), r"ref_logits must have the shape of logits"),
    (lambda: ops.kl(z(3), None), r"ref_logits must be a tensor"),
    (lambda: ops.mixture_logprobs(z(3), z(3), t(3), coef=1.5), r"coef must be in \[0, 1\]"),
    (lambda: ops.mixture_logprobs(z(3), z(3), t(3), coef=-0.1), r"coef must be in \[0, 1\]"),
    (lambda: ops.mixture_logprobs(z(3), z(3), t(3), coef=float("nan")), r"coef must be in \[0, 1\]"),
    (lambda: ops.mixture_logprobs(z(3), z(3), t(3), coef=None), r"coef must be a float"),
    (lambda: ops.token_stats(z(3), t(3), coef=0.5), r"coef was given but ref_logits is None"),
    (lambda: ops.entropy(z(3), temperature=0.0), r"temperature must be a finite float > 0"),
    (lambda: ops.entropy(z(3), temperature=-1.0), r"temperature must be a finite float > 0"),
    (lambda: ops.entropy(z(3), softcap=0.0), r"softcap must be None or a finite float > 0"),
    (lambda: ops.entropy(z(3), backend="cuDNN"), r"backend must be one of"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 9), t(4)),
     r"hidden's last dim \(8\) must equal weight's D \(9\)"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 8).half(), t(4)),
     r"weight must be float32, bfloat16 or float16|must have the same dtype"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8).bfloat16(), torch.randn(V, 8), t(4)),
     r"hidden \(torch.bfloat16\) and weight \(torch.float32\) must have the same dtype"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 8), t(4), bias=torch.randn(V + 1)),
     r"bias must have shape \[V\]"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 8), t(4), ref_hidden=torch.randn(3, 8)),
     r"ref_hidden must have the leading shape of hidden"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 8), t(4), ref_hidden=torch.randn(4, 8),
                                    ref_weight=torch.randn(V + 2, 8)),
     r"ref_weight must have the vocabulary size of weight"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 8), t(4), coef=0.5),
     r"coef was given but ref_hidden is None"),
    (lambda: ops.linear_token_stats(torch.randn(4, 8), torch.randn(V, 8), torch.tensor([0, 1, 2, 99])),
     r"targets must be in \[0, 11\)"),
    (lambda: ops.mixture_sample(z(2), z(2), coef=2.0), r"coef must be in \[0, 1\]"),
    (lambda: ops.mixture_sample(z(2), z(3), coef=0.5), r"ref_logits must have the shape of logits"),
    (lambda: ops.mixture_sample(z(2), z(2), coef=0.5, temperature=0), r"temperature must be"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cuda_backend_on_cpu_tensors_says_why():
    """Without the library: how to build it; with it loaded (a GPU machine, NASHKERN_CUDA_LIB):
    that the tensors are not on the device."""
    from nashkern.backends.cuda import library as cuda_lib

    if cuda_lib.unavailable_reason() is None:
        match = r"backend='cuda' needs CUDA tensors, got cpu"
    else:
        match = r"backend='cuda' needs the CUDA kernels of csrc/.*not usable here: .*make cuda"
    with pytest.raises(ValueError, match=match):
        ops.entropy(z(3), backend="cuda")


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="coef must be a Python float"):
        ops.mixture_logprobs(z(3), z(3), t(3), coef=torch.tensor(0.5))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        ops.entropy([[0.0, 1.0]])


def test_ignore_index_is_not_out_of_range():
    out = ops.logprobs(z(3), torch.tensor([0, -100, 4]))
    assert out[1] == 0


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ops.entropy(z(3), backend="triton")


def test_targets_range_check_never_syncs_off_the_cpu(monkeypatch):
    """Off the CPU (here: meta tensors, which cannot be read on the host at all) the range
    check is one asynchronous device-side assert, no .item(): a CUDA step stays capturable."""
    from nashkern.ops.checks import check_targets

    asserted = []
    monkeypatch.setattr(torch, "_assert_async",
                        lambda cond, msg: asserted.append((cond.device.type, msg)))
    targets = torch.zeros(2, 3, dtype=torch.int32, device="meta")
    flat = check_targets(targets, torch.Size([2, 3]), V, -100, torch.device("meta"), "logits")
    assert flat.shape == (6,) and flat.dtype == torch.long
    assert asserted == [("meta", "nashkern: targets must be in [0, 11) or equal ignore_index=-100")]
