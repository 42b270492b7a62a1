// DoRA (LoraAdapterOptions::use_dora) in the C++ layers: the op against its definition, the magnitude's start, the
// forward and its gradients against plain ATen in float64, merge/unmerge, clone and archives, refusals (a 4-bit base,
// mixed batches), and adapter files with lora_magnitude_vector on the reference Llama.
#include <ATen/ATen.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <lorafuse/ops/dora.h>
#include <lorafuse/peft/adapters.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/serialize.h>

#include <fstream>
#include <sstream>

#include "catch.h"
#include "nn/nn_test_util.h"
#include "peft/tiny_llama.h"

using lorafuse::nn::LoraAdapterOptions;
using lorafuse::nn::LoraLinear;
using lorafuse::nn::LoraLinearOptions;
using lorafuse_test::require_error_parts;

namespace {

at::Tensor d(const at::Tensor& t) { return t.detach().to(at::kDouble); }

// y = m / ‖W + s·B·A‖ ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b in float64 from the layer's own tensors.
at::Tensor reference(LoraLinear& layer, const at::Tensor& x, const std::string& name) {
  const double s = layer->adapter_options(name).scale();
  const auto w = d(layer->base_layer->weight);
  const auto adapted = w + s * at::matmul(d(layer->lora_b(name)), d(layer->lora_a(name)));
  const auto g = d(layer->lora_magnitude(name)) / at::linalg_vector_norm(adapted, 2, {1});
  auto y = at::matmul(d(x), adapted.t()) * g;
  if (layer->base_layer->bias.defined()) y = y + d(layer->base_layer->bias);
  return y;
}

LoraLinear dora_layer(uint64_t seed, bool bias = true) {
  at::manual_seed(seed);
  LoraLinear layer(LoraLinearOptions(20, 14).bias(bias).adapter(
      LoraAdapterOptions(4).lora_alpha(8).init_lora_weights(false).use_dora(true)));
  torch::NoGradGuard no_grad;
  layer->lora_magnitude("default").mul_(1 + 0.2 * at::randn({14}));  // m away from the norm it starts at
  return layer;
}

}  // namespace

TEST_CASE("dora_weight_norm is the row norm of W + scale·B·A", "[cpu][dora]") {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    const auto w = at::randn({37, 29}).to(dtype);
    const auto adtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    const auto a = at::randn({3, 29}, adtype), b = at::randn({37, 3}, adtype);
    const auto expected = at::linalg_vector_norm(d(w) + 0.5 * at::matmul(d(b), d(a)), 2, {1});
    const auto got = lorafuse::dora_weight_norm(w, a, b, 0.5);
    CHECK(got.scalar_type() == adtype);
    CHECK(at::allclose(d(got), expected, 1e-6, 0));
  }
  require_error_parts<c10::ValueError>(
      [] {
        lorafuse::dora_weight_norm(at::ones({4, 3}), at::ones({2, 5}), at::ones({4, 2}), 1.0);
      },
      {"lorafuse.dora_weight_norm", "lora_a", "[4, 3]"});
}

TEST_CASE("a DoRA LoraLinear starts at ‖W‖, computes PEFT's formula and trains the magnitude", "[cpu][dora]") {
  at::manual_seed(0);
  torch::nn::Linear base(torch::nn::LinearOptions(20, 14));
  const auto norms = at::linalg_vector_norm(base->weight.detach(), 2, {1});
  LoraLinear fresh(base, LoraAdapterOptions(4).use_dora(true));  // B starts at zero: m = ‖W‖
  CHECK(at::allclose(fresh->lora_magnitude("default"), norms, 1e-6, 1e-7));
  std::vector<std::string> names;
  for (const auto& p : fresh->named_parameters()) {
    if (p.value().requires_grad()) names.push_back(p.key());
  }
  CHECK(names == std::vector<std::string>{"lora_A.default.weight", "lora_B.default.weight",
                                          "lora_magnitude_vector.default.weight"});

  auto layer = dora_layer(1);
  const auto x = at::randn({2, 5, 20}).requires_grad_();
  const auto y = layer->forward(x);
  CHECK(at::allclose(d(y), reference(layer, x, "default"), 1e-5, 1e-6));
  // gradients: the same formula through ATen autograd in float64, the norm a constant
  y.pow(2).sum().backward();
  const double s = layer->adapter_options("default").scale();
  const auto xa = d(x).requires_grad_(), a = d(layer->lora_a("default")).requires_grad_();
  const auto b = d(layer->lora_b("default")).requires_grad_(), m = d(layer->lora_magnitude("default")).requires_grad_();
  const auto w = d(layer->base_layer->weight);
  const auto norm = at::linalg_vector_norm(w + s * at::matmul(b, a), 2, {1}).detach();
  const auto y64 =
      (at::matmul(xa, w.t()) + s * at::matmul(at::matmul(xa, a.t()), b.t())) * (m / norm) + d(layer->base_layer->bias);
  y64.pow(2).sum().backward();
  CHECK(at::allclose(d(x.grad()), xa.grad(), 1e-4, 1e-6));
  CHECK(at::allclose(d(layer->lora_a("default").grad()), a.grad(), 1e-4, 1e-6));
  CHECK(at::allclose(d(layer->lora_b("default").grad()), b.grad(), 1e-4, 1e-6));
  CHECK(at::allclose(d(layer->lora_magnitude("default").grad()), m.grad(), 1e-4, 1e-6));
  CHECK(m.grad().abs().max().item<double>() > 0);
  require_error_parts<c10::ValueError>(
      [&] {
        LoraLinear plain(LoraLinearOptions(4, 3));
        plain->lora_magnitude("default");
      },
      {"lora_magnitude", "not a DoRA adapter"});
}

