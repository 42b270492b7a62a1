"""NF4 quantization (torch.ops.lorafuse.quantize_nf4 / dequantize_nf4) against the real bitsandbytes on the CPU:
the same bytes, block statistics, nested statistics and offset; the same dequantized values; clear errors."""

import itertools

import pytest
import torch

import lorafuse
from lorafuse import _C

import bitsandbytes.functional as bnb_f  # noqa: E402 (a requirement: the reference is never skipped)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def _bnb(weight, blocksize, double_quant):
    packed, state = bnb_f.quantize_4bit(
        weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return packed, state


def _bnb_absmax_float(state):
    """The float32 block statistics bitsandbytes decodes (its dequantize_4bit's first step)."""
    if state.nested:
        return bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def _reference_dequant(packed, absmax, blocksize, shape, dtype):
    """code[index] · absmax of the block in float32, rounded once (bitsandbytes' documented semantics)."""
    n = 1
    for d in shape:
        n *= d
    u = packed.reshape(-1)
    index = torch.stack([u >> 4, u & 15], 1).reshape(-1)[:n].long()
    code = bnb_f.get_4bit_type("nf4", device="cpu")
    return (code[index] * absmax.float().repeat_interleave(blocksize)[:n]).reshape(shape).to(dtype)


def _assert_same_as_bnb(weight, blocksize, double_quant):
    packed, state = _bnb(weight, blocksize, double_quant)
    q = lorafuse.quantize_nf4(weight, blocksize, double_quant)
    assert torch.equal(q.packed, packed), "packed bytes differ"
    assert torch.equal(q.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(q.offset.reshape(()), state.offset.reshape(())), "offset differs"
    else:
        assert q.nested_absmax.numel() == 0 and q.offset.numel() == 0
    shape = list(weight.shape)
    ours = lorafuse.dequantize_nf4(q, shape, weight.dtype, blocksize)
    expected = _reference_dequant(packed, _bnb_absmax_float(state), blocksize, shape, weight.dtype)
    assert ours.shape == weight.shape and ours.dtype == weight.dtype
    assert torch.equal(ours, expected), "dequantized values differ"
    return q


@pytest.mark.parametrize(
    "shape,dtype,blocksize,double_quant",
    [
        (shape, dtype, bs, dq)
        for (shape, dtype), bs, dq in itertools.product(
            [((64, 64), torch.float32), ((33, 17), torch.bfloat16), ((300, 64), torch.float16), ((7,), torch.float32),
             ((3, 5, 129), torch.bfloat16), ((257 * 64 + 3,), torch.float32), ((512, 130), torch.float16)],
            [32, 64, 256, 4096],
            [False, True],
        )
    ],
)
def test_bytes_and_values_equal_bitsandbytes(shape, dtype, blocksize, double_quant):
    torch.manual_seed(hash((shape, blocksize)) % 1000)
    weight = (torch.randn(*shape) * 0.05).to(dtype)
    _assert_same_as_bnb(weight, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize(blocksize):
    torch.manual_seed(blocksize)
    _assert_same_as_bnb(torch.randn(64, 257), blocksize, True)


def test_adversarial_blocks():
    code = bnb_f.get_4bit_type("nf4", device="cpu")
    midpoints = (code[:-1] + code[1:]) / 2
    blocks = [
        torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(48)]),  # ties: absmax 1, values on midpoints
        torch.cat([torch.tensor([-1.0]), -midpoints, torch.zeros(48)]),
        torch.zeros(64),  # an all-zero block
        torch.full((64,), 1e-39),  # subnormal values
        torch.cat([torch.tensor([3e38]), torch.randn(63)]),  # near float32's largest
        torch.cat([torch.tensor([2.0**-126]), torch.zeros(63)]),
        torch.randn(64).sign(),  # every value is ±absmax
    ]
    weight = torch.cat(blocks + [torch.zeros(21)])  # and a partial last block of zeros (stores 1e-38)
    for double_quant in (False, True):
        q = _assert_same_as_bnb(weight, 64, double_quant)
    assert q.packed.shape == ((weight.numel() + 1) // 2, 1)
    # the tie block: value i on midpoint i takes the lower code i (the leading 1.0 is code 15)
    first = lorafuse.quantize_nf4(weight[:64], 64, False).packed.reshape(-1)[:8]
    assert torch.stack([first >> 4, first & 15], 1).reshape(-1).tolist() == [15, *range(15)]


def test_bits_per_weight():
    weight = torch.randn(4096, 4096)
    q = lorafuse.quantize_nf4(weight, 64, True)
    stored = sum(t.numel() * t.element_size() for t in q)
    assert stored * 8 / weight.numel() == pytest.approx(4.127, abs=0.001)


def test_code_maps_are_bitsandbytes():
    assert torch.equal(_C.nf4_code_map(), bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(_C.dynamic_code_map(), bnb_f.create_dynamic_map(signed=True))


def _nf_reference(bits: int) -> torch.Tensor:
    """bitsandbytes' create_normal_map recipe for 2^bits values, with torch in place of scipy: float32 quantiles
    from torch.linspace, the normal quantile in float64, rounded to float32, sorted, divided by the largest."""
    half, offset = 2 ** (bits - 1), 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


@pytest.mark.parametrize("bits", range(2, 9))
def test_nf_codes_follow_bitsandbytes_recipe(bits):
    """NF-b (the b-bit codes of LQ-LoRA's configurations): 4 bits is bitsandbytes' NF4 table to the bit; 2, 3 and
    4 equal the recipe computed by torch to the bit; from 5 bits torch.linspace computes some quantiles in SIMD lanes
    (base + k·step, not start + i·step): a quantile may differ by a float32 rounding there, moving its value by up
    to about 1e-6."""
    code = _C.nf_code(bits)
    assert code.dtype == torch.float32 and code.shape == (2**bits,)
    reference = _nf_reference(bits)
    if bits <= 4:
        assert torch.equal(code, reference)
    else:
        torch.testing.assert_close(code, reference, rtol=0, atol=2e-6)
    if bits == 4:
        assert torch.equal(code, bnb_f.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("bits", [1, 9, -2])
def test_nf_code_refuses_other_bit_widths(bits):
    with pytest.raises(ValueError, match=rf"nf_code: bits must be in \[2, 8\], found {bits}"):
        _C.nf_code(bits)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_by_index(bad):
    weight = torch.randn(4, 64)
    weight[2, 5] = bad
    with pytest.raises(ValueError, match=r"quantize_nf: weight: expected finite values, found .* at flat index 133"):
        lorafuse.quantize_nf4(weight)


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="blocksize: expected one of 32, 64.*found 48"):
        lorafuse.quantize_nf4(torch.randn(8, 8), 48)
    with pytest.raises(TypeError, match="weight: expected float32, bfloat16 or float16, found Double"):
        lorafuse.quantize_nf4(torch.randn(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight: expected at least one element"):
        lorafuse.quantize_nf4(torch.empty(0, 8))
    q = lorafuse.quantize_nf4(torch.randn(16, 64), 64, True)
    with pytest.raises(ValueError, match=r"packed: expected 512 bytes .* for shape \[16, 64\], found 256"):
        torch.ops.lorafuse.dequantize_nf4(q.packed[:256], q.absmax, q.nested_absmax, q.offset, 64, [16, 64], torch.float32)
    with pytest.raises(ValueError, match=r"absmax: expected 8 bytes .* found 16"):
        lorafuse.dequantize_nf4(q, [16, 64], torch.float32, blocksize=128)
    with pytest.raises(TypeError, match="absmax: expected float32 .* found Byte"):
        torch.ops.lorafuse.dequantize_nf4(q.packed, q.absmax, None, None, 64, [16, 64], torch.float32)
    with pytest.raises(ValueError, match="offset: expected one float32 value with nested_absmax"):
        torch.ops.lorafuse.dequantize_nf4(q.packed, q.absmax, q.nested_absmax, None, 64, [16, 64], torch.float32)
    with pytest.raises(TypeError, match="dtype: expected float32, bfloat16 or float16, found Double"):
        lorafuse.dequantize_nf4(q, [16, 64], torch.float64)


def test_meta_tensors_give_shapes():
    weight = torch.empty(1000, 130, device="meta")
    q = lorafuse.quantize_nf4(weight, 64, True)
    blocks = (1000 * 130 + 63) // 64
    assert [t.shape for t in q] == [torch.Size([65000, 1]), torch.Size([blocks]), torch.Size([(blocks + 255) // 256]), torch.Size([])]
    assert [t.dtype for t in q] == [torch.uint8, torch.uint8, torch.float32, torch.float32]
    out = lorafuse.dequantize_nf4(q, [1000, 130], torch.bfloat16)
    assert out.shape == (1000, 130) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck(double_quant):
    weight = torch.randn(40, 96)
    torch.library.opcheck(torch.ops.lorafuse.quantize_nf4.default, (weight, 64, double_quant))
    q = lorafuse.quantize_nf4(weight, 64, double_quant)
    nested = q.nested_absmax if double_quant else None
    offset = q.offset if double_quant else None
    torch.library.opcheck(
        torch.ops.lorafuse.dequantize_nf4.default, (q.packed, q.absmax, nested, offset, 64, [40, 96], torch.bfloat16)
    )


# ---- nf4_linear: the frozen 4-bit base layer, tile by tile -------------------------------------------------------


def _dense(q, out_features, in_features, dtype):
    return lorafuse.dequantize_nf4(q, [out_features, in_features], torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
# tiles of 2^22 // in_features rows: one, one, and three (511 + 511 + 78 rows)
@pytest.mark.parametrize("shape", [((5, 300), 1000), ((2, 3, 64), 1100), ((3, 8200), 1100)])
def test_nf4_linear_equals_linear_over_the_dequantized_weight(dtype, double_quant, shape):
    (xshape, out_features) = shape
    in_features = xshape[-1]
    torch.manual_seed(in_features + out_features)
    q = lorafuse.quantize_nf4(torch.randn(out_features, in_features), 64, double_quant)
    x = torch.randn(*xshape).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    w = _dense(q, out_features, in_features, dtype)
    for b in (bias, None):
        ours = lorafuse.nf4_linear(x, q, out_features, b)
        ref64 = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        theirs = torch.nn.functional.linear(x, w, b)  # PyTorch in the same dtype, over the same weight
        assert ours.shape == theirs.shape and ours.dtype == dtype
        # the rule for every op: our error ≤ 2 × PyTorch's same-dtype error + a small atol
        err_ours = (ours.double() - ref64).abs().max().item()
        err_torch = (theirs.double() - ref64).abs().max().item()
        assert err_ours <= 2 * err_torch + (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_gradients(dtype):
    torch.manual_seed(0)
    out_features, in_features = 1100, 8200  # three tiles of rows (511 + 511 + 78)
    q = lorafuse.quantize_nf4(torch.randn(out_features, in_features), 64, True)
    w = _dense(q, out_features, in_features, dtype)
    x = torch.randn(7, in_features).to(dtype).requires_grad_()
    bias = torch.randn(out_features).to(dtype).requires_grad_()
    dy = torch.randn(7, out_features).to(dtype)
    lorafuse.nf4_linear(x, q, out_features, bias).backward(dy)
    x_ref, bias_ref = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    torch.nn.functional.linear(x_ref, w.double(), bias_ref).backward(dy.double())
    x_pt, bias_pt = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_pt, w, bias_pt).backward(dy)  # PyTorch in the same dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for ours, pt, ref in ((x.grad, x_pt.grad, x_ref.grad), (bias.grad, bias_pt.grad, bias_ref.grad)):
        assert ours.dtype == dtype and ours.shape == ref.shape
        err_ours = (ours.double() - ref).abs().max().item()
        err_torch = (pt.double() - ref).abs().max().item()
        assert err_ours <= 2 * err_torch + atol
    assert q.packed.grad is None and not q.absmax.requires_grad


def test_nf4_linear_gradcheck_float64():
    torch.manual_seed(1)
    q = lorafuse.quantize_nf4(torch.randn(9, 40), 32, True)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: lorafuse.nf4_linear(x, q, 9, b, blocksize=32), (x, bias))


def test_qlora_layer_is_nf4_linear_plus_lora_add():
    torch.manual_seed(2)
    out_features, in_features, r = 48, 64, 4
    q = lorafuse.quantize_nf4(torch.randn(out_features, in_features), 64, True)
    a = torch.randn(r, in_features, requires_grad=True)
    b = torch.randn(out_features, r, requires_grad=True)
    x = torch.randn(5, in_features, requires_grad=True)
    y = torch.ops.lorafuse.lora_add(lorafuse.nf4_linear(x, q, out_features), x, a, b, 0.5, 0.0)
    w = _dense(q, out_features, in_features, torch.float32)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, b))
    ref = xr @ w.t() + 0.5 * (xr @ ar.t()) @ br.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    for ours, theirs in ((x, xr), (a, ar), (b, br)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)


# ---- nf4_lora_linear: the QLoRA layer in one op ------------------------------------------------------------------


def _qlora_inputs(dtype, out_features=1100, in_features=8200, tokens=7, r=8, adapter_dtype=torch.float32, bias=True):
    torch.manual_seed(3)
    q = lorafuse.quantize_nf4(torch.randn(out_features, in_features), 64, True)
    x = torch.randn(2, tokens, in_features).to(dtype).requires_grad_()
    b = (torch.randn(out_features).to(dtype).requires_grad_()) if bias else None
    a = (torch.randn(r, in_features) * in_features**-0.5).to(adapter_dtype).requires_grad_()
    bb = (torch.randn(out_features, r) * 0.5).to(adapter_dtype).requires_grad_()
    dy = torch.randn(2, tokens, out_features).to(dtype)
    return q, x, b, a, bb, dy


def _grads(y, dy, inputs):
    return [y.detach()] + list(torch.autograd.grad(y, [t for t in inputs if t is not None], dy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_nf4_lora_linear_against_float64_and_the_two_op_chain(dtype, bias):
    """Output and every gradient (x, bias, A, B) against float64 from the dequantized weight, within twice the error of
    PyTorch's own chain in the same dtype; the weight spans three tiles of rows (511 + 511 + 78)."""
    out_features, in_features = 1100, 8200
    q, x, b, a, bb, dy = _qlora_inputs(dtype, out_features, in_features, bias=bias)
    inputs = (x, b, a, bb)
    ours = _grads(lorafuse.nf4_lora_linear(x, q, out_features, a, bb, 0.5, b), dy, inputs)
    w = _dense(q, out_features, in_features, dtype)

    def chain(x, b, a, bb, w):  # PyTorch's layer: base + scale·(x·Aᵀ)·Bᵀ, the branch in the adapters' dtype
        base = torch.nn.functional.linear(x, w, b)
        return base + (0.5 * ((x.to(a.dtype) @ a.t()) @ bb.t())).to(base.dtype)

    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = _grads(chain(*ref_in, w.double()), dy.double(), ref_in)
    pt_in = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    pt = _grads(chain(*pt_in, w), dy, pt_in)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, o, p_, r in zip(("out", "dx", "dbias", "da", "db") if bias else ("out", "dx", "da", "db"), ours, pt, ref):
        assert o.dtype == p_.dtype and o.shape == r.shape, name
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (p_.double() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + atol * max(1.0, r.abs().max().item()), (name, err_ours, err_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_lora_linear_dropout_uses_the_two_op_chains_mask(dtype):
    """Under the same seed the one op draws the same dropout mask as nf4_linear + lora_add, so outputs and gradients
    agree (to rounding: dX is summed in one buffer); the mask differs between seeds."""
    out_features, in_features = 300, 256
    q, x, b, a, bb, dy = _qlora_inputs(dtype, out_features, in_features)
    inputs = (x, b, a, bb)

    def one(seed):
        torch.manual_seed(seed)
        return _grads(lorafuse.nf4_lora_linear(x, q, out_features, a, bb, 2.0, b, dropout_p=0.4), dy, inputs)

    torch.manual_seed(11)
    chain = _grads(
        torch.ops.lorafuse.lora_add(lorafuse.nf4_linear(x, q, out_features, b), x, a, bb, 2.0, 0.4), dy, inputs
    )
    fused = one(11)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for o, c in zip(fused, chain):
        torch.testing.assert_close(o, c, **tol)
    assert not torch.equal(one(12)[0], fused[0])


def test_nf4_lora_linear_gradcheck_float64_and_opcheck():
    torch.manual_seed(1)
    q = lorafuse.quantize_nf4(torch.randn(9, 40), 32, True)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, bias, a, b: lorafuse.nf4_lora_linear(x, q, 9, a, b, 0.7, bias, blocksize=32), (x, bias, a, b)
    )
    q = lorafuse.quantize_nf4(torch.randn(30, 64), 64, True)
    x = torch.randn(4, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(30, 4, requires_grad=True)
    for bias in (torch.randn(30, requires_grad=True), None):
        torch.library.opcheck(torch.ops.lorafuse.nf4_lora_linear.default, (x, *q, 64, 30, bias, a, b, 0.5, 0.0))
    plain = lorafuse.quantize_nf4(torch.randn(30, 64), 64, False)  # no double quantization: no nested statistics
    torch.library.opcheck(torch.ops.lorafuse.nf4_lora_linear.default, (x, *plain, 64, 30, None, a, b, 0.5, 0.0))
    args = (x, *q, 64, 30, None, torch.bfloat16, a.detach().bfloat16(), b.detach().bfloat16(), 0.5, 0.0)
    torch.library.opcheck(torch.ops.lorafuse.lora_linear4bit.default, args)


def test_nf4_lora_linear_errors_name_the_op_and_the_argument():
    q = lorafuse.quantize_nf4(torch.randn(30, 64), 64, True)
    x, a, b = torch.randn(4, 64), torch.randn(4, 64), torch.randn(30, 4)
    with pytest.raises(ValueError, match=r"lorafuse\.nf4_lora_linear: packed: expected 945 bytes .* for shape \[30, 63\]"):
        lorafuse.nf4_lora_linear(torch.randn(4, 63), q, 30, torch.randn(4, 63), b, 1.0)
    with pytest.raises(ValueError, match=r"lorafuse\.nf4_lora_linear: lora_b must have shape \[out, r\] = \[30, 4\]"):
        lorafuse.nf4_lora_linear(x, q, 30, a, torch.randn(29, 4), 1.0)
    with pytest.raises(TypeError, match=r"lorafuse\.nf4_lora_linear: lora_a must have x's dtype Float or float32"):
        lorafuse.nf4_lora_linear(x, q, 30, a.double(), b.double(), 1.0)
    with pytest.raises(ValueError, match=r"lorafuse\.nf4_lora_linear: .*dropout_p"):
        lorafuse.nf4_lora_linear(x, q, 30, a, b, 1.0, dropout_p=1.0)
    unfrozen = q._replace(nested_absmax=q.nested_absmax.clone().requires_grad_())
    with pytest.raises(ValueError, match="lorafuse.nf4_lora_linear: nested_absmax requires grad, but the 4-bit weight"):
        lorafuse.nf4_lora_linear(x.requires_grad_(), unfrozen, 30, a, b, 1.0)


@pytest.mark.parametrize(
    "x_dtype, compute_dtype, adapter_dtype",
    [
        (torch.float32, torch.float32, torch.float32),  # the one op
        (torch.bfloat16, torch.bfloat16, torch.float32),  # the one op, adapters in float32
        (torch.float32, torch.bfloat16, torch.float32),  # x cast for the base only: the two ops
        (torch.bfloat16, torch.float32, torch.bfloat16),  # the same, adapters in x's dtype
        (torch.float32, torch.float32, torch.bfloat16),  # adapters in neither: the two ops
    ],
)
def test_lora_linear4bit_equals_the_4bit_layer_plus_its_branch(x_dtype, compute_dtype, adapter_dtype):
    """lora_linear4bit (what the 4-bit LoRA layers run, C++ and Python) computes lora_branch(linear4bit(x), x, ...)
    for every mix of dtypes, and is the one op exactly where no cast separates the base from the branch."""
    q, x, b, a, bb, dy = _qlora_inputs(x_dtype, 96, 128, adapter_dtype=adapter_dtype)
    bias = b.detach().to(compute_dtype).requires_grad_()
    inputs = (x, bias, a, bb)
    ours = _grads(torch.ops.lorafuse.lora_linear4bit(x, *q, 64, 96, bias, compute_dtype, a, bb, 0.5, 0.0), dy, inputs)
    base = torch.ops.lorafuse.linear4bit(x, *q, 64, 96, bias, compute_dtype)
    chain = _grads(torch.ops.lorafuse.lora_branch(base, x, a, bb, 0.5, 0.0), dy, inputs)
    tol = dict(rtol=1e-5, atol=1e-5) if torch.bfloat16 not in (x_dtype, compute_dtype, adapter_dtype) else dict(
        rtol=2e-2, atol=5e-2
    )
    for o, c in zip(ours, chain):
        assert o.dtype == c.dtype
        torch.testing.assert_close(o, c, **tol)


def test_lora_linear4bit_under_autocast_keeps_the_base_in_its_compute_dtype_and_autocasts_the_branch():
    """Under torch.autocast the 4-bit layer computes its base in its compute dtype (as bitsandbytes' does) and the
    branch as lora_add does under autocast (x in the autocast dtype, float32 adapters kept): the two-op route."""
    q, x, b, a, bb, dy = _qlora_inputs(torch.float32, 96, 128)
    args = (x, *q, 64, 96, b, torch.float32, a, bb, 0.5, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.lorafuse.lora_linear4bit(*args)
        base = torch.ops.lorafuse.linear4bit(x, *q, 64, 96, b, torch.float32)
        want = torch.ops.lorafuse.lora_branch(base, x, a, bb, 0.5, 0.0)
    assert y.dtype == torch.float32 and torch.equal(y, want)
    assert not torch.equal(y, torch.ops.lorafuse.lora_linear4bit(*args))  # the branch saw bfloat16 x
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_nf4_linear_opcheck_and_errors():
    q = lorafuse.quantize_nf4(torch.randn(30, 64), 64, True)
    x = torch.randn(4, 64, requires_grad=True)
    args = (x, q.packed, q.absmax, q.nested_absmax, q.offset, 64, 30, torch.randn(30, requires_grad=True))
    torch.library.opcheck(torch.ops.lorafuse.nf4_linear.default, args)
    with pytest.raises(ValueError, match=r"lorafuse\.nf4_linear: packed: expected 945 bytes .* for shape \[30, 63\]"):
        lorafuse.nf4_linear(torch.randn(4, 63), q, 30)
    with pytest.raises(ValueError, match=r"bias: expected \[30\], found shape \[29\]"):
        lorafuse.nf4_linear(torch.randn(4, 64), q, 30, torch.randn(29))
    with pytest.raises(TypeError, match="bias: expected x's dtype Float, found BFloat16"):
        lorafuse.nf4_linear(torch.randn(4, 64), q, 30, torch.randn(30, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x: expected float32, bfloat16, float16 or float64, found Int"):
        lorafuse.nf4_linear(torch.ones(4, 64, dtype=torch.int32), q, 30)
    # unfreezing the 4-bit weight: refused, never a silent missing gradient
    for field in ("nested_absmax", "offset"):
        unfrozen = q._replace(**{field: getattr(q, field).clone().requires_grad_()})
        with pytest.raises(ValueError, match=f"lorafuse.nf4_linear: {field} requires grad, but the 4-bit weight is frozen"):
            lorafuse.nf4_linear(x, unfrozen, 30)
    plain = lorafuse.quantize_nf4(torch.randn(30, 64), 64, False)
    layer = lorafuse.nn.Linear4bit.from_weight(torch.randn(30, 64), double_quant=False)
    layer.absmax.requires_grad_(True)
    with pytest.raises(ValueError, match="absmax requires grad, but the 4-bit weight is frozen"):
        layer(x)
    with torch.no_grad():  # inference does not train: allowed
        lorafuse.nf4_linear(x, plain._replace(absmax=plain.absmax.clone().requires_grad_()), 30)


def test_the_vectorized_and_the_scalar_dequantize_give_the_same_bits(tmp_path):
    """The CPU kernel has an AVX2 path (where the CPU has it) and a scalar one (elsewhere, and for block edges);
    LORAFUSE_NF4_SCALAR=1 forces the scalar one in a process of its own."""
    import os
    import subprocess
    import sys

    torch.manual_seed(4)
    # small, and larger than the L2 caches of a few cores (16.5 MiB of float32: the vectorized path writes it with
    # non-temporal stores) with rows that start mid-block (4097 columns)
    shapes = [[70, 333], [1030, 4097]]
    qs = [tuple(lorafuse.quantize_nf4(torch.randn(*shape), 64, True)) for shape in shapes]
    torch.save({"q": qs, "shapes": shapes}, tmp_path / "q.pt")
    script = (
        "import sys, torch, lorafuse\n"
        "d = torch.load(sys.argv[1])\n"
        "out = [lorafuse.dequantize_nf4(lorafuse.Nf4Weight(*q), s) for q, s in zip(d['q'], d['shapes'])]\n"
        "torch.save(out, sys.argv[2])\n"
    )
    env = {**os.environ, "LORAFUSE_NF4_SCALAR": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "q.pt"), str(tmp_path / "out.pt")], env=env, check=True)
    scalar = torch.load(tmp_path / "out.pt")
    for q, shape, expected in zip(qs, shapes, scalar, strict=True):
        assert torch.equal(lorafuse.dequantize_nf4(lorafuse.Nf4Weight(*q), shape), expected)


def test_linear4bit_op_casts_to_the_compute_dtype_and_back():
    q = lorafuse.quantize_nf4(torch.randn(30, 64), 64, True)
    x, bias = torch.randn(4, 64), torch.randn(30)
    y = torch.ops.lorafuse.linear4bit(x, *q, 64, 30, bias, torch.bfloat16)
    expected = lorafuse.nf4_linear(x.bfloat16(), q, 30, bias.bfloat16()).float()
    assert y.dtype == torch.float32 and torch.equal(y, expected)
    torch.library.opcheck(torch.ops.lorafuse.linear4bit.default, (x.requires_grad_(), *q, 64, 30, bias, torch.bfloat16))


# ---- nf4_merge: merging into 4 bits, asked for explicitly ----------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_merge_requantizes_the_merged_weight_and_reports_what_it_cost(double_quant):
    torch.manual_seed(5)
    q = lorafuse.quantize_nf4(torch.randn(48, 128), 64, double_quant)
    nested, offset = (q.nested_absmax, q.offset) if double_quant else (None, None)
    a, b = torch.randn(4, 128), torch.randn(48, 4) * 0.1
    packed, absmax, nested2, offset2, error = torch.ops.lorafuse.nf4_merge(
        q.packed, q.absmax, nested, offset, 64, [48, 128], [a], [b], [2.0]
    )
    dense = lorafuse.dequantize_nf4(q, [48, 128], torch.float32)
    exact = torch.ops.lorafuse.lora_merge(dense, [a], [b], [2.0])
    expected = lorafuse.quantize_nf4(exact, 64, double_quant)
    assert torch.equal(packed, expected.packed) and torch.equal(absmax, expected.absmax)
    assert torch.equal(nested2, expected.nested_absmax) and torch.equal(offset2, expected.offset)
    rounded = torch.ops.lorafuse.dequantize_nf4(packed, absmax, nested2, offset2, 64, [48, 128], torch.float32)
    err = (rounded - exact).double().norm()
    assert error.dtype == torch.float32 and error.shape == (2,)
    assert error[0].item() == pytest.approx(float(err / exact.double().norm()), rel=1e-6)
    assert error[1].item() == pytest.approx(float(err / (exact - dense).double().norm()), rel=1e-4)
    torch.library.opcheck(
        torch.ops.lorafuse.nf4_merge.default, (q.packed, q.absmax, nested, offset, 64, [48, 128], [a], [b], [2.0])
    )
    # a zero weight and zero adapters: nothing to round, no error (not 0/0)
    z = lorafuse.quantize_nf4(torch.zeros(8, 64), 64, double_quant)
    zn, zo = (z.nested_absmax, z.offset) if double_quant else (None, None)
    *_, zero_error = torch.ops.lorafuse.nf4_merge(
        z.packed, z.absmax, zn, zo, 64, [8, 64], [torch.zeros(2, 64)], [torch.zeros(8, 2)], [1.0]
    )
    assert zero_error.tolist() == [0.0, 0.0]


def test_nf4_merge_bad_input():
    q = lorafuse.quantize_nf4(torch.randn(8, 64), 64, True)
    args = (q.packed, q.absmax, q.nested_absmax, q.offset, 64)
    with pytest.raises(ValueError, match=r"nf4_merge: shape must be \[out, in\]"):
        torch.ops.lorafuse.nf4_merge(*args, [512], [torch.randn(2, 64)], [torch.randn(8, 2)], [1.0])
    with pytest.raises(ValueError, match="lora_a: expected at least one adapter"):
        torch.ops.lorafuse.nf4_merge(*args, [8, 64], [], [], [])
    with pytest.raises(ValueError, match="adapter.* must fit the weight"):
        torch.ops.lorafuse.nf4_merge(*args, [8, 64], [torch.randn(2, 32)], [torch.randn(8, 2)], [1.0])
    with pytest.raises(ValueError, match="not finite|non-finite|finite"):
        torch.ops.lorafuse.nf4_merge(*args, [8, 64], [torch.full((2, 64), 1e30)], [torch.full((8, 2), 1e30)], [1.0])


def test_lora_branch_casts_x_to_the_adapter_dtype_unless_float32():
    torch.manual_seed(6)
    out = torch.randn(3, 16, dtype=torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    a16, b16 = torch.randn(4, 32, dtype=torch.float16), torch.randn(16, 4, dtype=torch.float16)
    y = torch.ops.lorafuse.lora_branch(out, x, a16, b16, 0.5)
    assert torch.equal(y, torch.ops.lorafuse.lora_add(out, x.half(), a16, b16, 0.5))
    a32, b32 = a16.float(), b16.float()  # float32 adapters take x as it is
    assert torch.equal(torch.ops.lorafuse.lora_branch(out, x, a32, b32, 0.5), torch.ops.lorafuse.lora_add(out, x, a32, b32, 0.5))
    torch.library.opcheck(
        torch.ops.lorafuse.lora_branch.default, (out, x.requires_grad_(), a32.requires_grad_(), b32, 0.5, 0.0)
    )
