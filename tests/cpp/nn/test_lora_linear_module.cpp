// lorafuse::nn::LoraLinear: construction, PEFT initialisation, forward against plain ATen, adapters,
// merge/unmerge exactness, clone, pretty_print, torch::save/load, bad input.
#include <lorafuse/nn/lora_linear.h>
#include <torch/nn/functional/linear.h>
#include <torch/serialize.h>

#include <unistd.h>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::nn::LoraAdapterOptions;
using lorafuse::nn::LoraLinear;
using lorafuse::nn::LoraLinearOptions;
using lorafuse_test::require_error_parts;

namespace {

// y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ in float64, from the layer's own tensors.
at::Tensor reference(LoraLinear& layer, const at::Tensor& x, const std::string& adapter) {
  const auto d = [](const at::Tensor& t) { return t.detach().to(at::kCPU, at::kDouble); };
  auto y = at::matmul(d(x), d(layer->base_layer->weight).t());
  if (layer->base_layer->bias.defined()) y = y + d(layer->base_layer->bias);
  const double scale = layer->adapter_options(adapter).scale();
  return y + scale * at::matmul(at::matmul(d(x), d(layer->lora_a(adapter)).t()), d(layer->lora_b(adapter)).t());
}

LoraLinear random_layer(int64_t in, int64_t out, int64_t r, uint64_t seed, bool bias = true) {
  at::manual_seed(seed);
  return LoraLinear(LoraLinearOptions(in, out).bias(bias).adapter(
      LoraAdapterOptions(r).lora_alpha(2.0 * r).init_lora_weights(false)));
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("lorafuse_test_" + name + "_" + std::to_string(::getpid())))
      .string();
}

}  // namespace

TEST_CASE("LoraLinear wraps its base Linear by reference and freezes it", "[cpu][nn]") {
  torch::nn::Linear base(torch::nn::LinearOptions(12, 5));
  const auto* weight_storage = base->weight.data_ptr();
  LoraLinear layer(base, LoraAdapterOptions(4).lora_alpha(8));
  CHECK(layer->base_layer.get() == base.get());
  CHECK(layer->base_layer->weight.data_ptr() == weight_storage);
  CHECK_FALSE(base->weight.requires_grad());
  CHECK_FALSE(base->bias.requires_grad());
  CHECK(layer->lora_a("default").sizes() == at::IntArrayRef({4, 12}));
  CHECK(layer->lora_b("default").sizes() == at::IntArrayRef({5, 4}));
  CHECK(layer->lora_a("default").requires_grad());
  CHECK(layer->lora_b("default").requires_grad());
  CHECK(layer->adapter_options("default").scale() == 2.0);
  // PEFT's parameter names
  std::vector<std::string> names;
  for (const auto& p : layer->named_parameters()) names.push_back(p.key());
  CHECK(names == std::vector<std::string>{"base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                          "lora_B.default.weight"});
}

TEST_CASE("PEFT initialisation: kaiming-uniform A, zero B, so a fresh adapter changes nothing", "[cpu][nn]") {
  at::manual_seed(0);
  LoraLinear layer(LoraLinearOptions(256, 32).adapter(LoraAdapterOptions(16)));
  const auto a = layer->lora_a("default");
  // kaiming_uniform(a=√5) on fan_in=256: bound = sqrt(6 / ((1 + 5) · 256)) = 1/16
  CHECK(a.abs().max().item<double>() <= 1.0 / 16 + 1e-7);
  CHECK(a.abs().max().item<double>() > 0.9 / 16);
  CHECK(a.std().item<double>() == Approx(1.0 / 16 / std::sqrt(3.0)).epsilon(0.05));
  CHECK(layer->lora_b("default").abs().max().item<double>() == 0.0);
  const auto x = at::randn({3, 256});
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));

  LoraLinear gaussian(LoraLinearOptions(512, 8).adapter(LoraAdapterOptions(4).init_lora_weights("gaussian")));
  CHECK(gaussian->lora_a("default").std().item<double>() == Approx(0.25).epsilon(0.05));
  CHECK(gaussian->lora_b("default").abs().max().item<double>() == 0.0);

  LoraLinear random(LoraLinearOptions(64, 8).adapter(LoraAdapterOptions(4).init_lora_weights(false)));
  CHECK(random->lora_b("default").abs().max().item<double>() > 0.0);
}