TEST_CASE("DoRA merges as PEFT does, unmerges exactly and survives clone and archives", "[cpu][dora]") {
  auto layer = dora_layer(2);
  layer->eval();
  const auto x = at::randn({6, 20});
  torch::NoGradGuard no_grad;
  const auto before = layer->forward(x);
  const auto weight = layer->base_layer->weight.clone();
  layer->merge();
  CHECK(at::allclose(layer->forward(x), before, 1e-5, 1e-5));
  // the merged weight: m / ‖W + s·B·A‖ ⊙ (W + s·B·A)
  const double s = layer->adapter_options("default").scale();
  const auto adapted = d(weight) + s * at::matmul(d(layer->lora_b("default")), d(layer->lora_a("default")));
  const auto expected =
      adapted * (d(layer->lora_magnitude("default")) / at::linalg_vector_norm(adapted, 2, {1})).unsqueeze(1);
  CHECK(at::allclose(d(layer->base_layer->weight), expected, 1e-5, 1e-6));
  layer->unmerge();
  CHECK(at::equal(layer->base_layer->weight, weight));

  auto copy = std::dynamic_pointer_cast<lorafuse::nn::LoraLinearImpl>(layer->clone());
  CHECK(at::equal(copy->lora_magnitude("default"), layer->lora_magnitude("default")));
  CHECK(copy->lora_magnitude("default").data_ptr() != layer->lora_magnitude("default").data_ptr());
  CHECK(at::allclose(copy->forward(x), before, 1e-6, 1e-6));

  std::stringstream archive;
  torch::save(layer, archive);
  LoraLinear loaded(LoraLinearOptions(20, 14).adapter(LoraAdapterOptions(4).lora_alpha(8).use_dora(true)));
  torch::load(loaded, archive);
  loaded->eval();
  CHECK(at::equal(loaded->lora_magnitude("default"), layer->lora_magnitude("default")));
  CHECK(at::allclose(loaded->forward(x), before, 1e-6, 1e-6));
}

TEST_CASE("DoRA is refused over a 4-bit base and in batches with one adapter per row", "[cpu][dora]") {
  at::manual_seed(3);
  torch::nn::Linear dense(torch::nn::LinearOptions(64, 8));
  lorafuse::nn::Linear4bit quantized(lorafuse::nn::Linear4bitImpl::from_linear(dense));
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::nn::LoraLinear4bit(quantized, LoraAdapterOptions(4).use_dora(true)); },
      {"use_dora", "full-precision weight", "quantized"});

  auto layer = dora_layer(4);
  layer->add_adapter("plain", LoraAdapterOptions(2), /*activate=*/false);
  const auto x = at::randn({2, 3, 20});
  lorafuse::nn::AdapterScope rows(std::vector<std::string>{"default", "plain"});
  require_error_parts<c10::ValueError>([&] { layer->forward(x); }, {"\"default\" is a DoRA adapter", "use_adapter"});
}

TEST_CASE("a DoRA adapter saved by save_adapter loads with its magnitudes", "[cpu][dora][adapters]") {
  lorafuse_test::TempDir root;
  const auto make = [] { return lorafuse_test::tiny_llama(); };
  auto trained = make();
  at::manual_seed(5);
  lorafuse::inject_lora(
      *trained, lorafuse::LoraConfig().r(4).target_modules("all-linear").use_dora(true).init_lora_weights(false));
  for (auto& [path, layer] : lorafuse::lora_layers(*trained)) {
    torch::NoGradGuard no_grad;
    layer->lora_magnitude("default").mul_(1.5);
  }
  lorafuse::save_adapter(*trained, root.path + "/a");
  std::ifstream in(root.path + "/a/adapter_config.json");
  std::stringstream config;
  config << in.rdbuf();
  CHECK(config.str().find("\"use_dora\": true") != std::string::npos);

  auto fresh = make();
  lorafuse::load_adapter(*fresh, root.path + "/a");
  const auto ids = at::arange(12, at::kLong).reshape({2, 6});
  torch::NoGradGuard no_grad;
  CHECK(at::allclose(fresh->forward(ids), trained->forward(ids), 1e-6, 1e-6));
  for (auto& [path, layer] : lorafuse::lora_layers(*fresh)) {
    CHECK(layer->adapter_options("default").use_dora());
    CHECK_FALSE(layer->lora_magnitude("default").requires_grad());  // loaded for inference (is_trainable false)
  }
}
