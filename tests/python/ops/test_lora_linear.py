"""Tests of lorafuse.lora_linear: y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ.

References are plain torch in float64, with the dropout mask reproduced independently by a numpy
Philox-4x32-10 (philox_ref.py) from the (seed, offset) the op reports in lora_linear_forward's rng_state.
fp32/fp64 results are compared tightly; fp16/bf16 ones by the rule
err(lorafuse) <= 2 * err(PyTorch in the same dtype) + small atol, both errors measured against the
float64 reference. CUDA cases take the ``device`` fixture from conftest.py and skip without a GPU.
"""

import math
import re

import lorafuse
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_skip_reason
from philox_ref import keep_mask, keep_threshold, philox4x32_10
from torch.library import opcheck

OP = torch.ops.lorafuse.lora_linear.default
FWD = torch.ops.lorafuse.lora_linear_forward.default
BWD = torch.ops.lorafuse.lora_linear_backward.default

GRAD_NAMES = ("x", "lora_a", "lora_b", "bias")

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def make_inputs(
    device,
    in_f,
    out_f,
    r,
    lead=(4,),
    dtype=torch.float32,
    adapter_dtype=None,
    bias=True,
    requires_grad=True,
    seed=0,
):
    """(x, weight, bias, lora_a, lora_b) with O(1) outputs; weight never requires grad.

    Drawn from a private generator, so making inputs never touches torch's default generator."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    x = rnd(*lead, in_f).to(device, dtype)
    w = rnd(out_f, in_f, std=max(in_f, 1) ** -0.5).to(device, dtype)
    b = rnd(out_f).to(device, dtype) if bias else None
    a = rnd(r, in_f, std=max(in_f, 1) ** -0.5).to(device, adapter_dtype)
    bb = rnd(out_f, r, std=r**-0.5).to(device, adapter_dtype)
    if requires_grad:
        for t in (x, b, a, bb):
            if t is not None:
                t.requires_grad_()
    return x, w, b, a, bb


def detached(t):
    return None if t is None else t.detach()


def op_mask(inputs, scale, p, seed):
    """The keep mask (bool, x's shape, on the CPU) that lora_linear draws right after torch.manual_seed(seed).

    Read from the rng_state that lora_linear_forward returns after the same manual_seed, and expanded
    with the numpy Philox; None when p == 0."""
    if p == 0.0:
        return None
    x, w, b, a, bb = inputs
    torch.manual_seed(seed)
    _, _, rng_state = FWD(*(detached(t) for t in (x, w, b, a, bb)), scale, p)
    s, offset = rng_state.cpu().tolist()
    return torch.from_numpy(keep_mask(s, offset, x.numel(), p)).reshape(x.shape)


def plain_lora_linear(x, w, b, a, bb, scale, p=0.0, mask=None):
    """lora_linear in plain torch ops, computing in the tensors' own dtypes. The LoRA branch runs in the
    adapters' dtype (x cast to it, as PEFT does), the sum in x's dtype."""
    base = F.linear(x, w, b)
    xl = x.to(a.dtype)
    if p > 0.0:
        xl = xl * mask.to(xl.device, xl.dtype) / (1.0 - p)
    lora = F.linear(F.linear(xl, a), bb) * scale
    return base + lora.to(base.dtype)


def as_leaves(inputs, dtype=None, adapter_dtype=None):
    """Fresh leaf copies (optionally cast), with the same requires_grad flags."""
    x, w, b, a, bb = inputs

    def cp(t, dt):
        if t is None:
            return None
        return t.detach().to(dt or t.dtype).requires_grad_(t.requires_grad)

    return (
        cp(x, dtype),
        w.detach().to(dtype or w.dtype),
        cp(b, dtype),
        cp(a, adapter_dtype or dtype),
        cp(bb, adapter_dtype or dtype),
    )


def forward_backward(fn, inputs, grad_out):
    """y and the grads {name: tensor} of every input that requires grad, for y = fn(*inputs)."""
    x, w, b, a, bb = inputs
    y = fn(x, w, b, a, bb)
    named = [(n, t) for n, t in zip(GRAD_NAMES, (x, a, bb, b)) if t is not None and t.requires_grad]
    grads = {}
    if named:
        gs = torch.autograd.grad(y, [t for _, t in named], grad_out.to(y.device, y.dtype))
        grads = {n: g for (n, _), g in zip(named, gs)}
    return y.detach(), grads


RULE_ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_accurate(name, ours, ref, baseline=None):
    """fp32/fp64: close to the float64 reference `ref`. fp16/bf16: err(ours) <= 2 * err(baseline) + atol,
    where `baseline` is plain PyTorch in the same dtype and the atol a fraction of an ulp at |ref|'s max."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ref = ref.detach().double().cpu()
    ours_d = ours.detach().double().cpu()
    assert torch.isfinite(ours_d).all(), f"{name}: non-finite values"
    mag = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    if ours.dtype == torch.float64:
        torch.testing.assert_close(ours_d, ref, rtol=1e-10, atol=1e-11 * mag, msg=lambda m: f"{name}: {m}")
    elif ours.dtype == torch.float32:
        torch.testing.assert_close(ours_d, ref, rtol=1e-5, atol=1e-5 * mag, msg=lambda m: f"{name}: {m}")
    else:
        assert baseline is not None, f"{name}: a {ours.dtype} result needs a same-dtype baseline"
        assert baseline.dtype == ours.dtype
        if ref.numel() == 0:
            return
        err_ours = (ours_d - ref).abs().max().item()
        err_torch = (baseline.detach().double().cpu() - ref).abs().max().item()
        bound = 2.0 * err_torch + RULE_ATOL[ours.dtype] * mag
        assert err_ours <= bound, (
            f"{name} ({ours.dtype}): max error {err_ours:.3g} vs float64 reference exceeds "
            f"2 x PyTorch's {err_torch:.3g} + atol = {bound:.3g}"
        )


def check_against_reference(inputs, scale, p, seed=1234, grad_seed=99):
    """Runs lorafuse (after torch.manual_seed(seed)), the float64 reference and plain PyTorch in the inputs'
    dtypes with the op's own dropout mask, and asserts forward and gradients agree."""
    x = inputs[0]
    mask = op_mask(inputs, scale, p, seed)
    out_f = inputs[1].shape[0]
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(*x.shape[:-1], out_f, generator=gen, dtype=torch.float64).to(x.dtype)

    def ours_fn(*t):
        torch.manual_seed(seed)
        return lorafuse.lora_linear(*t, scale, p)

    ours_leaves = as_leaves(inputs)
    y, grads = forward_backward(ours_fn, ours_leaves, grad_out)
    ref_y, ref_grads = forward_backward(
        lambda *t: plain_lora_linear(*t, scale, p, mask),
        as_leaves(inputs, torch.float64, torch.float64),
        grad_out,
    )
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    base_y, base_grads = None, {}
    if low_precision:
        base_y, base_grads = forward_backward(
            lambda *t: plain_lora_linear(*t, scale, p, mask), as_leaves(inputs), grad_out
        )

    assert y.dtype == x.dtype and y.device == x.device
    assert y.shape == (*x.shape[:-1], out_f)
    assert_accurate("y", y, ref_y, base_y)
    assert grads.keys() == ref_grads.keys()
    leaves = dict(zip(GRAD_NAMES, (ours_leaves[0], ours_leaves[3], ours_leaves[4], ours_leaves[2])))
    for n, g in grads.items():
        assert g.dtype == leaves[n].dtype, f"grad of {n}: dtype {g.dtype}, expected {leaves[n].dtype}"
        assert g.device == leaves[n].device
        assert_accurate(f"grad {n}", g, ref_grads[n], base_grads.get(n))
    return y, grads


# ---------------------------------------------------------------------------------------------------
# the numpy Philox reference itself
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctr,key,expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
    ids=["zeros", "ones", "pi"],
)
def test_reference_philox_known_answers(ctr, key, expected):
    """The test-side Philox matches Random123's known-answer vectors, so it can judge the C++ one."""
    assert tuple(int(w) for w in philox4x32_10(ctr, key)) == expected


