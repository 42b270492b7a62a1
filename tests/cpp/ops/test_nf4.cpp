// The NF4 ops through the C++ API (<lorafuse/ops/nf4.h>); bit-exactness against bitsandbytes is tested in
// tests/python/ops/test_nf4.py, where the real bitsandbytes runs.
#include <ATen/ATen.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/nf4.h>
#include <torch/csrc/autograd/autograd.h>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse_test::require_error_parts;

TEST_CASE("nf4: the code values, the packing order and the tie rule", "[cpu][ops][nf4]") {
  const auto code = lorafuse::nf4_code_map();
  REQUIRE(code.numel() == 16);
  CHECK(code[0].item<float>() == -1.0f);
  CHECK(code[7].item<float>() == 0.0f);
  CHECK(code[15].item<float>() == 1.0f);
  CHECK(at::all(code.slice(0, 1) > code.slice(0, 0, -1)).item<bool>());
  const auto dynamic = lorafuse::dynamic_code_map();
  REQUIRE(dynamic.numel() == 256);
  CHECK(at::all(dynamic.slice(0, 1) >= dynamic.slice(0, 0, -1)).item<bool>());
  CHECK(dynamic[255].item<float>() == 1.0f);

  // one block of 32: absmax 1 (code 15), then -1 (code 0), then each midpoint (the lower code), then zeros (code 7)
  auto w = at::zeros({32});
  w[0] = 1.0;
  w[1] = -1.0;
  for (int i = 0; i < 15; ++i) w[2 + i] = (code[i] + code[i + 1]).item<float>() / 2.0f;
  const auto q = lorafuse::quantize_nf4(w, 32, false);
  REQUIRE(q.packed.sizes() == at::IntArrayRef({16, 1}));
  const auto bytes = q.packed.reshape(-1);
  CHECK(bytes[0].item<uint8_t>() == 0xF0);  // first element in the high nibble
  for (int i = 0; i < 15; ++i) {
    const auto byte = bytes[(2 + i) / 2].item<uint8_t>();
    CHECK(((2 + i) % 2 == 0 ? byte >> 4 : byte & 15) == i);
  }
  CHECK(bytes[15].item<uint8_t>() == 0x77);
  CHECK(q.absmax.item<float>() == 1.0f);
}

TEST_CASE("nf4: round trip within half a code gap of each block's absmax, double quantization close to single",
          "[cpu][ops][nf4]") {
  at::manual_seed(3);
  const auto w = at::randn({96, 130});
  for (const int64_t bs : {32, 64, 4096}) {
    const auto single = lorafuse::quantize_nf4(w, bs, false);
    const auto back =
        lorafuse::dequantize_nf4(single.packed, single.absmax, std::nullopt, std::nullopt, bs, w.sizes(), at::kFloat);
    REQUIRE(back.sizes() == w.sizes());
    // the largest gap between neighbouring codes is -0.6961928 - (-1) < 0.3039: half of it bounds the error
    // relative to the block's absmax
    const auto absmax = single.absmax.repeat_interleave(bs).slice(0, 0, w.numel()).reshape(w.sizes());
    CHECK(at::all((back - w).abs() <= absmax * 0.152 + 1e-6).item<bool>());
    const auto dq = lorafuse::quantize_nf4(w, bs, true);
    CHECK(dq.absmax.scalar_type() == at::kByte);
    CHECK(dq.offset.dim() == 0);
    const auto back2 =
        lorafuse::dequantize_nf4(dq.packed, dq.absmax, dq.nested_absmax, dq.offset, bs, w.sizes(), at::kBFloat16);
    CHECK(back2.scalar_type() == at::kBFloat16);
    CHECK(at::allclose(back2.to(at::kFloat), back, 0.02, 0.02));
  }
}

TEST_CASE("nf4: bad input names the argument", "[cpu][ops][nf4]") {
  require_error_parts<c10::ValueError>(
      [] {
        lorafuse::quantize_nf4(at::randn({4, 4}), 100, true);
      },
      {"blocksize", "found 100"});
  require_error_parts<c10::TypeError>(
      [] {
        lorafuse::quantize_nf4(at::ones({4, 4}, at::kInt), 64, true);
      },
      {"weight", "Int"});
  auto w = at::randn({4, 64});
  w[1][3] = std::numeric_limits<float>::infinity();
  require_error_parts<c10::ValueError>([&] { lorafuse::quantize_nf4(w, 64, true); },
                                       {"weight: expected finite values", "flat index 67"});
  const auto q = lorafuse::quantize_nf4(at::randn({4, 64}), 64, false);
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::dequantize_nf4(q.packed, q.absmax, std::nullopt, std::nullopt, 64, {4, 65}, at::kFloat);
      },
      {"packed", "130 bytes", "found 128"});
  // the 4-bit weight never trains: statistics that ask for a gradient are refused
  const auto absmax = q.absmax.clone().set_requires_grad(true);
  const auto x = at::randn({2, 64}).set_requires_grad(true);
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::nf4_linear(x, q.packed, absmax, std::nullopt, std::nullopt, 64, 4); },
      {"lorafuse.nf4_linear: absmax requires grad", "the 4-bit weight is frozen"});
}

