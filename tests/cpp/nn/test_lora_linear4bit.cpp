// lorafuse::nn::LoraLinear4bit (<lorafuse/nn/lora_linear4bit.h>): QLoRA's layer in LibTorch — forward and gradients
// against a float64 reference over the dequantized weight, the 4-bit weight never training, merging into 4 bits only
// when asked (with its error reported and the bytes restored exactly), merge_and_unload to a dense layer, archives
// and clones.
#include <ATen/ATen.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <lorafuse/ops/nf4.h>
#include <torch/csrc/autograd/function.h>
#include <torch/serialize.h>

#include <cmath>
#include <sstream>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::nn::Linear4bit;
using lorafuse::nn::Linear4bitImpl;
using lorafuse::nn::LoraAdapterOptions;
using lorafuse::nn::LoraLinear4bit;
using lorafuse::nn::LoraLinear4bitImpl;
using lorafuse_test::require_error_parts;

namespace {

LoraLinear4bit make_layer(int64_t in = 192, int64_t out = 80, int64_t r = 4, bool bias = true,
                          c10::ScalarType compute = at::kFloat) {
  at::manual_seed(21);
  torch::nn::Linear linear(torch::nn::LinearOptions(in, out).bias(bias));
  Linear4bit base(Linear4bitImpl::from_linear(linear, compute));
  // a random (non-zero) adapter, so that merged and unmerged outputs differ
  return LoraLinear4bit(base, LoraAdapterOptions(r).lora_alpha(2.0 * r).init_lora_weights(false));
}

at::Tensor d(const at::Tensor& t) { return t.detach().to(at::kDouble); }

// float64: x·dequant(W)ᵀ + b + scale·(x·Aᵀ)·Bᵀ
at::Tensor reference(LoraLinear4bitImpl& layer, const at::Tensor& x, const std::string& name = "default") {
  const double scale = layer.adapter_options(name).scale();
  auto y = at::matmul(d(x), d(layer.base_layer->dequantized_weight(at::kFloat)).t());
  if (layer.base_layer->bias.defined()) y = y + d(layer.base_layer->bias);
  return y + scale * at::matmul(at::matmul(d(x), d(layer.lora_a(name)).t()), d(layer.lora_b(name)).t());
}

std::vector<at::Tensor> bytes_of(const Linear4bitImpl& base) {
  return {base.packed.clone(), base.absmax.clone(), base.nested_absmax.clone(), base.offset.clone()};
}

bool same_bytes(const Linear4bitImpl& base, const std::vector<at::Tensor>& bytes) {
  return at::equal(base.packed, bytes[0]) && at::equal(base.absmax, bytes[1]) &&
         at::equal(base.nested_absmax, bytes[2]) && at::equal(base.offset, bytes[3]);
}

}  // namespace

TEST_CASE("LoraLinear4bit: forward and gradients equal the float64 reference, the 4-bit weight never trains",
          "[cpu][nn][nf4]") {
  auto layer = make_layer();
  CHECK(lorafuse::nn::base_kind_of(*layer->base_layer)->name() == std::string("linear4bit"));
  const auto x = at::randn({3, 5, 192}).set_requires_grad(true);
  const auto y = layer->forward(x);
  REQUIRE(y.sizes() == at::IntArrayRef({3, 5, 80}));
  CHECK(at::allclose(d(y), reference(*layer, x), 1e-4, 1e-4));
  // the layer and its branch are one autograd node: nf4_lora_linear
  REQUIRE(y.grad_fn());
  CHECK(y.grad_fn()->name().find("NfLoraLinearFunction") != std::string::npos);
  // gradients of x, A and B against autograd through the float64 reference
  const auto g = at::randn_like(y);
  y.backward(g);
  const auto xr = d(x).requires_grad_(true);
  const auto ar = d(layer->lora_a("default")).requires_grad_(true);
  const auto br = d(layer->lora_b("default")).requires_grad_(true);
  const double scale = layer->adapter_options("default").scale();
  const auto yr = at::matmul(xr, d(layer->base_layer->dequantized_weight(at::kFloat)).t()) +
                  d(layer->base_layer->bias) + scale * at::matmul(at::matmul(xr, ar.t()), br.t());
  yr.backward(d(g));
  CHECK(at::allclose(d(x.grad()), xr.grad(), 1e-4, 1e-4));
  CHECK(at::allclose(d(layer->lora_a("default").grad()), ar.grad(), 1e-4, 1e-4));
  CHECK(at::allclose(d(layer->lora_b("default").grad()), br.grad(), 1e-4, 1e-4));
  // trainable: A and B only; the base's bias frozen; the 4-bit weight is buffers
  std::vector<std::string> trainable;
  for (const auto& p : layer->named_parameters()) {
    if (p.value().requires_grad()) trainable.push_back(p.key());
  }
  CHECK(trainable == std::vector<std::string>{"lora_A.default.weight", "lora_B.default.weight"});
  CHECK_FALSE(layer->base_layer->bias.grad().defined());
  // disabled: the base alone
  layer->disable_adapters();
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));
  layer->enable_adapters();
  std::ostringstream text;
  layer->pretty_print(text);
  CHECK(text.str().find(
            "lorafuse::nn::LoraLinear4bit(in_features=192, out_features=80, bias=true, nf4, blocksize=64") == 0);
}