def test_reference_keep_threshold():
    assert keep_threshold(0.0) == 0
    assert keep_threshold(0.5) == 1 << 31
    assert keep_threshold(0.1) == int(0.1 * 2**32)
    assert keep_threshold(1.0 - 1e-12) == 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# numerics against the reference
# ---------------------------------------------------------------------------------------------------

DTYPE_CASES = {
    "f64": (torch.float64, torch.float64),
    "f32": (torch.float32, torch.float32),
    "f16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-adapters-f32": (torch.bfloat16, torch.float32),
    "f16-adapters-f32": (torch.float16, torch.float32),
    "f64-adapters-f32": (torch.float64, torch.float32),
}


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_matches_reference(device, case, bias, p):
    dtype, adapter_dtype = DTYPE_CASES[case]
    inputs = make_inputs(device, 67, 40, 8, lead=(3, 5), dtype=dtype, adapter_dtype=adapter_dtype, bias=bias)
    _, grads = check_against_reference(inputs, scale=0.75, p=p)
    assert set(grads) == ({"x", "lora_a", "lora_b", "bias"} if bias else {"x", "lora_a", "lora_b"})
    if adapter_dtype == torch.float32:
        assert grads["lora_a"].dtype == torch.float32 and grads["lora_b"].dtype == torch.float32
    assert grads["x"].dtype == dtype


# (in, out, r, leading dims of x, bias, dropout_p): a spread over sizes 1, 7, 129, 1023, ranks 1..64 and
# x of 1 to 4 dimensions, rather than the full product.
SWEEP = [
    (1, 1, 1, (), False, 0.0),
    (1, 7, 8, (5,), True, 0.1),
    (7, 1, 16, (2, 3), False, 0.1),
    (7, 129, 64, (2, 2, 3), True, 0.0),
    (129, 7, 1, (3,), True, 0.1),
    (129, 129, 8, (4, 5), False, 0.0),
    (1023, 7, 16, (2, 1, 3), True, 0.1),
    (7, 1023, 64, (6,), False, 0.1),
    (1023, 1023, 8, (3,), True, 0.1),
    (129, 1023, 1, (), True, 0.0),
    (1023, 129, 64, (2, 2), False, 0.0),
    (1, 1023, 16, (4, 1), True, 0.1),
    (1023, 1, 1, (2, 3), False, 0.1),
    (129, 1, 64, (1, 1, 2), True, 0.0),
]


@pytest.mark.parametrize(
    "in_f,out_f,r,lead,bias,p",
    SWEEP,
    ids=[f"in{c[0]}-out{c[1]}-r{c[2]}-x{len(c[3]) + 1}d-{'b' if c[4] else 'nob'}-p{c[5]}" for c in SWEEP],
)
def test_shape_sweep(device, in_f, out_f, r, lead, bias, p):
    inputs = make_inputs(device, in_f, out_f, r, lead=lead, bias=bias, seed=in_f + out_f + r)
    y, _ = check_against_reference(inputs, scale=2.0 / r, p=p)
    assert y.shape == (*lead, out_f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_large_ranks_and_scales(device, dtype):
    """r = 64 with rsLoRA-like and large scales, bf16 too (LoRA branch dominating the output)."""
    for scale in (16 / math.sqrt(64), 8.0):
        inputs = make_inputs(device, 129, 129, 64, lead=(7,), dtype=dtype, seed=3)
        check_against_reference(inputs, scale=scale, p=0.1)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3), (2, 0, 3)], ids=["0", "2x0", "0x3", "2x0x3"])