TEST_CASE("nf4_linear: forward and LibTorch autograd equal a dense linear over the dequantized weight, tile by tile",
          "[cpu][ops][nf4]") {
  at::manual_seed(5);
  const int64_t out = 1100, in = 8200;  // tiles of 2^22 / 8200 = 511 rows: three tiles (511 + 511 + 78)
  const auto q = lorafuse::quantize_nf4(at::randn({out, in}), 64, true);
  const auto w = lorafuse::dequantize_nf4(q.packed, q.absmax, q.nested_absmax, q.offset, 64, {out, in}, at::kFloat);
  const auto x = at::randn({2, 3, in}).set_requires_grad(true);
  const auto bias = at::randn({out}).set_requires_grad(true);
  const auto y = lorafuse::nf4_linear(x, q.packed, q.absmax, q.nested_absmax, q.offset, 64, out, bias);
  REQUIRE(y.sizes() == at::IntArrayRef({2, 3, out}));
  const auto xd = x.detach().to(at::kDouble).set_requires_grad(true);
  const auto bd = bias.detach().to(at::kDouble).set_requires_grad(true);
  const auto ref = at::matmul(xd, w.to(at::kDouble).t()) + bd;
  // the design's rule: no further from the float64 reference than twice ATen's own float32 linear (whose sums over
  // 8200 products round differently on different CPUs' GEMM kernels), plus a small absolute slack
  const auto err = [](const at::Tensor& a, const at::Tensor& b) {
    return (a.to(at::kDouble) - b).abs().max().item<double>();
  };
  const auto aten = at::matmul(x.detach(), w.t()) + bias.detach();
  INFO("max error " << err(y, ref) << ", ATen float32 " << err(aten, ref));
  CHECK(err(y, ref) <= 2 * err(aten, ref) + 1e-5);
  const auto dy = at::randn_like(y);
  y.backward(dy);
  ref.backward(dy.to(at::kDouble));
  const auto aten_dx = at::matmul(dy, w);
  INFO("dx max error " << err(x.grad(), xd.grad()) << ", ATen float32 " << err(aten_dx, xd.grad()));
  CHECK(err(x.grad(), xd.grad()) <= 2 * err(aten_dx, xd.grad()) + 1e-5);
  CHECK(at::allclose(bias.grad().to(at::kDouble), bd.grad(), 1e-5, 1e-4));
  CHECK_FALSE(q.packed.grad().defined());
}

TEST_CASE("nf4_lora_linear: the one op equals nf4_linear + lora_add, forward and LibTorch autograd, dropout included",
          "[cpu][ops][nf4]") {
  const int64_t out = 1100, in = 8200, r = 8;  // three tiles of rows
  const auto q = lorafuse::quantize_nf4(at::randn({out, in}), 64, true);
  const auto x = at::randn({2, 3, in}).set_requires_grad(true);
  const auto bias = at::randn({out}).set_requires_grad(true);
  const auto a = (at::randn({r, in}) * 0.01).set_requires_grad(true);
  const auto b = at::randn({out, r}).set_requires_grad(true);
  const auto dy = at::randn({2, 3, out});
  const std::vector<at::Tensor> inputs = {x, bias, a, b};
  auto run = [&](double p, bool fused) {
    at::manual_seed(21);  // the same dropout draw for both
    const auto y =
        fused
            ? lorafuse::nf4_lora_linear(x, q.packed, q.absmax, q.nested_absmax, q.offset, 64, out, bias, a, b, 0.5, p)
            : lorafuse::lora_add(lorafuse::nf4_linear(x, q.packed, q.absmax, q.nested_absmax, q.offset, 64, out, bias),
                                 x, a, b, 0.5, p);
    auto grads = torch::autograd::grad({y}, inputs, {dy});
    grads.insert(grads.begin(), y.detach());
    return grads;
  };
  for (const double p : {0.0, 0.3}) {
    const auto fused = run(p, true), chain = run(p, false);
    for (size_t i = 0; i < fused.size(); ++i) {
      INFO("p = " << p << ", tensor " << i << " (y, dx, dbias, da, db)");
      CHECK(at::allclose(fused[i], chain[i], 1e-5, 1e-4));
    }
  }
  // bad input names the op and the argument
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::nf4_lora_linear(x, q.packed, q.absmax, q.nested_absmax, q.offset, 64, out, bias, a,
                                  at::randn({out + 1, r}), 1.0);
      },
      {"lorafuse.nf4_lora_linear", "lora_b must have shape [out, r]"});
}
