"""The quantized-weight format of QLoRA and LQ-LoRA at every bit width: quantize_nf / dequantize_nf against a
reference written here from the format's rules (cuda/shared/nf_format.h), the linear and LoRA ops over it against a
float64 reference, opcheck, and bad input."""

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch

import lorafuse
from lorafuse import NfFormat


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The first n codes of a most-significant-bit-first bit stream."""
    stream = np.unpackbits(packed.reshape(-1).numpy())[: n * bits].reshape(n, bits)
    weights = 1 << np.arange(bits - 1, -1, -1)
    return torch.from_numpy((stream * weights).sum(1).astype(np.int64))


def nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value, ties to the lower one: how many midpoints lie strictly below x."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.searchsorted(midpoints, x, right=False)


def reference_first_level(w: torch.Tensor, f: NfFormat):
    """Absmax per block (a partial last block clamped to 1e-38) and the NF code indices, in float32 as the rules say:
    a full block multiplies by the reciprocal of its absmax, a partial one divides."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    code = lorafuse._C.nf_code(f.bits)
    absmax, indices = [], []
    for start in range(0, n, f.blocksize):
        block = flat[start : start + f.blocksize]
        am = block.abs().max()
        if block.numel() == f.blocksize:
            x = block * (1.0 / torch.clamp(am, min=1e-38))
        else:
            am = torch.clamp(am, min=1e-38)
            x = block / am
        absmax.append(am)
        indices.append(nearest(x.clamp(-1, 1), code))
    return torch.stack(absmax), torch.cat(indices)