def test_zero_tokens(device, lead, p):
    inputs = make_inputs(device, 9, 5, 4, lead=lead)
    y, grads = check_against_reference(inputs, scale=1.5, p=p)
    assert y.shape == (*lead, 5)
    assert grads["x"].shape == (*lead, 9)
    # no tokens: the adapter and bias gradients are exactly zero (not uninitialised memory)
    assert torch.equal(grads["lora_a"], torch.zeros(4, 9, device=device))
    assert torch.equal(grads["lora_b"], torch.zeros(5, 4, device=device))
    assert torch.equal(grads["bias"], torch.zeros(5, device=device))


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("in_f,out_f", [(0, 5), (6, 0)], ids=["in0", "out0"])
def test_empty_features(device, in_f, out_f, p):
    """in = 0 (y is the bias) and out = 0 (an empty output) work like F.linear does."""
    inputs = make_inputs(device, in_f, out_f, 3, lead=(2, 4))
    y, grads = check_against_reference(inputs, scale=1.0, p=p)
    if in_f == 0:
        assert torch.equal(y, inputs[2].detach().expand(2, 4, out_f))
        assert torch.equal(grads["lora_b"], torch.zeros(out_f, 3, device=device))
    else:
        assert y.shape == (2, 4, 0)
        assert torch.equal(grads["x"], torch.zeros(2, 4, in_f, device=device))
        assert torch.equal(grads["lora_a"], torch.zeros(3, in_f, device=device))


def _noncontiguous_x(kind, device, seed):
    """A non-contiguous view of shape [.., 33] and the leaf it is a view of."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "transposed":  # [6, 4, 33] view of [4, 6, 33]
        base = torch.randn(4, 6, 33, generator=gen)
        view = lambda t: t.transpose(0, 1)
    elif kind == "row-slice":  # every other row
        base = torch.randn(10, 33, generator=gen)
        view = lambda t: t[::2]
    elif kind == "column-slice":  # rows with a stride larger than in
        base = torch.randn(5, 40, generator=gen)
        view = lambda t: t[:, 3:36]
    elif kind == "feature-strided":  # stride(-1) != 1
        base = torch.randn(33, 7, generator=gen)
        view = lambda t: t.t()
    elif kind == "expanded":  # stride 0 over tokens
        base = torch.randn(1, 33, generator=gen)
        view = lambda t: t.expand(6, 33)
    else:
        raise AssertionError(kind)
    return base.to(device), view


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("kind", ["transposed", "row-slice", "column-slice", "feature-strided", "expanded"])
def test_noncontiguous_x(device, kind, p):
    base, view = _noncontiguous_x(kind, device, seed=5)
    x = view(base)
    assert not x.is_contiguous()
    _, w, b, a, bb = make_inputs(device, 33, 12, 4, lead=(1,))
    base = base.requires_grad_()
    x = view(base)
    inputs = (x, w, b, a, bb)
    scale = 0.5
    # the mask is a function of the logical index, so x's strides must not matter
    mask = op_mask(inputs, scale, p, seed=7)
    torch.manual_seed(7)
    y = lorafuse.lora_linear(x, w, b, a, bb, scale, p)
    torch.manual_seed(7)
    y_contig = lorafuse.lora_linear(x.detach().contiguous(), w, b, a, bb, scale, p)
    torch.testing.assert_close(y, y_contig, rtol=1e-6, atol=1e-6)
    if p > 0:
        ref = plain_lora_linear(*as_leaves(inputs, torch.float64, torch.float64), scale, p, mask)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and gradients through the view agree with the reference
    check_against_reference(inputs, scale, p, seed=7)


def test_noncontiguous_parameters(device):
    """Transposed weight / lora_a / lora_b and a strided bias."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(33, 12, generator=gen).to(device).t()
    a = torch.randn(33, 4, generator=gen).to(device).t().requires_grad_()
    bb = torch.randn(4, 12, generator=gen).to(device).t().requires_grad_()
    b = torch.randn(24, generator=gen).to(device)[::2].requires_grad_()
    x = torch.randn(5, 33, generator=gen).to(device).requires_grad_()
    assert not (w.is_contiguous() or a.is_contiguous() or bb.is_contiguous() or b.is_contiguous())
    check_against_reference((x, w, b, a, bb), scale=0.5, p=0.1)


PARTIAL = [("x",), ("lora_a",), ("lora_b",), ("bias",), ("lora_a", "lora_b"), ("x", "bias"), ()]


@pytest.mark.parametrize(
    "wanted,bias",
    [(w, b) for b in (True, False) for w in PARTIAL if b or "bias" not in w],
    ids=lambda v: ("bias" if v else "nobias") if isinstance(v, bool) else "+".join(v) or "none",
)
def test_partial_requires_grad(device, wanted, bias):
    """Only the inputs that require grad get one, and those are still right (the backward's output_mask)."""
    x, w, b, a, bb = make_inputs(device, 17, 9, 3, lead=(2, 5), bias=bias, requires_grad=False)
    named = {"x": x, "lora_a": a, "lora_b": bb, "bias": b}
    for n in wanted:
        named[n].requires_grad_()
    inputs = (x, w, b, a, bb)
    if not wanted:
        y = lorafuse.lora_linear(*inputs, 0.5, 0.1)
        assert y.grad_fn is None and not y.requires_grad
        return
    _, grads = check_against_reference(inputs, scale=0.5, p=0.1)
    assert set(grads) == set(wanted)


def test_float64_adapter_with_float64_x_accumulates_in_float64():
    """float64 x: u is float64 and results are float64-accurate (not float32-accurate)."""
    inputs = make_inputs("cpu", 1023, 64, 16, lead=(32,), dtype=torch.float64)
    _, u, _ = FWD(*(detached(t) for t in inputs), 0.5, 0.0)
    assert u.dtype == torch.float64
    check_against_reference(inputs, scale=0.5, p=0.0)


# ---------------------------------------------------------------------------------------------------
# opcheck and gradcheck
# ---------------------------------------------------------------------------------------------------

OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_SEEDED = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_opcheck_lora_linear(device, p, bias):
    x, w, b, a, bb = make_inputs(device, 16, 8, 4, lead=(2, 3), bias=bias)
    # dropout draws a fresh mask per call, so only the checks that do not compare two runs apply
    utils = OPCHECK_ALL if p == 0.0 else OPCHECK_SEEDED
    opcheck(OP, (x, w, b, a, bb, 0.5, p), test_utils=utils)
    # also with mixed precision adapters and x that does not require grad
    x2, w2, b2, a2, bb2 = make_inputs(
        device, 16, 8, 4, lead=(5,), dtype=torch.bfloat16, adapter_dtype=torch.float32, bias=bias
    )
    x2.requires_grad_(False)
    opcheck(OP, (x2, w2, b2, a2, bb2, 0.5, p), test_utils=utils)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_opcheck_forward_and_backward_ops(device, p):
    x, w, b, a, bb = make_inputs(device, 16, 8, 4, lead=(2, 3), requires_grad=False)
    opcheck(FWD, (x, w, b, a, bb, 0.5, p), test_utils=OPCHECK_ALL if p == 0.0 else OPCHECK_SEEDED[::2])
    # the building blocks are not differentiable, but have an autograd kernel (that says so)
    opcheck(FWD, (x.clone().requires_grad_(), w, b, a, bb, 0.5, p), test_utils="test_autograd_registration")
    _, u, rng_state = FWD(x, w, b, a, bb, 0.5, p)
    grad_out = torch.randn(2, 3, 8, device=device)
    for mask in ([True, True, True, True], [True, False, False, True], [False, True, True, False]):
        # backward is deterministic given rng_state, so every check applies
        opcheck(BWD, (grad_out, x, w, a, bb, u, rng_state, 0.5, p, mask), test_utils=OPCHECK_ALL)
    opcheck(
        BWD,
        (grad_out.requires_grad_(), x, w, a, bb, u, rng_state, 0.5, p, [True] * 4),
        test_utils="test_autograd_registration",
    )


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(bias, p):
    x, w, b, a, bb = make_inputs("cpu", 6, 5, 3, lead=(2, 3), dtype=torch.float64, bias=bias)

    def f(x, b, a, bb):
        torch.manual_seed(2024)  # the same dropout mask on every evaluation
        return lorafuse.lora_linear(x, w, b, a, bb, 0.7, p)

    assert torch.autograd.gradcheck(f, (x, b, a, bb))
    # and with some inputs not requiring grad (exercises the backward's output_mask)
    assert torch.autograd.gradcheck(f, (x.detach(), b, a.detach(), bb))


def test_double_backward_raises_clearly():
    """lora_linear is differentiable once; a second derivative errors instead of being silently wrong."""
    x, w, b, a, bb = make_inputs("cpu", 6, 5, 3, lead=(4,), dtype=torch.float64)
    y = lorafuse.lora_linear(x, w, b, a, bb, 0.7, 0.0)
    (ga,) = torch.autograd.grad(y.pow(2).sum(), [a], create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        ga.sum().backward()


# ---------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------


def _identity_adapter_inputs(device, tokens, in_f, dtype=torch.float32):
    """x without zeros and lora_a = I, so u = dropout(x) exactly and the mask can be read off u."""
    gen = torch.Generator().manual_seed(17)
    x = (torch.rand(tokens, in_f, generator=gen) + 0.5).to(device, dtype)
    w = torch.zeros(3, in_f, device=device, dtype=dtype)
    a = torch.eye(in_f, device=device, dtype=dtype)
    bb = torch.ones(3, in_f, device=device, dtype=dtype)
    return x, w, None, a, bb


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_the_documented_philox_mask(device, p):
    """The kernel's mask equals the numpy Philox model bit for bit; kept values are x / (1 - p)."""
    x, w, b, a, bb = _identity_adapter_inputs(device, 37, 61)  # 2257 elements: not a multiple of 4
    torch.manual_seed(3)
    _, u, rng_state = FWD(x, w, b, a, bb, 1.0, p)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device == x.device
    seed, offset = rng_state.cpu().tolist()
    mask = torch.from_numpy(keep_mask(seed, offset, x.numel(), p)).reshape(x.shape).to(device)
    assert torch.equal(u != 0, mask)
    expected = torch.where(mask, x * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32), 0.0)
    torch.testing.assert_close(u, expected, rtol=1e-6, atol=0)


def test_dropout_seed_comes_from_default_generator_one_draw_per_call():
    """CPU: the seed is one 64-bit draw of torch's default generator (what a full-range int64 random_
    draws), so torch.manual_seed reproduces it and the generator advances by exactly that draw."""
    x, w, b, a, bb = make_inputs("cpu", 8, 4, 2, requires_grad=False)
    torch.manual_seed(42)
    _, _, rng_state = FWD(x, w, b, a, bb, 1.0, 0.25)
    after_call = torch.rand(4)
    torch.manual_seed(42)
    draw = torch.empty(1, dtype=torch.int64).random_(-(2**63), None)
    after_draw = torch.rand(4)
    assert rng_state[0].item() == draw.item()
    assert torch.equal(after_call, after_draw)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_same_seed_same_output(device, p):
    inputs = make_inputs(device, 64, 32, 8, lead=(4, 8))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        y, grads = forward_backward(
            lambda *t: lorafuse.lora_linear(*t, 0.5, p),
            as_leaves(inputs),
            torch.ones(4, 8, 32, device=device),
        )
        outs.append((y, grads))
    assert torch.equal(outs[0][0], outs[1][0])
    for n in GRAD_NAMES:
        assert torch.equal(outs[0][1][n], outs[1][1][n])


def test_dropout_different_seeds_different_masks(device):
    x, w, b, a, bb = _identity_adapter_inputs(device, 16, 64)
    masks, ys, seeds = [], [], []
    for s in (1, 2):
        torch.manual_seed(s)
        _, u, rng_state = FWD(x, w, b, a, bb, 1.0, 0.3)
        masks.append(u != 0)
        seeds.append(tuple(rng_state.cpu().tolist()))
        torch.manual_seed(s)
        ys.append(lorafuse.lora_linear(x, w, b, a, bb, 1.0, 0.3))
    assert seeds[0] != seeds[1]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(ys[0], ys[1])
    # consecutive calls without reseeding also draw different masks
    torch.manual_seed(1)
    m1 = FWD(x, w, b, a, bb, 1.0, 0.3)[1] != 0
    m2 = FWD(x, w, b, a, bb, 1.0, 0.3)[1] != 0
    assert not torch.equal(m1, m2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(device, p):
    """Over 10^6 elements the kept fraction is within 5 standard deviations of 1 - p."""
    tokens, in_f = 1000, 1000
    x = torch.ones(tokens, in_f, device=device, dtype=torch.float64)
    w = torch.zeros(1, in_f, device=device, dtype=torch.float64)
    a = torch.ones(1, in_f, device=device, dtype=torch.float64)
    bb = torch.ones(1, 1, device=device, dtype=torch.float64)
    torch.manual_seed(0)
    _, u, _ = FWD(x, w, None, a, bb, 1.0, p)  # u[t] = kept(t) / (1 - p), exact in float64
    kept = torch.round(u * (1.0 - p)).sum().item()
    n = tokens * in_f
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept / n - (1 - p)) < 5 * sd, f"keep rate {kept / n} for p={p}"
    # per-token counts vary (the mask is not one decision per row)
    assert torch.unique(torch.round(u * (1.0 - p))).numel() > 5