TEST_CASE("LoraLinear4bit: a bfloat16 compute dtype keeps float32 adapters (PEFT's autocast) and the 2x rule holds",
          "[cpu][nn][nf4]") {
  auto layer = make_layer(128, 64, 8, false, at::kBFloat16);
  CHECK(layer->lora_a("default").scalar_type() == at::kFloat);
  const auto x = at::randn({6, 128}).to(at::kBFloat16);
  const auto y = layer->forward(x);
  CHECK(y.scalar_type() == at::kBFloat16);
  const auto ref = reference(*layer, x);
  // PyTorch's own chain over the same weights: the bfloat16 base GEMM, the float32 branch cast back (PEFT's)
  const auto w = layer->base_layer->dequantized_weight(at::kBFloat16);
  const double scale = layer->adapter_options("default").scale();
  const auto branch =
      scale * at::matmul(at::matmul(x.to(at::kFloat), layer->lora_a("default").t()), layer->lora_b("default").t());
  const auto torch_y = at::matmul(x, w.t()) + branch.to(at::kBFloat16);
  const double ours = (d(y) - ref).abs().max().item<double>();
  const double theirs = (d(torch_y) - ref).abs().max().item<double>();
  CHECK(ours <= 2 * theirs + 1e-2);
}

TEST_CASE("LoraLinear4bit: merge refuses unless requantize, a requantized merge reports its error and unmerges exactly",
          "[cpu][nn][nf4][merge]") {
  auto layer = make_layer();
  const auto x = at::randn({7, 192});
  const auto bytes = bytes_of(*layer->base_layer);
  require_error_parts<c10::ValueError>([&] { layer->merge(); }, {"merge", "4-bit", "requantize"});
  CHECK_FALSE(layer->merged());
  CHECK(same_bytes(*layer->base_layer, bytes));
  CHECK_FALSE(layer->merge_error().has_value());

  layer->eval();
  const auto unmerged_out = layer->forward(x);
  layer->merge({}, /*requantize=*/true);
  CHECK(layer->merged());
  CHECK_FALSE(same_bytes(*layer->base_layer, bytes));
  // the new bytes are quantize_nf4(dequant(W) + scale·B·A) and the reported errors are what they cost
  const auto exact = lorafuse::dequantize_nf4(bytes[0], bytes[1], bytes[2], bytes[3], 64, {80, 192}, at::kFloat) +
                     layer->delta_weight("default");
  const auto q = lorafuse::quantize_nf4(exact, 64, true);
  CHECK(at::equal(layer->base_layer->packed, q.packed));
  CHECK(at::equal(layer->base_layer->absmax, q.absmax));
  const auto rounded = layer->base_layer->dequantized_weight(at::kFloat);
  const auto error = layer->merge_error();
  REQUIRE(error.has_value());
  const double err = d(rounded - exact).norm().item<double>();
  CHECK(error->output_error == Approx(err / d(exact).norm().item<double>()).epsilon(1e-5));
  CHECK(error->adapter_error == Approx(err / d(layer->delta_weight("default")).norm().item<double>()).epsilon(1e-3));
  CHECK(error->output_error > 0.0);
  CHECK(error->output_error < 0.2);  // NF4's rounding: about a tenth of the weight
  // merged: the layer is its (re-quantized) base
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));
  CHECK(at::allclose(layer->forward(x), unmerged_out, 0.5, 0.5));
  // unmerge restores the bytes exactly, and the outputs
  layer->unmerge();
  CHECK(same_bytes(*layer->base_layer, bytes));
  CHECK(at::equal(layer->forward(x), unmerged_out));
  CHECK_FALSE(layer->merge_error().has_value());
  // switching adapters of a merged layer unmerges first (as the dense layer)
  layer->add_adapter("other", LoraAdapterOptions(2).init_lora_weights(false), false);
  layer->merge({}, true);
  layer->set_adapter("other");
  CHECK_FALSE(layer->merged());
  CHECK(same_bytes(*layer->base_layer, bytes));
}

