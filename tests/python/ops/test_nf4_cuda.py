"""The NF4 ops on CUDA (cuda/nf4/): quantize and dequantize bit-exact with the CPU kernels, nf4_linear through the decode
GEMV (T <= 16) and through the dequantized weight + cuBLAS (larger T) against a float64 reference, its backward, a
QLoRA layer moved to the GPU, and nf4_lora_linear against the CPU kernel. Skipped without a GPU or without CUDA
kernels in this build; the same kernels run through the CPU emulator in tests/cpp/cuda_emu on every machine."""

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