TEST_CASE("use_rslora scales by lora_alpha / sqrt(r)", "[cpu][nn]") {
  LoraLinear plain(LoraLinearOptions(8, 8).adapter(LoraAdapterOptions(16).lora_alpha(32)));
  LoraLinear rs(LoraLinearOptions(8, 8).adapter(LoraAdapterOptions(16).lora_alpha(32).use_rslora(true)));
  CHECK(plain->adapter_options("default").scale() == 2.0);
  CHECK(rs->adapter_options("default").scale() == 8.0);
}

TEST_CASE("LoraLinear forward and backward match the float64 formula", "[cpu][cuda][nn]") {
  for (const auto& device : lorafuse_test::module_devices()) {
    INFO("device " << device);
    auto layer = random_layer(37, 19, 5, 1);
    layer->to(device);
    const auto x = at::randn({2, 3, 37}, at::TensorOptions(device)).requires_grad_(true);
    const auto y = layer->forward(x);
    CHECK(y.sizes() == at::IntArrayRef({2, 3, 19}));
    CHECK(at::allclose(y.to(at::kCPU, at::kDouble), reference(layer, x, "default"), 1e-5, 1e-5));
    y.sum().backward();
    CHECK(layer->lora_a("default").grad().defined());
    CHECK(layer->lora_b("default").grad().defined());
    CHECK_FALSE(layer->base_layer->weight.grad().defined());
    CHECK(x.grad().defined());
  }
}

TEST_CASE("dropout applies in train mode only", "[cpu][nn]") {
  at::manual_seed(2);
  LoraLinear layer(LoraLinearOptions(64, 16).adapter(LoraAdapterOptions(8).lora_dropout(0.5).init_lora_weights(false)));
  const auto x = at::randn({32, 64});
  layer->eval();
  const auto y_eval = layer->forward(x);
  CHECK(at::allclose(y_eval.to(at::kDouble), reference(layer, x, "default"), 1e-5, 1e-5));
  layer->train();
  const auto y_train = layer->forward(x);
  CHECK_FALSE(at::allclose(y_train, y_eval, 1e-3, 1e-3));
}

TEST_CASE("a bfloat16 base gets float32 adapters, as PEFT keeps them", "[cpu][nn]") {
  torch::nn::Linear base(torch::nn::LinearOptions(32, 16));
  base->to(at::kBFloat16);
  LoraLinear layer(base, LoraAdapterOptions(4).init_lora_weights(false));
  CHECK(layer->lora_a("default").scalar_type() == at::kFloat);
  const auto x = at::randn({5, 32}).to(at::kBFloat16);
  const auto y = layer->forward(x);
  CHECK(y.scalar_type() == at::kBFloat16);
  CHECK(at::allclose(y.to(at::kDouble), reference(layer, x, "default"), 3e-2, 3e-2));
  torch::nn::Linear base2(torch::nn::LinearOptions(8, 8));
  base2->to(at::kBFloat16);
  LoraLinear same_dtype(base2, LoraAdapterOptions(2).dtype(at::kBFloat16).init_lora_weights(false));
  CHECK(same_dtype->lora_a("default").scalar_type() == at::kBFloat16);
  const auto x2 = at::randn({3, 8}).to(at::kBFloat16);
  CHECK(at::allclose(same_dtype->forward(x2).to(at::kDouble), reference(same_dtype, x2, "default"), 5e-2, 5e-2));
  // the op takes adapters in x's dtype or float32 only: anything else is refused when the adapter is made
  require_error_parts<c10::TypeError>(
      [] { LoraLinear(torch::nn::Linear(torch::nn::LinearOptions(8, 8)), LoraAdapterOptions(2).dtype(at::kDouble)); },
      {"dtype", "Float", "Double"});
}

