"""The quantized-weight ops on CUDA (cuda/nf/): NF4 and every other format of the family (NF-b, b = 2 .. 8; statistics
in float32, 8-bit dynamic or 2 .. 7-bit uniform, with float32 / bfloat16 / float16 scales). quantize and dequantize
bit-exact with the CPU kernels, the linear op through the decode GEMV (T <= 16) and through the dequantized weight +
cuBLAS (larger T) against a float64 reference, its backward, QLoRA and LQ-LoRA layers moved to the GPU, and the LoRA
op over a quantized base against the CPU kernel. Skipped without a GPU or without CUDA kernels in this build; the same
kernels run through the CPU emulator in tests/cpp/cuda_emu on every machine."""

import copy

import pytest
import torch
from conftest import cuda_skip_reason

import lorafuse
from lorafuse.nn import Linear4bit

pytestmark = pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason()))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _quantized(out_features, in_features, blocksize=64, double_quant=True, seed=0):
    torch.manual_seed(seed)
    return lorafuse.quantize_nf4(torch.randn(out_features, in_features), blocksize, double_quant)


def _cuda(q):
    return lorafuse.Nf4Weight(*(t.cuda() for t in q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize,double_quant", [((64, 128), 64, True), ((7, 33), 32, False), ((75, 128), 32, True)])
def test_dequantize_on_cuda_is_bit_exact_with_the_cpu(dtype, shape, blocksize, double_quant):
    q = _quantized(*shape, blocksize, double_quant)
    cpu = lorafuse.dequantize_nf4(q, list(shape), dtype, blocksize)
    gpu = lorafuse.dequantize_nf4(_cuda(q), list(shape), dtype, blocksize)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 16, 17, 300])
def test_nf4_linear_on_cuda_against_float64(dtype, tokens):
    out_features, in_features = 96, 160
    q = _quantized(out_features, in_features)
    torch.manual_seed(1)
    x = torch.randn(2, tokens, in_features + 8)[..., :in_features].to(dtype)  # strided rows
    bias = torch.randn(out_features).to(dtype)
    w = lorafuse.dequantize_nf4(q, [out_features, in_features], dtype).double()
    want = x.double() @ w.t() + bias.double()
    y = lorafuse.nf4_linear(x.cuda(), _cuda(q), out_features, bias.cuda())
    assert y.shape == (2, tokens, out_features) and y.dtype == dtype
    err = (y.cpu().double() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], f"T={tokens}: {err}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [4, 64])