def reference_uniform_statistics(absmax: torch.Tensor, f: NfFormat, stat_dtype: torch.dtype):
    """The LQ-LoRA reference's second level (stat_bits < 8): above the minimum, uniform codes per scale block."""
    offset = absmax.min()
    v = absmax - offset
    levels = (1 << f.stat_bits) - 1
    table = torch.arange(levels + 1, dtype=torch.float32) / levels
    scales, codes = [], []
    for start in range(0, v.numel(), f.stat_blocksize):
        block = v[start : start + f.stat_blocksize]
        s = block.abs().max().to(stat_dtype).float()
        scales.append(s)
        codes.append(torch.zeros_like(block, dtype=torch.int64) if s == 0 else nearest((block / s).clamp(0, 1), table))
    scales = torch.stack(scales)
    codes = torch.cat(codes)
    decoded = table[codes] * scales[torch.arange(v.numel()) // f.stat_blocksize] + offset
    return offset, scales, codes, decoded


FORMATS = [
    NfFormat(2, 16, 3, 16),
    NfFormat(3, 64, 4, 64),
    NfFormat(3, 32, 2, 256),
    NfFormat(4, 64, 3, 16),
    NfFormat(5, 16, 4, 64),
    NfFormat(8, 64, 2, 64),
    NfFormat(3, 64, 0, 0),
    NfFormat(2, 32, 0, 0),
]


@pytest.mark.parametrize("f", FORMATS, ids=str)
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_the_rules_to_the_bit(f, stat_dtype):
    if f.stat_bits == 0 and stat_dtype != torch.float32:
        pytest.skip("no statistics to store in another dtype")
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.linspace(0.2, 3, 53)  # 1961 values: partial first- and second-level blocks
    q = lorafuse.quantize_nf(w, f, stat_dtype)
    absmax, indices = reference_first_level(w, f)
    assert q.packed.shape == ((w.numel() * f.bits + 7) // 8, 1)
    assert torch.equal(unpack_codes(q.packed, w.numel(), f.bits), indices)
    if f.stat_bits == 0:
        assert torch.equal(q.absmax, absmax)
        stats = absmax
    else:
        offset, scales, codes, stats = reference_uniform_statistics(absmax, f, stat_dtype)
        assert q.nested_absmax.dtype == stat_dtype
        assert torch.equal(q.offset, offset)
        assert torch.equal(q.nested_absmax.float(), scales)
        assert torch.equal(unpack_codes(q.absmax, absmax.numel(), f.stat_bits), codes)
    code = lorafuse._C.nf_code(f.bits)
    expected = code[indices] * stats[torch.arange(w.numel()) // f.blocksize]
    for dtype in (torch.float32, torch.bfloat16):
        out = lorafuse.dequantize_nf(q, f, w.shape, dtype)
        assert torch.equal(out, expected.reshape(w.shape).to(dtype))


@pytest.mark.parametrize("stat_blocksize", [16, 64, 256])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eight_bit_statistics_are_bitsandbytes_double_quantization(stat_blocksize, stat_dtype):
    torch.manual_seed(1)
    w = torch.randn(96, 80)
    f = NfFormat(3, 32, 8, stat_blocksize)
    q = lorafuse.quantize_nf(w, f, stat_dtype)
    absmax, indices = reference_first_level(w, f)
    assert torch.equal(unpack_codes(q.packed, w.numel(), 3), indices)
    assert torch.equal(q.offset, absmax.mean())
    # the statistics decode within half the dynamic code's widest gap of their block's scale
    dynamic = lorafuse._C.dynamic_code_map()
    scales = q.nested_absmax.float()[torch.arange(absmax.numel()) // stat_blocksize]
    decoded = dynamic[q.absmax.long()] * scales + q.offset
    assert (decoded - absmax).abs().max() <= (dynamic.diff().max() / 2 * scales).max() + 1e-6
    if stat_blocksize == 256 and stat_dtype == torch.float32:  # bitsandbytes' own second level, to the bit
        codes, state = bnbf.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
        assert torch.equal(q.absmax, codes) and torch.equal(q.nested_absmax, state.absmax)


def test_nf4_format_is_bitsandbytes_nf4_to_the_bit():
    torch.manual_seed(2)
    w = torch.randn(64, 77, dtype=torch.bfloat16)  # an odd element count: the padding nibble too
    for double_quant, f in ((True, NfFormat(4, 64, 8, 256)), (False, NfFormat(4, 64, 0, 0))):
        ours = lorafuse.quantize_nf(w, f)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        assert torch.equal(ours.packed, packed)
        if double_quant:
            assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.offset, state.offset)
            assert torch.equal(ours.nested_absmax, state.state2.absmax)
        else:
            assert torch.equal(ours.absmax, state.absmax)
        theirs = bnbf.dequantize_4bit(packed, state)
        assert torch.equal(lorafuse.dequantize_nf(ours, f, w.shape, torch.bfloat16), theirs)
        assert all(torch.equal(a, b) for a, b in zip(ours, lorafuse.quantize_nf4(w, 64, double_quant)))


def test_more_bits_means_less_error():
    torch.manual_seed(3)
    w = torch.randn(128, 256)
    errors = []
    for bits in (2, 3, 4, 8):
        f = NfFormat(bits, 64, 8, 256)
        errors.append((lorafuse.dequantize_nf(lorafuse.quantize_nf(w, f), f, w.shape) - w).norm() / w.norm())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[2] < 0.11 and errors[3] < 0.01  # NF4 about 0.1 on Gaussian weights, NF8 far below


def test_bits_per_weight():
    assert NfFormat(4, 64, 8, 256).bits_per_weight() == 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA's 4.127
    assert NfFormat(2, 16, 3, 64).bits_per_weight(torch.bfloat16) == 2 + 3 / 16 + 16 / (16 * 64)
    assert NfFormat(3, 64, 0, 0).bits_per_weight() == 3 + 32 / 64


@pytest.mark.parametrize("f", [NfFormat(3, 64, 4, 64), NfFormat(2, 16, 8, 16), NfFormat(8, 32, 0, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_lora_ops_equal_the_float64_reference(f, dtype):
    torch.manual_seed(4)
    out_f, in_f, r = 45, 70, 6
    q = lorafuse.quantize_nf(torch.randn(out_f, in_f), f)
    w = lorafuse.dequantize_nf(q, f, (out_f, in_f), dtype)  # the weight as the layer computes with it
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    bias = torch.randn(out_f, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, in_f) * 0.1).requires_grad_()
    b = (torch.randn(out_f, r) * 0.1).requires_grad_()
    y = lorafuse.nf_lora_linear(x, q, f, out_f, a, b, 0.5, bias)
    x64, w64, bias64 = x.double().detach().requires_grad_(), w.double(), bias.double().detach().requires_grad_()
    a64, b64 = a.double().detach().requires_grad_(), b.double().detach().requires_grad_()
    y64 = x64 @ w64.T + bias64 + 0.5 * (x64 @ a64.T) @ b64.T
    torch_err = ((x.float() @ w.float().T).to(dtype).double() - (x64 @ w64.T)).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2 * torch_err + 1e-2
    assert (y.double() - y64).abs().max().item() <= tol
    gy = torch.randn_like(y)
    y.backward(gy)
    y64.backward(gy.double())
    for ours, ref in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad), (bias.grad, bias64.grad)):
        assert (ours.double() - ref).abs().max().item() <= tol * 4, (ours.double() - ref).abs().max()
    base = lorafuse.nf_linear(x.detach(), q, f, out_f, bias.detach())
    assert (base.double() - (x64 @ w64.T + bias64)).abs().max().item() <= tol


@pytest.mark.parametrize("f", [NfFormat(3, 64, 4, 64), NfFormat(2, 16, 0, 0)], ids=str)
def test_opcheck(f):
    torch.manual_seed(5)
    w = torch.randn(24, 40)
    q = lorafuse.quantize_nf(w, f)
    fmt = list(f)
    x = torch.randn(4, 40, requires_grad=True)
    a = torch.randn(3, 40, requires_grad=True)
    b = torch.randn(24, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.lorafuse.quantize_nf, (w, fmt, torch.float32))
    torch.library.opcheck(torch.ops.lorafuse.dequantize_nf, (*q, fmt, [24, 40], torch.float32))
    torch.library.opcheck(torch.ops.lorafuse.nf_linear, (x, *q, fmt, 24, None))
    torch.library.opcheck(torch.ops.lorafuse.nf_lora_linear, (x, *q, fmt, 24, None, a, b, 0.5, 0.0))


def test_bad_arguments_name_what_is_wrong():
    w = torch.randn(16, 64)
    cases = [
        ([4, 64, 8], ValueError, r"format: expected \[bits, blocksize, stat_bits, stat_blocksize\], found \[4, 64"),
        ([1, 64, 8, 256], ValueError, "format: bits: expected 2 .. 8, found 1"),
        ([9, 64, 8, 256], ValueError, "format: bits: expected 2 .. 8, found 9"),
        ([4, 48, 8, 256], ValueError, r"format: blocksize: expected a power of two in \[16, 4096\], found 48"),
        ([4, 64, 1, 256], ValueError, "format: stat_bits: expected 0 .* or 2 .. 8, found 1"),
        ([4, 64, 3, 0], ValueError, r"format: stat_blocksize: expected a power of two in \[16, 4096\] with stat_bits"),
        ([4, 64, 0, 256], ValueError, "format: stat_blocksize: expected 0 with stat_bits = 0"),
    ]
    for fmt, error, message in cases:
        with pytest.raises(error, match="lorafuse.quantize_nf: " + message):
            torch.ops.lorafuse.quantize_nf(w, fmt, torch.float32)
    with pytest.raises(TypeError, match="stat_dtype: expected float32, bfloat16 or float16, found Double"):
        lorafuse.quantize_nf(w, NfFormat(3, 64, 4, 64), torch.float64)
    with pytest.raises(TypeError, match="stat_dtype: expected float32 without double quantization"):
        lorafuse.quantize_nf(w, NfFormat(3, 64, 0, 0), torch.float16)
    with pytest.raises(ValueError, match="stat_dtype: a block of statistics has scale inf in Half"):
        lorafuse.quantize_nf(w * 1e6, NfFormat(3, 64, 4, 64), torch.float16)
    with pytest.raises(ValueError, match="quantize_nf: weight: expected finite values, found nan at flat index 7"):
        lorafuse.quantize_nf(torch.where(torch.arange(1024).reshape(16, 64) == 7, float("nan"), w), NfFormat())
    f = NfFormat(3, 64, 4, 64)
    q = lorafuse.quantize_nf(w, f)
    with pytest.raises(ValueError, match=r"dequantize_nf: packed: expected 384 bytes \(3-bit codes\) for shape"):
        lorafuse.dequantize_nf(q._replace(packed=q.packed[:100]), f, w.shape)
    with pytest.raises(ValueError, match=r"dequantize_nf: absmax: expected 8 bytes \(4-bit codes of 16 blocks"):
        lorafuse.dequantize_nf(q._replace(absmax=torch.zeros(9, dtype=torch.uint8)), f, w.shape)
    with pytest.raises(ValueError, match="nested_absmax: expected the statistics' scales .* found none"):
        lorafuse.dequantize_nf(q._replace(nested_absmax=torch.empty(0)), f, w.shape)
    with pytest.raises(ValueError, match="nested_absmax: given, but the format has stat_bits = 0"):
        lorafuse.dequantize_nf(q, NfFormat(3, 64, 0, 0), w.shape)
    with pytest.raises(ValueError, match="lorafuse.nf_lora_linear: lora_b must have shape"):
        lorafuse.nf_lora_linear(torch.randn(2, 64), q, f, 16, torch.randn(4, 64), torch.randn(15, 4), 1.0)
    with pytest.raises(ValueError, match="lorafuse.nf_linear: offset requires grad, but the .*weight is frozen"):
        lorafuse.nf_linear(torch.randn(2, 64), q._replace(offset=q.offset.clone().requires_grad_()), f, 16)