TEST_CASE("named adapters: add, set, disable, enable, delete", "[cpu][nn]") {
  auto layer = random_layer(24, 10, 4, 3);
  at::manual_seed(4);
  layer->add_adapter("other", LoraAdapterOptions(6).lora_alpha(3).init_lora_weights(false));
  CHECK(layer->adapter_names() == std::vector<std::string>{"default", "other"});
  CHECK(layer->active_adapter() == "default");  // a later adapter waits for set_adapter
  CHECK_FALSE(layer->lora_a("other").requires_grad());
  const auto x = at::randn({4, 24});
  const auto y_default = layer->forward(x);
  CHECK(at::allclose(y_default.to(at::kDouble), reference(layer, x, "default"), 1e-5, 1e-5));

  // switching moves no data: the same tensors before and after
  const auto* a_default = layer->lora_a("default").data_ptr();
  const auto* a_other = layer->lora_a("other").data_ptr();
  layer->set_adapter("other");
  CHECK(layer->lora_a("default").data_ptr() == a_default);
  CHECK(layer->lora_a("other").data_ptr() == a_other);
  CHECK(layer->lora_a("other").requires_grad());
  CHECK_FALSE(layer->lora_a("default").requires_grad());
  const auto y_other = layer->forward(x);
  CHECK(at::allclose(y_other.to(at::kDouble), reference(layer, x, "other"), 1e-5, 1e-5));
  CHECK_FALSE(at::allclose(y_other, y_default, 1e-3, 1e-3));

  layer->disable_adapters();
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));
  layer->enable_adapters();
  CHECK(at::equal(layer->forward(x), y_other));

  layer->delete_adapter("other");  // the active one: the first remaining takes over
  CHECK(layer->adapter_names() == std::vector<std::string>{"default"});
  CHECK(layer->active_adapter() == "default");
  CHECK(layer->named_parameters().find("lora_A.other.weight") == nullptr);
  CHECK(at::equal(layer->forward(x), y_default));
  layer->delete_adapter("default");
  CHECK(layer->active_adapter().empty());
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));
}

TEST_CASE("merge: zero added latency path, output unchanged, unmerge restores W exactly", "[cpu][cuda][nn]") {
  for (const auto& device : lorafuse_test::module_devices()) {
    INFO("device " << device);
    auto layer = random_layer(48, 20, 8, 5);
    layer->to(device);
    layer->eval();
    const auto w0 = layer->base_layer->weight.clone();
    const auto x = at::randn({6, 48}, at::TensorOptions(device));
    const auto y = layer->forward(x);
    layer->merge();
    CHECK(layer->merged());
    CHECK_FALSE(at::equal(layer->base_layer->weight, w0));
    // merged: the layer is exactly the base linear with the merged weight
    CHECK(at::equal(layer->forward(x),
                    torch::nn::functional::linear(x, layer->base_layer->weight, layer->base_layer->bias)));
    CHECK(at::allclose(layer->forward(x), y, 1e-5, 1e-5));
    CHECK(at::allclose(layer->base_layer->weight.to(at::kDouble),
                       w0.to(at::kDouble) + layer->delta_weight("default").to(at::kDouble), 1e-6, 1e-6));
    layer->unmerge();
    CHECK_FALSE(layer->merged());
    CHECK(at::equal(layer->base_layer->weight, w0));
    CHECK(layer->named_buffers()["weight_unmerged"].numel() == 0);
  }
}