def test_nf4_linear_backward_on_cuda(dtype, tokens):
    out_features, in_features = 64, 96
    q = _quantized(out_features, in_features, double_quant=False)
    x = torch.randn(tokens, in_features, dtype=dtype, device="cuda", requires_grad=True)
    bias = torch.randn(out_features, dtype=dtype, device="cuda", requires_grad=True)
    y = lorafuse.nf4_linear(x, _cuda(q), out_features, bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    w = lorafuse.dequantize_nf4(q, [out_features, in_features], dtype).double()
    want = grad.cpu().double() @ w
    err = (x.grad.cpu().double() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype]
    torch.testing.assert_close(bias.grad, grad.sum(0))


@pytest.mark.parametrize("shape,blocksize,double_quant", [((64, 128), 64, True), ((7, 33), 32, False), ((300, 256), 32, True)])
def test_quantize_on_cuda_gives_the_cpu_bytes(shape, blocksize, double_quant):
    torch.manual_seed(2)
    w = torch.randn(*shape) * 3
    cpu = lorafuse.quantize_nf4(w, blocksize, double_quant)
    gpu = lorafuse.quantize_nf4(w.cuda(), blocksize, double_quant)
    for name, c, g in zip(lorafuse.Nf4Weight._fields, cpu, gpu):
        assert g.is_cuda and torch.equal(g.cpu(), c), name
    with pytest.raises(ValueError, match="expected finite values, found inf at flat index 5"):
        lorafuse.quantize_nf4(w.reshape(-1).index_fill(0, torch.tensor([5]), float("inf")).cuda())


def test_a_qlora_layer_moved_to_the_gpu_computes_as_on_the_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    lorafuse.quantize_model(model, lorafuse.QuantConfig(modules_to_not_convert=[]))
    assert type(model[0]) is Linear4bit
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(3, 5, 128)
    want = model(x)
    gpu = model.cuda()
    got = gpu(x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for n, p in gpu.named_parameters() if p.requires_grad)


def test_opcheck_on_cuda():
    torch.manual_seed(3)
    w = torch.randn(40, 96, device="cuda")
    torch.library.opcheck(torch.ops.lorafuse.quantize_nf4.default, (w, 64, True))
    q = lorafuse.quantize_nf4(w, 64, True)
    torch.library.opcheck(
        torch.ops.lorafuse.dequantize_nf4.default, (q.packed, q.absmax, q.nested_absmax, q.offset, 64, [40, 96], torch.bfloat16)
    )
    for tokens in (3, 40):  # the GEMV and the cuBLAS path
        x = torch.randn(tokens, 96, device="cuda", requires_grad=True)
        bias = torch.randn(40, device="cuda", requires_grad=True)
        torch.library.opcheck(torch.ops.lorafuse.nf4_linear.default, (x, *q, 64, 40, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 300])
def test_nf4_lora_linear_on_cuda_computes_as_on_the_cpu(dtype, tokens):
    """The QLoRA layer in one op on CUDA (nf4_linear's kernels and lora_add's, CompositeExplicitAutograd): output and
    gradients as the CPU kernel gives them, dropout off; opcheck on the device."""
    out_features, in_features, r = 96, 160, 8
    q = _quantized(out_features, in_features)
    torch.manual_seed(4)
    x = torch.randn(tokens, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    a, b = torch.randn(r, in_features) * 0.1, torch.randn(out_features, r) * 0.1
    dy = torch.randn(tokens, out_features).to(dtype)

    def run(device):
        ins = [t.to(device).requires_grad_() for t in (x, bias, a, b)]
        y = lorafuse.nf4_lora_linear(ins[0], lorafuse.Nf4Weight(*(t.to(device) for t in q)), out_features, ins[2],
                                     ins[3], 0.5, ins[1])
        return [y.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(y, ins, dy.to(device))]

    for name, got, want in zip(("y", "dx", "dbias", "da", "db"), run("cuda"), run("cpu")):
        err = (got.double() - want.double()).abs().max() / want.double().abs().max()
        assert err < 2 * TOL[dtype], (name, err)
    ins = [t.cuda().requires_grad_() for t in (x, bias, a, b)]
    torch.library.opcheck(
        torch.ops.lorafuse.nf4_lora_linear.default, (ins[0], *_cuda(q), 64, out_features, ins[1], ins[2], ins[3], 0.5, 0.0)
    )


# LQ-LoRA's formats beside NF4: (format, scale dtype)
FORMATS = [
    (lorafuse.NfFormat(2, 16, 3, 64), torch.float32),
    (lorafuse.NfFormat(3, 64, 8, 16), torch.float32),
    (lorafuse.NfFormat(5, 32, 4, 256), torch.bfloat16),
    (lorafuse.NfFormat(8, 16, 2, 16), torch.float16),
    (lorafuse.NfFormat(6, 128, 0, 0), torch.float32),
]
FORMAT_IDS = [f"nf{f.bits}-{f.blocksize}-{f.stat_bits}-{f.stat_blocksize}-{str(d)[6:]}" for f, d in FORMATS]


@pytest.mark.parametrize("fmt,stat_dtype", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("shape", [(64, 128), (7, 33), (300, 256)])
def test_every_format_quantizes_and_dequantizes_on_cuda_as_on_the_cpu(fmt, stat_dtype, shape):
    torch.manual_seed(5)
    w = torch.randn(*shape) * 3
    cpu = lorafuse.quantize_nf(w, fmt, stat_dtype)
    gpu = lorafuse.quantize_nf(w.cuda(), fmt, stat_dtype)
    for name, c, g in zip(lorafuse.NfWeight._fields, cpu, gpu):
        assert g.is_cuda and g.dtype == c.dtype and torch.equal(g.cpu(), c), name
    for dtype in DTYPES:
        want = lorafuse.dequantize_nf(cpu, fmt, shape, dtype)
        assert torch.equal(lorafuse.dequantize_nf(gpu, fmt, shape, dtype).cpu(), want)


def test_a_scale_float16_cannot_hold_is_refused_on_cuda_as_on_the_cpu():
    w = torch.full((4, 64), 1e6)
    w[0, 0] = 0.0
    fmt = lorafuse.NfFormat(3, 16, 8, 16)
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="stat_dtype: a block of statistics has scale inf in Half"):
            lorafuse.quantize_nf(w.to(device) * torch.linspace(1, 100, 64, device=device), fmt, torch.float16)


@pytest.mark.parametrize("fmt,stat_dtype", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_every_format_nf_linear_on_cuda_against_float64(fmt, stat_dtype, dtype, tokens):
    out_features, in_features = 96, 160
    torch.manual_seed(6)
    q = lorafuse.quantize_nf(torch.randn(out_features, in_features), fmt, stat_dtype)
    x = torch.randn(tokens, in_features + 8)[..., :in_features].to(dtype)  # strided rows
    bias = torch.randn(out_features).to(dtype)
    w = lorafuse.dequantize_nf(q, fmt, [out_features, in_features], dtype).double()
    want = x.double() @ w.t() + bias.double()
    xg = x.cuda().requires_grad_()
    y = lorafuse.nf_linear(xg, lorafuse.NfWeight(*(t.cuda() for t in q)), fmt, out_features, bias.cuda())
    err = (y.detach().cpu().double() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], f"T={tokens}: {err}"
    dy = torch.randn(tokens, out_features).to(dtype)
    (dx,) = torch.autograd.grad(y, xg, dy.cuda())
    want_dx = dy.double() @ w
    assert (dx.cpu().double() - want_dx).abs().max() / want_dx.abs().max() < TOL[dtype]


@pytest.mark.parametrize("fmt,stat_dtype", FORMATS, ids=FORMAT_IDS)
def test_every_format_lora_op_and_layer_on_cuda_compute_as_on_the_cpu(fmt, stat_dtype):
    """The LoRA op over a b-bit base (nf_lora_linear: forward and gradients) and an LQ-LoRA-style layer (Linear4bit
    in the format, LoRA injected, merged back into the bits) on CUDA against the same on the CPU; opcheck on the
    device."""
    out_features, in_features, r = 96, 160, 8
    torch.manual_seed(7)
    q = lorafuse.quantize_nf(torch.randn(out_features, in_features), fmt, stat_dtype)
    x, bias = torch.randn(20, in_features), torch.randn(out_features)
    a, b = torch.randn(r, in_features) * 0.1, torch.randn(out_features, r) * 0.1
    dy = torch.randn(20, out_features)

    def run(device):
        ins = [t.to(device).requires_grad_() for t in (x, bias, a, b)]
        qd = lorafuse.NfWeight(*(t.to(device) for t in q))
        y = lorafuse.nf_lora_linear(ins[0], qd, fmt, out_features, ins[2], ins[3], 0.5, ins[1])
        return [y.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(y, ins, dy.to(device))]

    for name, got, want in zip(("y", "dx", "dbias", "da", "db"), run("cuda"), run("cpu")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    ins = [t.cuda().requires_grad_() for t in (x, bias, a, b)]
    torch.library.opcheck(
        torch.ops.lorafuse.nf_lora_linear.default,
        (ins[0], *(t.cuda() for t in q), list(fmt), out_features, ins[1], ins[2], ins[3], 0.5, 0.0),
    )

    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    layer = Linear4bit.from_linear(
        model[0], blocksize=fmt.blocksize, double_quant=fmt.stat_bits > 0, bits=fmt.bits,
        **({"stat_bits": fmt.stat_bits, "stat_blocksize": fmt.stat_blocksize, "stat_dtype": stat_dtype}
           if fmt.stat_bits else {}),
    )
    model[0] = layer
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    want = model(x)
    gpu = model.cuda()
    torch.testing.assert_close(gpu(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)
    cpu_model = copy.deepcopy(model).cpu()
    for m in (gpu, cpu_model):
        m[0].merge(requantize=True)  # dequant + B·A, quantized again in the layer's format
    assert torch.equal(gpu[0].base_layer.dequantized_weight().cpu(), cpu_model[0].base_layer.dequantized_weight())