def test_dropout_zero_does_not_consume_generator(device):
    inputs = make_inputs(device, 16, 8, 4, requires_grad=False)
    torch.manual_seed(9)
    expected = torch.rand(5, device=device)
    torch.manual_seed(9)
    lorafuse.lora_linear(*inputs, 0.5, 0.0)
    FWD(*inputs, 0.5, 0.0)
    assert torch.equal(torch.rand(5, device=device), expected)
    # while p > 0 does consume it
    torch.manual_seed(9)
    lorafuse.lora_linear(*inputs, 0.5, 0.1)
    assert not torch.equal(torch.rand(5, device=device), expected)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_only_on_lora_branch(device, p):
    """With lora_b = 0 the output is exactly the base linear, whatever the dropout."""
    x, w, b, a, bb = make_inputs(device, 33, 17, 4, lead=(3, 4), requires_grad=False)
    bb = torch.zeros_like(bb)
    y = lorafuse.lora_linear(x, w, b, a, bb, 3.0, p)
    # bit for bit what the op computes without dropout
    assert torch.equal(y, lorafuse.lora_linear(x, w, b, a, bb, 3.0, 0.0))
    base = F.linear(x, w, b)
    if device == "cpu":  # the same BLAS call as F.linear
        assert torch.equal(y, base)
    else:  # a fused GPU kernel may sum in another order than cuBLAS
        torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-5)
    # and with a non-zero B, dropout changes the output (so the comparison above could fail)
    _, _, _, _, bb = make_inputs(device, 33, 17, 4, lead=(3, 4), requires_grad=False)
    assert (lorafuse.lora_linear(x, w, b, a, bb, 3.0, p) - base).abs().max() > 1e-3