TEST_CASE("1000 merge/unmerge cycles in bfloat16 restore the weight bit for bit", "[cpu][nn]") {
  torch::nn::Linear base(torch::nn::LinearOptions(64, 32));
  base->to(at::kBFloat16);
  at::manual_seed(6);
  LoraLinear layer(base, LoraAdapterOptions(8).lora_alpha(16).init_lora_weights(false));
  const auto w0 = base->weight.clone();
  const auto x = at::randn({4, 64}).to(at::kBFloat16);
  layer->eval();
  const auto y = layer->forward(x);
  at::Tensor merged_first;
  for (int i = 0; i < 1000; ++i) {
    layer->merge();
    if (i == 0) merged_first = base->weight.clone();
    REQUIRE(at::equal(base->weight, merged_first));  // every merge starts from the unmerged weight
    layer->unmerge();
    REQUIRE(at::equal(base->weight, w0));
  }
  CHECK_FALSE(at::equal(merged_first, w0));
  layer->merge();
  // bf16 output rounding: merged and unmerged agree to bf16 precision
  CHECK(at::allclose(layer->forward(x).to(at::kFloat), y.to(at::kFloat), 5e-2, 5e-2));
}

TEST_CASE("merging two adapters folds both in, rounding once", "[cpu][nn]") {
  auto layer = random_layer(16, 8, 2, 7);
  layer->add_adapter("b", LoraAdapterOptions(3).init_lora_weights(false));
  const auto w0 = layer->base_layer->weight.clone();
  layer->merge({"default"});
  layer->merge({"b"});
  CHECK(layer->merged_adapters() == std::vector<std::string>{"default", "b"});
  const auto expected = (w0.to(at::kFloat) + layer->delta_weight("default") + layer->delta_weight("b"));
  CHECK(at::allclose(layer->base_layer->weight, expected, 1e-6, 1e-6));
  // active "default" is merged, so forward is the base with the merged weight
  const auto x = at::randn({2, 16});
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));
  layer->unmerge();
  CHECK(at::equal(layer->base_layer->weight, w0));
}

TEST_CASE("an active adapter that is not merged still applies on top of a merged one", "[cpu][nn]") {
  auto layer = random_layer(16, 8, 2, 8);
  layer->add_adapter("b", LoraAdapterOptions(3).init_lora_weights(false));
  const auto w0 = layer->base_layer->weight.clone();
  const auto x = at::randn({2, 16});
  const auto before = reference(layer, x, "default").to(at::kFloat);  // unmerged W
  layer->merge({"b"});
  const auto expected = before + at::matmul(x, layer->delta_weight("b").t());
  CHECK(at::allclose(layer->forward(x), expected, 1e-5, 1e-5));
  CHECK_FALSE(at::equal(layer->base_layer->weight, w0));
}

TEST_CASE("switching adapters on a merged layer unmerges it first", "[cpu][nn]") {
  auto layer = random_layer(16, 8, 2, 13);
  layer->add_adapter("b", LoraAdapterOptions(3).init_lora_weights(false));
  const auto w0 = layer->base_layer->weight.clone();
  const auto x = at::randn({2, 16});
  layer->set_adapter("b");
  const auto y_b = layer->forward(x);
  layer->set_adapter("default");
  layer->merge();
  layer->set_adapter("default");  // the same adapter: stays merged
  CHECK(layer->merged());
  layer->set_adapter("b");
  CHECK_FALSE(layer->merged());
  CHECK(at::equal(layer->base_layer->weight, w0));
  CHECK(at::equal(layer->forward(x), y_b));  // b alone, not b on top of a merged default
  layer->merge();
  layer->clear_active_adapter();
  CHECK_FALSE(layer->merged());
  CHECK(at::equal(layer->forward(x), layer->base_layer->forward(x)));
  CHECK(at::equal(layer->base_layer->weight, w0));
}

TEST_CASE("merge_and_unload merges the active adapter even while adapters are disabled", "[cpu][nn]") {
  auto layer = random_layer(20, 12, 4, 14);
  const auto x = at::randn({3, 20});
  layer->eval();
  const auto y = layer->forward(x);
  layer->disable_adapters();
  torch::nn::Linear plain = layer->merge_and_unload();
  CHECK(at::allclose(plain->forward(x), y, 1e-5, 1e-5));
}