TEST_CASE("LoraLinear4bit: merge_and_unload gives a dense Linear holding dequant(W) + the adapter",
          "[cpu][nn][nf4][merge]") {
  auto layer = make_layer(96, 40);
  layer->eval();
  const auto x = at::randn({5, 96});
  const auto out = layer->forward(x);
  const auto expected = layer->base_layer->dequantized_weight(at::kFloat) + layer->delta_weight("default");
  const auto bias = layer->base_layer->bias.clone();
  // also after a requantized merge: from the unmerged bytes, rounded once
  layer->merge({}, true);
  auto dense = layer->merge_and_unload();
  CHECK(at::allclose(dense->weight, expected, 1e-6, 1e-6));
  CHECK(at::equal(dense->bias, bias));
  CHECK_FALSE(dense->weight.requires_grad());
  CHECK(at::allclose(dense->forward(x), out, 1e-5, 1e-5));
  CHECK(layer->adapter_names().empty());
}

TEST_CASE("LoraLinear4bit: archives and clones keep the bytes, the adapters and a requantized merge",
          "[cpu][nn][nf4]") {
  auto layer = make_layer(64, 32);
  layer->add_adapter("b", LoraAdapterOptions(2).init_lora_weights(false), false);
  layer->merge({}, true);
  const auto x = at::randn({3, 64});
  layer->eval();
  const auto y = layer->forward(x);
  const lorafuse_test::TempDir folder("lorafuse_lora4bit");
  const std::string path = folder.path + "/layer.pt";
  torch::save(layer, path);
  auto fresh = make_layer(64, 32);
  at::manual_seed(99);
  {
    torch::NoGradGuard g;
    fresh->lora_b("default").normal_();
  }
  torch::load(fresh, path);
  fresh->eval();
  CHECK(fresh->adapter_names() == std::vector<std::string>{"default", "b"});
  CHECK(fresh->merged_adapters() == std::vector<std::string>{"default"});
  CHECK(at::equal(fresh->forward(x), y));
  REQUIRE(fresh->merge_error().has_value());
  CHECK(fresh->merge_error()->output_error == layer->merge_error()->output_error);
  // a clone of a merged layer keeps the merged bytes, the error and the bytes to unmerge to
  auto merged_copy = std::dynamic_pointer_cast<LoraLinear4bitImpl>(layer->clone());
  merged_copy->eval();
  CHECK(at::equal(merged_copy->forward(x), y));
  REQUIRE(merged_copy->merge_error().has_value());
  CHECK(merged_copy->merge_error()->adapter_error == layer->merge_error()->adapter_error);
  merged_copy->unmerge();
  fresh->unmerge();
  layer->unmerge();
  CHECK(same_bytes(*merged_copy->base_layer, bytes_of(*layer->base_layer)));
  CHECK(same_bytes(*fresh->base_layer, bytes_of(*layer->base_layer)));

  auto copy = std::dynamic_pointer_cast<LoraLinear4bitImpl>(layer->clone());
  CHECK(copy->base_layer->packed.data_ptr() != layer->base_layer->packed.data_ptr());
  copy->eval();
  CHECK(at::equal(copy->forward(x), layer->forward(x)));
  CHECK(copy->lora_a("default").requires_grad());
  CHECK_FALSE(copy->lora_a("b").requires_grad());
}

TEST_CASE("LoraLinear4bit: bad input names the argument", "[cpu][nn][nf4][errors]") {
  require_error_parts<c10::ValueError>([] { LoraLinear4bit(Linear4bit(nullptr), LoraAdapterOptions(4)); },
                                       {"base", "Linear4bit"});
  auto layer = make_layer(64, 32);
  require_error_parts<c10::ValueError>([&] { layer->forward(at::randn({2, 63})); }, {"63"});
  require_error_parts<c10::ValueError>([&] { layer->merge({"missing"}, true); }, {"missing"});
  require_error_parts<c10::ValueError>([&] { layer->unmerge(); }, {"unmerge"});
}