def test_dropout_backward_uses_forward_mask(device):
    """Gradients of x and lora_a use the forward's mask: compare with the reference built from the numpy
    mask, and with the same op under a different mask (which must give different gradients)."""
    p, scale = 0.5, 1.0
    inputs = make_inputs(device, 48, 24, 8, lead=(16,))
    _, _grads = check_against_reference(inputs, scale, p, seed=77)
    _, other = forward_backward(
        lambda *t: (torch.manual_seed(78), lorafuse.lora_linear(*t, scale, p))[1],
        as_leaves(inputs),
        torch.ones(16, 24, device=device),
    )
    _, same = forward_backward(
        lambda *t: (torch.manual_seed(77), lorafuse.lora_linear(*t, scale, p))[1],
        as_leaves(inputs),
        torch.ones(16, 24, device=device),
    )
    assert not torch.allclose(other["lora_a"], same["lora_a"])
    # a generator draw between forward and backward must not change backward's mask
    torch.manual_seed(77)
    leaves = as_leaves(inputs)
    y = lorafuse.lora_linear(*leaves, scale, p)
    torch.rand(1000, device=device)
    torch.manual_seed(1)
    y.backward(torch.ones(16, 24, device=device))
    torch.testing.assert_close(leaves[3].grad, same["lora_a"], rtol=0, atol=0)
    torch.testing.assert_close(leaves[0].grad, same["x"], rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_many_row_tiles_and_threads(device, dtype, p, threads):
    """The CPU shrink reads x in tiles of 64 rows (the dropout mask and the cast made per tile, dA summed per thread):
    210 rows (3 full tiles and a partial one), an odd width, 1 and 2 threads, x contiguous and with a column stride."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(device, 257, 40, 8, lead=(3, 70), dtype=dtype, seed=4)
        check_against_reference(inputs, 0.5, p, seed=11)
        x, *rest = inputs
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x.detach()
        strided = wide[..., ::2].requires_grad_()  # the same values, every other column of a wider tensor
        assert strided.stride(-1) == 2
        check_against_reference((strided, *rest), 0.5, p, seed=11)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# grad modes, torch.compile, meta
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_no_grad_and_inference_mode_match_grad_path(device, p):
    inputs = make_inputs(device, 40, 24, 8, lead=(3, 7))
    torch.manual_seed(5)
    y_grad = lorafuse.lora_linear(*inputs, 0.5, p)
    assert y_grad.requires_grad
    torch.manual_seed(5)
    with torch.no_grad():
        y_nograd = lorafuse.lora_linear(*inputs, 0.5, p)
    torch.manual_seed(5)
    with torch.inference_mode():
        y_inf = lorafuse.lora_linear(*inputs, 0.5, p)
        inf_inputs = [None if t is None else t.detach().clone() for t in inputs]  # inference tensors
        torch.manual_seed(5)
        y_inf2 = lorafuse.lora_linear(*inf_inputs, 0.5, p)
    assert not y_nograd.requires_grad and not y_inf.requires_grad
    assert torch.equal(y_grad.detach(), y_nograd)
    assert torch.equal(y_grad.detach(), y_inf)
    assert torch.equal(y_grad.detach(), y_inf2)


def test_weight_requires_grad_is_an_error(device):
    x, w, b, a, bb = make_inputs(device, 8, 4, 2)
    w.requires_grad_()
    with pytest.raises(ValueError, match=r"weight.*requires_grad=True"):
        lorafuse.lora_linear(x, w, b, a, bb, 1.0)
    # even when nothing else requires grad
    with pytest.raises(ValueError, match=r"weight.*requires_grad=True"):
        lorafuse.lora_linear(x.detach(), w, None, a.detach(), bb.detach(), 1.0)


def test_weight_requires_grad_allowed_without_grad_mode(device):
    """Under no_grad nothing is differentiated, so a weight that requires grad is harmless there."""
    x, w, b, a, bb = make_inputs(device, 8, 4, 2)
    ref = lorafuse.lora_linear(x, w, b, a, bb, 1.0).detach()
    w.requires_grad_()
    with torch.no_grad():
        assert torch.equal(lorafuse.lora_linear(x, w, b, a, bb, 1.0), ref)


def _compile_vs_eager(device, p, backend, dynamic, shapes):
    def f(x, w, b, a, bb):
        return lorafuse.lora_linear(x, w, b, a, bb, 0.5, p)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=backend, dynamic=dynamic)
    for lead in shapes:
        inputs = make_inputs(device, 24, 16, 4, lead=lead, seed=len(lead))
        grad_out = torch.randn(*lead, 16, generator=torch.Generator().manual_seed(1)).to(device)
        torch.manual_seed(31)
        y_c, g_c = forward_backward(cf, as_leaves(inputs), grad_out)
        torch.manual_seed(31)
        y_e, g_e = forward_backward(f, as_leaves(inputs), grad_out)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        assert g_c.keys() == g_e.keys() == set(GRAD_NAMES)
        for n in GRAD_NAMES:
            torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_compile_inductor_matches_eager(device, p):
    _compile_vs_eager(device, p, "inductor", dynamic=False, shapes=[(2, 5)])


def test_compile_dynamic_shapes_matches_eager(device):
    _compile_vs_eager(device, 0.2, "aot_eager", dynamic=True, shapes=[(3, 5), (7,), (2, 9)])


@pytest.mark.parametrize("case", ["f32", "bf16", "bf16-adapters-f32", "f64"])
def test_meta_shapes_and_dtypes(case):
    dtype, adapter_dtype = DTYPE_CASES[case]
    x, w, b, a, bb = make_inputs(
        "meta", 33, 17, 4, lead=(2, 0, 5), dtype=dtype, adapter_dtype=adapter_dtype, requires_grad=False
    )
    y = lorafuse.lora_linear(x, w, b, a, bb, 0.5, 0.1)
    assert (y.device.type, y.dtype, y.shape) == ("meta", dtype, (2, 0, 5, 17))
    y, u, rng_state = FWD(x, w, b, a, bb, 0.5, 0.1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert (y.shape, u.shape, u.dtype) == ((2, 0, 5, 17), (0, 4), acc)
    assert (rng_state.shape, rng_state.dtype, rng_state.device.type) == ((2,), torch.int64, "meta")
    gy = torch.empty(2, 0, 5, 17, device="meta", dtype=dtype)
    gx, ga, gb, gbias = BWD(gy, x, w, a, bb, u, rng_state, 0.5, 0.1, [True, True, True, True])
    assert (gx.shape, gx.dtype) == (x.shape, dtype)
    assert (ga.shape, ga.dtype) == (a.shape, adapter_dtype)
    assert (gb.shape, gb.dtype) == (bb.shape, adapter_dtype)
    assert (gbias.shape, gbias.dtype) == ((17,), dtype)
    gx, ga, gb, gbias = BWD(gy, x, w, a, bb, u, rng_state, 0.5, 0.1, [False, True, False, False])
    assert gx.shape == (0,) and gb.shape == (0,) and gbias.shape == (0,) and ga.shape == a.shape


def test_meta_huge_shapes_need_no_memory():
    """T = 10^6 tokens of 8192 features in bf16 (16 GB of x alone) with autograd: shapes only."""
    x = torch.empty(1000, 1000, 8192, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(8192, 8192, device="meta", dtype=torch.bfloat16)
    b = torch.empty(8192, device="meta", dtype=torch.bfloat16, requires_grad=True)
    a = torch.empty(64, 8192, device="meta", requires_grad=True)
    bb = torch.empty(8192, 64, device="meta", requires_grad=True)
    y = lorafuse.lora_linear(x, w, b, a, bb, 2.0, 0.1)
    assert (y.shape, y.dtype, y.device.type) == ((1000, 1000, 8192), torch.bfloat16, "meta")
    gx, ga, gb, gbias = torch.autograd.grad(y, [x, a, bb, b], torch.empty_like(y))
    assert (gx.shape, gx.dtype) == (x.shape, torch.bfloat16)
    assert (ga.shape, ga.dtype, gb.shape, gb.dtype) == (a.shape, torch.float32, bb.shape, torch.float32)
    assert gbias.shape == (8192,)
    _, u, _ = FWD(x.detach(), w, b.detach(), a.detach(), bb.detach(), 2.0, 0.1)
    assert (u.shape, u.dtype) == ((10**6, 64), torch.float32)


# ---------------------------------------------------------------------------------------------------
# forward / backward building blocks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_forward_op(device, p):
    inputs = make_inputs(device, 33, 12, 5, lead=(2, 3), dtype=torch.bfloat16, requires_grad=False)
    torch.manual_seed(8)
    y, u, rng_state = FWD(*inputs, 0.5, p)
    torch.manual_seed(8)
    assert torch.equal(y, lorafuse.lora_linear(*inputs, 0.5, p))
    mask = op_mask(inputs, 0.5, p, seed=8)
    x, _, _, a, _ = inputs
    xd = x.double() if mask is None else x.double() * mask.to(device) / (1 - p)
    ref_u = (xd @ a.double().t()).reshape(6, 5)
    assert (u.shape, u.dtype, u.device) == ((6, 5), torch.float32, x.device)
    torch.testing.assert_close(u.double(), ref_u, rtol=1e-5, atol=1e-5)
    assert (rng_state.shape, rng_state.dtype, rng_state.device) == ((2,), torch.int64, x.device)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize(
    "mask",
    [
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, True),
        (True, True, True, True),
        (False, False, False, False),
    ],
    ids=["x", "a", "b", "bias", "all", "none"],
)
def test_backward_op_output_mask(device, mask, p):
    inputs = make_inputs(device, 20, 11, 3, lead=(4, 2), adapter_dtype=torch.float32)
    x, w, _b, a, bb = inputs
    grad_out = torch.randn(4, 2, 11, generator=torch.Generator().manual_seed(2)).to(device)
    torch.manual_seed(4)
    _, ref_grads = forward_backward(lambda *t: lorafuse.lora_linear(*t, 0.5, p), as_leaves(inputs), grad_out)
    torch.manual_seed(4)
    _, u, rng_state = FWD(*(detached(t) for t in inputs), 0.5, p)
    outs = BWD(grad_out, x.detach(), w, a.detach(), bb.detach(), u, rng_state, 0.5, p, list(mask))
    for n, wanted, g in zip(GRAD_NAMES, mask, outs):
        if wanted:
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-6, atol=1e-6)
        else:
            assert g.shape == (0,), f"{n} was not requested but came back with shape {tuple(g.shape)}"


# ---------------------------------------------------------------------------------------------------
# bad input: one case per failure; the message names the argument, what was found and what was expected
# ---------------------------------------------------------------------------------------------------


def _args(device="cpu", **override):
    """Valid arguments (x [3, 5], weight [4, 5], bias [4], lora_a [2, 5], lora_b [4, 2]) with overrides."""
    f = {"device": device}
    args = {
        "x": torch.randn(3, 5, **f),
        "weight": torch.randn(4, 5, **f),
        "bias": torch.randn(4, **f),
        "lora_a": torch.randn(2, 5, **f),
        "lora_b": torch.randn(4, 2, **f),
        "scale": 0.5,
        "dropout_p": 0.0,
    }
    args.update(override)
    return args


BAD_INPUTS = {
    # id: (overrides, exception, regexes the message must match)
    "weight-in-mismatch": (
        {"weight": torch.randn(4, 6)},
        ValueError,
        [r"weight", r"in = x\.size\(-1\) = 5", r"found weight of shape \[4, 6\]"],
    ),
    "lora_a-in-mismatch": (
        {"lora_a": torch.randn(2, 6)},
        ValueError,
        [r"lora_a", r"in = x\.size\(-1\) = 5", r"found lora_a of shape \[2, 6\]"],
    ),
    "lora_b-out-mismatch": (
        {"lora_b": torch.randn(3, 2)},
        ValueError,
        [r"lora_b", r"\[4, 2\]", r"found lora_b of shape \[3, 2\]"],
    ),
    "bias-out-mismatch": (
        {"bias": torch.randn(5)},
        ValueError,
        [r"bias", r"\[out\] = \[4\]", r"found bias of shape \[5\]"],
    ),
    "lora_b-r-mismatch": (
        {"lora_b": torch.randn(4, 3)},
        ValueError,
        [r"lora_b", r"\[4, 2\]", r"found lora_b of shape \[4, 3\]"],
    ),
    "lora_a-zero-rank": (
        {"lora_a": torch.randn(0, 5), "lora_b": torch.randn(4, 0)},
        ValueError,
        [r"lora_a", r"r >= 1", r"\[0, 5\]"],
    ),
    "x-0d": ({"x": torch.tensor(1.0)}, ValueError, [r"\bx\b", r"at least 1 dimension", r"0-d"]),
    "weight-1d": ({"weight": torch.randn(5)}, ValueError, [r"weight", r"2-D", r"found shape \[5\]"]),
    "weight-3d": (
        {"weight": torch.randn(1, 4, 5)},
        ValueError,
        [r"weight", r"2-D", r"found shape \[1, 4, 5\]"],
    ),
    "lora_a-1d": ({"lora_a": torch.randn(5)}, ValueError, [r"lora_a", r"2-D", r"found shape \[5\]"]),
    "lora_a-3d": (
        {"lora_a": torch.randn(1, 2, 5)},
        ValueError,
        [r"lora_a", r"2-D", r"found shape \[1, 2, 5\]"],
    ),
    "lora_b-1d": ({"lora_b": torch.randn(4)}, ValueError, [r"lora_b", r"2-D", r"found shape \[4\]"]),
    "lora_b-3d": (
        {"lora_b": torch.randn(1, 4, 2)},
        ValueError,
        [r"lora_b", r"2-D", r"found shape \[1, 4, 2\]"],
    ),
    "bias-2d": ({"bias": torch.randn(1, 4)}, ValueError, [r"bias", r"1-D", r"found shape \[1, 4\]"]),
    "weight-dtype": (
        {"x": torch.randn(3, 5, dtype=torch.float16)},
        TypeError,
        [r"weight", r"x's dtype Half", r"found weight of dtype Float"],
    ),
    "bias-dtype": (
        {"bias": torch.randn(4, dtype=torch.float64)},
        TypeError,
        [r"bias", r"x's dtype Float", r"found bias of dtype Double"],
    ),
    "lora_a-f64-with-bf16-x": (
        {
            "x": torch.randn(3, 5).bfloat16(),
            "weight": torch.randn(4, 5).bfloat16(),
            "bias": None,
            "lora_a": torch.randn(2, 5, dtype=torch.float64),
            "lora_b": torch.randn(4, 2, dtype=torch.float64),
        },
        TypeError,
        [r"lora_a", r"BFloat16 or float32", r"found lora_a of dtype Double"],
    ),
    "lora_a-f16-with-bf16-x": (
        {
            "x": torch.randn(3, 5).bfloat16(),
            "weight": torch.randn(4, 5).bfloat16(),
            "bias": None,
            "lora_a": torch.randn(2, 5).half(),
            "lora_b": torch.randn(4, 2).half(),
        },
        TypeError,
        [r"lora_a", r"BFloat16 or float32", r"found lora_a of dtype Half"],
    ),
    "lora_b-dtype-vs-lora_a": (
        {"lora_b": torch.randn(4, 2, dtype=torch.float64)},
        TypeError,
        [r"lora_b", r"lora_a's dtype Float", r"found lora_b of dtype Double"],
    ),
    "x-integer": (
        {"x": torch.ones(3, 5, dtype=torch.int32)},
        TypeError,
        [r"\bx\b", r"float32, float16, bfloat16 or float64", r"found x of dtype Int"],
    ),
    "weight-on-meta": (
        {"weight": torch.randn(4, 5, device="meta")},
        ValueError,
        [r"weight", r"x's device cpu", r"found weight on meta"],
    ),
    "x-on-meta": (
        {"x": torch.randn(3, 5, device="meta")},
        ValueError,
        [r"weight|lora_a|lora_b|bias", r"x's device meta", r"on cpu"],
    ),
    "bias-on-meta": (
        {"bias": torch.randn(4, device="meta")},
        ValueError,
        [r"bias", r"x's device cpu", r"found bias on meta"],
    ),
    "lora_b-on-meta": (
        {"lora_b": torch.randn(4, 2, device="meta")},
        ValueError,
        [r"lora_b", r"x's device cpu", r"found lora_b on meta"],
    ),
    "dropout_p-negative": ({"dropout_p": -0.1}, ValueError, [r"dropout_p", r"\[0, 1\)", r"found -0\.1"]),
    "dropout_p-one": ({"dropout_p": 1.0}, ValueError, [r"dropout_p", r"\[0, 1\)", r"found 1\b"]),
    "dropout_p-1.5": ({"dropout_p": 1.5}, ValueError, [r"dropout_p", r"\[0, 1\)", r"found 1\.5"]),
    "dropout_p-nan": ({"dropout_p": float("nan")}, ValueError, [r"dropout_p", r"\[0, 1\)", r"found nan"]),
    "scale-inf": ({"scale": float("inf")}, ValueError, [r"scale", r"finite", r"found inf"]),
    "scale-nan": ({"scale": float("nan")}, ValueError, [r"scale", r"finite", r"found nan"]),
    "x-sparse": (
        {"x": torch.randn(3, 5).to_sparse()},
        (NotImplementedError, RuntimeError, ValueError),
        [r"lora_linear", r"Sparse"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("entry", ["wrapper", "op", "forward_op"])
def test_bad_input(case, entry):
    overrides, exc, patterns = BAD_INPUTS[case]
    args = _args(**overrides)
    fn = {"wrapper": lorafuse.lora_linear, "op": OP, "forward_op": FWD}[entry]
    with pytest.raises(exc) as info:
        fn(
            args["x"],
            args["weight"],
            args["bias"],
            args["lora_a"],
            args["lora_b"],
            args["scale"],
            args["dropout_p"],
        )
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} does not match {pat!r}"


def test_bad_input_with_autograd_is_still_a_clear_error():
    """The checks also fire through the autograd path (inputs requiring grad)."""
    args = _args(lora_a=torch.randn(2, 6, requires_grad=True))
    with pytest.raises(ValueError, match=r"found lora_a of shape \[2, 6\]"):
        lorafuse.lora_linear(*args.values())


def _bwd_args(**override):
    x, w, b, a, bb = make_inputs("cpu", 5, 4, 2, lead=(3,), requires_grad=False)
    _, u, rng_state = FWD(x, w, b, a, bb, 0.5, 0.1)
    args = {
        "grad_out": torch.randn(3, 4),
        "x": x,
        "weight": w,
        "lora_a": a,
        "lora_b": bb,
        "u": u,
        "rng_state": rng_state,
        "scale": 0.5,
        "dropout_p": 0.1,
        "output_mask": [True] * 4,
    }
    args.update(override)
    return list(args.values())


BAD_BACKWARD = {
    "grad_out-shape": (
        {"grad_out": torch.randn(3, 5)},
        ValueError,
        [r"grad_out", r"\[3, 4\]", r"found grad_out of shape \[3, 5\]"],
    ),
    "grad_out-dtype": (
        {"grad_out": torch.randn(3, 4, dtype=torch.float64)},
        TypeError,
        [r"grad_out", r"Float", r"found Double"],
    ),
    "u-shape": ({"u": torch.randn(3, 3)}, ValueError, [r"\bu\b", r"\[3, 2\]", r"found u of shape \[3, 3\]"]),
    "u-dtype": (
        {"u": torch.randn(3, 2, dtype=torch.float64)},
        TypeError,
        [r"\bu\b", r"Float", r"found Double"],
    ),
    "rng_state-shape": (
        {"rng_state": torch.zeros(3, dtype=torch.int64)},
        ValueError,
        [r"rng_state", r"\[2\]", r"found Long of shape \[3\]"],
    ),
    "rng_state-dtype": (
        {"rng_state": torch.zeros(2, dtype=torch.int32)},
        ValueError,
        [r"rng_state", r"int64", r"found Int"],
    ),
    "rng_state-device": (
        {"rng_state": torch.zeros(2, dtype=torch.int64, device="meta")},
        ValueError,
        [r"rng_state", r"x's device cpu", r"found rng_state on meta"],
    ),
    "dropout_p": ({"dropout_p": 1.0}, ValueError, [r"dropout_p", r"found 1\b"]),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_bad_backward_input(case):
    overrides, exc, patterns = BAD_BACKWARD[case]
    with pytest.raises(exc) as info:
        BWD(*_bwd_args(**overrides))
    for pat in patterns:
        assert re.search(pat, str(info.value)), f"{str(info.value)!r} does not match {pat!r}"


def test_cuda_without_cuda_kernels_raises_clearly():
    """A GPU but a CPU-only build of lorafuse: a CUDA call says so (instead of crashing)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if lorafuse.has_cuda_kernels():
        assert cuda_skip_reason() is None
        pytest.skip("this build has CUDA kernels (the CUDA cases of every other test run instead)")
    x, w, b, a, bb = make_inputs("cuda", 8, 4, 2, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"no CUDA kernels"):
        lorafuse.lora_linear(x, w, b, a, bb, 1.0)


def test_has_cuda_kernels_is_a_bool():
    assert isinstance(lorafuse.has_cuda_kernels(), bool)
    # a build without CUDA kernels still registers a CUDA kernel for every op (that raises clearly)
    for name in ("lora_linear", "lora_linear_forward", "lora_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lorafuse::{name}", "CUDA")


def test_numpy_mask_sanity():
    """The reference mask draws independent words per element (guards the helper against silly bugs)."""
    m1 = keep_mask(1, 0, 4096, 0.5)
    m2 = keep_mask(2, 0, 4096, 0.5)
    m3 = keep_mask(1, 4, 4096, 0.5)  # offsets advance in steps of 4, as torch reserves them
    assert 0.4 < m1.mean() < 0.6
    assert (m1 != m2).mean() > 0.3 and (m1 != m3).mean() > 0.3
    assert np.array_equal(keep_mask(1, 0, 4000, 0.5), m1[:4000])