TEST_CASE("merge_and_unload hands back the plain Linear with the adapter inside", "[cpu][nn]") {
  auto layer = random_layer(20, 12, 4, 9);
  layer->eval();
  const auto x = at::randn({3, 20});
  const auto y = layer->forward(x);
  torch::nn::Linear plain = layer->merge_and_unload();
  CHECK(at::allclose(plain->forward(x), y, 1e-5, 1e-5));
  CHECK(layer->adapter_names().empty());
  CHECK(layer->named_buffers()["weight_unmerged"].numel() == 0);
}

TEST_CASE("disabling adapters unmerges first", "[cpu][nn]") {
  auto layer = random_layer(10, 6, 2, 10);
  const auto w0 = layer->base_layer->weight.clone();
  layer->merge();
  layer->disable_adapters();
  CHECK_FALSE(layer->merged());
  CHECK(at::equal(layer->base_layer->weight, w0));
}

TEST_CASE("clone() is independent of the original", "[cpu][nn]") {
  auto layer = random_layer(14, 9, 3, 11);
  layer->add_adapter("b", LoraAdapterOptions(2).init_lora_weights(false));
  layer->merge({"b"});
  auto copy = std::dynamic_pointer_cast<lorafuse::nn::LoraLinearImpl>(layer->clone());
  REQUIRE(copy != nullptr);
  CHECK(copy->adapter_names() == layer->adapter_names());
  CHECK(copy->merged_adapters() == layer->merged_adapters());
  CHECK_FALSE(copy->base_layer->weight.requires_grad());
  CHECK(copy->lora_a("default").requires_grad());
  CHECK_FALSE(copy->lora_a("b").requires_grad());
  const auto x = at::randn({2, 14});
  CHECK(at::equal(copy->forward(x), layer->forward(x)));
  for (const auto& p : layer->named_parameters()) {
    CHECK(copy->named_parameters()[p.key()].data_ptr() != p.value().data_ptr());
  }
  {
    torch::NoGradGuard g;
    copy->lora_b("default").add_(1.0);
  }
  CHECK_FALSE(at::equal(copy->forward(x), layer->forward(x)));
  copy->unmerge();  // the clone has its own unmerged copy
  CHECK(layer->merged());
  layer->unmerge();
  CHECK(at::equal(copy->base_layer->weight, layer->base_layer->weight));
}

TEST_CASE("pretty_print names the shape and the adapters", "[cpu][nn]") {
  LoraLinear layer(LoraLinearOptions(16, 4).adapter(LoraAdapterOptions(2).lora_alpha(4).lora_dropout(0.1)));
  layer->add_adapter("b", LoraAdapterOptions(8).use_rslora(true));
  std::ostringstream s;
  layer->pretty_print(s);
  CHECK(s.str() ==
        "lorafuse::nn::LoraLinear(in_features=16, out_features=4, bias=true, adapters=[default(r=2, lora_alpha=4, "
        "lora_dropout=0.1), b(r=8, lora_alpha=8, lora_dropout=0, use_rslora=true)], active=default)");
  std::ostringstream tree;
  tree << *layer;
  CHECK(lorafuse_test::contains(tree.str(), "(base_layer): torch::nn::Linear(in_features=16, out_features=4"));
}

TEST_CASE("torch::save / torch::load of a layer with adapters, into a fresh layer", "[cpu][nn]") {
  auto layer = random_layer(18, 7, 3, 12);
  layer->add_adapter("b",
                     LoraAdapterOptions(5).lora_alpha(10).lora_dropout(0.2).init_lora_weights(false).bias("lora_only"));
  layer->set_adapter("b");
  layer->merge({"default"});
  const auto path = temp_path("lora_linear.pt");
  torch::save(layer, path);

  at::manual_seed(99);
  LoraLinear loaded(LoraLinearOptions(18, 7).adapter(LoraAdapterOptions(3).lora_alpha(6)));
  torch::load(loaded, path);
  std::remove(path.c_str());
  CHECK(loaded->adapter_names() == std::vector<std::string>{"default", "b"});
  CHECK(loaded->active_adapter() == "b");
  CHECK(loaded->merged_adapters() == std::vector<std::string>{"default"});
  CHECK(loaded->adapter_options("b").r() == 5);
  CHECK(loaded->adapter_options("b").lora_dropout() == 0.2);
  CHECK(loaded->adapter_options("b").bias() == "lora_only");
  CHECK(loaded->lora_a("b").requires_grad());
  CHECK_FALSE(loaded->lora_a("default").requires_grad());
  const auto x = at::randn({4, 18});
  layer->eval();
  loaded->eval();
  CHECK(at::equal(loaded->forward(x), layer->forward(x)));
  loaded->unmerge();
  layer->unmerge();
  CHECK(at::equal(loaded->base_layer->weight, layer->base_layer->weight));

  // a layer with an adapter the archive lacks is not silently half-loaded
  torch::save(layer, path);
  LoraLinear extra(LoraLinearOptions(18, 7).adapter(LoraAdapterOptions(3)));
  extra->add_adapter("b", LoraAdapterOptions(5));
  extra->add_adapter("c", LoraAdapterOptions(1));
  require_error_parts<c10::ValueError>([&] { torch::load(extra, path); }, {"\"c\"", "default", "b"});

  // an archive of the older text format is refused with a message that says so, the layer unchanged
  {
    torch::serialize::OutputArchive old;
    old.write("lorafuse_state", c10::IValue(std::string("lorafuse_state 1\nactive\tdefault\n")));
    old.save_to(path);
  }
  LoraLinear fresh(LoraLinearOptions(18, 7).adapter(LoraAdapterOptions(3)));
  require_error_parts<c10::ValueError>([&] { torch::load(fresh, path); }, {"older lorafuse", "save_adapter"});
  CHECK(fresh->adapter_names() == std::vector<std::string>{"default"});
  std::remove(path.c_str());
}

TEST_CASE("bad input to LoraLinear names the argument", "[cpu][nn][errors]") {
  require_error_parts<c10::ValueError>([] { LoraLinear(LoraLinearOptions(4, 4).adapter(LoraAdapterOptions(0))); },
                                       {"r", "> 0", "0"});
  require_error_parts<c10::ValueError>(
      [] { LoraLinear(LoraLinearOptions(4, 4).adapter(LoraAdapterOptions().lora_alpha(-1))); }, {"lora_alpha", "-1"});
  require_error_parts<c10::ValueError>(
      [] { LoraLinear(LoraLinearOptions(4, 4).adapter(LoraAdapterOptions().lora_dropout(1.0))); },
      {"lora_dropout", "[0, 1)", "1"});
  require_error_parts<c10::ValueError>(
      [] { LoraLinear(LoraLinearOptions(4, 4).adapter(LoraAdapterOptions().lora_dropout(-0.1))); },
      {"lora_dropout", "-0.1"});
  require_error_parts<c10::ValueError>(
      [] { LoraLinear(LoraLinearOptions(4, 4).adapter(LoraAdapterOptions().init_lora_weights("eva"))); },
      {"init_lora_weights", "eva"});
  require_error_parts<c10::ValueError>([] { LoraLinear(LoraLinearOptions(4, 4).adapter_name("a.b")); },
                                       {"adapter_name", "a.b"});
  require_error_parts<c10::ValueError>([] { LoraLinear(torch::nn::Linear(nullptr), LoraAdapterOptions(2)); },
                                       {"base", "torch::nn::Linear"});

  LoraLinear layer(LoraLinearOptions(4, 4).adapter(LoraAdapterOptions(2)));
  require_error_parts<c10::ValueError>([&] { layer->add_adapter("default", LoraAdapterOptions(2)); },
                                       {"adapter_name", "\"default\"", "already exists"});
  require_error_parts<c10::ValueError>([&] { layer->set_adapter("nope"); }, {"set_adapter", "\"nope\"", "default"});
  require_error_parts<c10::ValueError>([&] { layer->delete_adapter("nope"); }, {"delete_adapter", "\"nope\""});
  require_error_parts<c10::ValueError>([&] { layer->merge({"nope"}); }, {"merge", "\"nope\""});
  require_error_parts<c10::ValueError>([&] { layer->unmerge(); }, {"unmerge", "nothing is merged"});
  layer->merge();
  const auto merged_weight = layer->base_layer->weight.clone();
  lorafuse_test::require_warning_parts([&] { layer->merge(); }, {"merge: [default] already merged", "nothing to do"});
  CHECK(at::equal(layer->base_layer->weight, merged_weight));
  CHECK(layer->merged_adapters() == std::vector<std::string>{"default"});
  require_error_parts<c10::ValueError>([&] { layer->delete_adapter("default"); }, {"delete_adapter", "unmerge"});
  layer->unmerge();
  layer->disable_adapters();
  require_error_parts<c10::ValueError>([&] { layer->merge(); }, {"merge", "disabled"});
}

TEST_CASE("a merge that overflows float16 leaves the weight unchanged", "[cpu][nn][errors]") {
  torch::nn::Linear base(torch::nn::LinearOptions(4, 4));
  base->to(at::kHalf);
  LoraLinear layer(base, LoraAdapterOptions(2).init_lora_weights(false));
  {
    torch::NoGradGuard g;
    layer->lora_a("default").fill_(1.0);  // every delta is r·1e5 = 2e5: finite in float32,
    layer->lora_b("default").fill_(1e5);  // beyond float16's 65504 once merged
  }
  const auto w0 = base->weight.clone();
  require_error_parts<c10::ValueError>([&] { layer->merge(); }, {"merge", "non-finite", "Half", "unchanged"});
  CHECK(at::equal(base->weight, w0));
  CHECK_FALSE(layer->merged());
}

TEST_CASE("a merge that would give non-finite weights leaves the weight unchanged", "[cpu][nn][errors]") {
  torch::nn::Linear base(torch::nn::LinearOptions(4, 4));
  base->to(at::kHalf);
  LoraLinear layer(base, LoraAdapterOptions(2).init_lora_weights(false));
  {
    torch::NoGradGuard g;
    layer->lora_b("default").fill_(std::numeric_limits<float>::infinity());
  }
  const auto w0 = base->weight.clone();
  require_error_parts<c10::ValueError>([&] { layer->merge(); }, {"merge", "non-finite", "unchanged"});
  CHECK(at::equal(base->weight, w0));
  CHECK_FALSE(layer->merged());
}

TEST_CASE("a thawed base weight: the base's own forward plus lora_add, with a weight gradient", "[cpu][nn]") {
  auto layer = random_layer(12, 6, 3, 7);
  const auto x = at::randn({5, 12});
  const auto frozen = layer->forward(x).detach();
  layer->base_layer->weight.set_requires_grad(true);
  const auto y = layer->forward(x);
  CHECK(at::allclose(y.to(at::kDouble), reference(layer, x, "default"), 1e-5, 1e-5));
  CHECK(at::allclose(y.detach(), frozen, 1e-6, 1e-6));
  const auto dy = at::randn_like(y);
  y.backward(dy);
  const auto& gw = layer->base_layer->weight.grad();
  REQUIRE(gw.defined());
  CHECK(at::allclose(gw, at::matmul(dy.t(), x), 1e-5, 1e-5));  // dW = dYᵀ·X
  CHECK(layer->lora_a("default").grad().defined());
  CHECK(layer->lora_b("default").grad().defined());
}
