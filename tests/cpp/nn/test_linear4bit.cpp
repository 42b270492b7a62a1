// lorafuse::nn::Linear4bit (<lorafuse/nn/linear4bit.h>): a frozen NF4 base layer in LibTorch.
#include <ATen/ATen.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/ops/nf4.h>
#include <lorafuse/peft/inject.h>
#include <torch/serialize.h>

#include <unistd.h>
#include <filesystem>
#include <sstream>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::nn::Linear4bit;
using lorafuse::nn::Linear4bitImpl;
using lorafuse::nn::Linear4bitOptions;
using lorafuse_test::require_error_parts;

TEST_CASE("Linear4bit: from_linear holds quantize_nf4's bytes and computes x·dequant(W)ᵀ + b", "[cpu][nn][nf4]") {
  at::manual_seed(11);
  torch::nn::Linear linear(torch::nn::LinearOptions(200, 70));
  Linear4bit layer(Linear4bitImpl::from_linear(linear));
  const auto q = lorafuse::quantize_nf4(linear->weight.detach(), 64, true);
  CHECK(at::equal(layer->packed, q.packed));
  CHECK(at::equal(layer->absmax, q.absmax));
  CHECK(at::equal(layer->nested_absmax, q.nested_absmax));
  const auto w = layer->dequantized_weight(at::kFloat);
  CHECK(
      at::equal(w, lorafuse::dequantize_nf4(q.packed, q.absmax, q.nested_absmax, q.offset, 64, {70, 200}, at::kFloat)));
  const auto x = at::randn({3, 5, 200});
  const auto y = layer->forward(x);
  REQUIRE(y.sizes() == at::IntArrayRef({3, 5, 70}));
  CHECK(at::allclose(y, at::matmul(x, w.t()) + linear->bias.detach(), 1e-5, 1e-5));
  // the weight is buffers only: nothing to train but the bias; counted as out × in parameters
  CHECK(layer->named_parameters().size() == 1);
  const auto count = lorafuse::trainable_parameters(*layer);
  CHECK(count.total == 200 * 70 + 70);
  CHECK(layer->named_buffers().size() == 4);
  std::ostringstream text;
  layer->pretty_print(text);
  CHECK(text.str() ==
        "lorafuse::nn::Linear4bit(in_features=200, out_features=70, bias=true, nf4, blocksize=64, double_quant=true, "
        "compute_dtype=Float)");
}

TEST_CASE("Linear4bit: a new layer is a zero weight, bfloat16 compute, archives and clones keep the bytes",
          "[cpu][nn][nf4]") {
  Linear4bit fresh(Linear4bitOptions(64, 32).bias(false).compute_dtype(at::kBFloat16).double_quant(false));
  CHECK(at::equal(fresh->dequantized_weight(at::kFloat), at::zeros({32, 64})));
  const auto x = at::randn({4, 64});
  CHECK(fresh->forward(x).scalar_type() == at::kFloat);  // back in x's dtype
  CHECK(at::equal(fresh->forward(x), at::zeros({4, 32})));

  at::manual_seed(12);
  torch::nn::Linear linear(torch::nn::LinearOptions(64, 32));
  Linear4bit layer(Linear4bitImpl::from_linear(linear, at::kBFloat16));
  const auto y = layer->forward(x);
  const auto ref =
      at::matmul(x.to(at::kBFloat16), layer->dequantized_weight().t()) + linear->bias.detach().to(at::kBFloat16);
  CHECK(at::allclose(y, ref.to(at::kFloat), 2e-2, 2e-2));

  const auto path = (std::filesystem::temp_directory_path() / ("lorafuse_l4_" + std::to_string(::getpid()))).string();
  torch::save(layer, path);
  Linear4bit loaded(Linear4bitOptions(64, 32).compute_dtype(at::kBFloat16));
  torch::load(loaded, path);
  std::filesystem::remove(path);
  CHECK(at::equal(loaded->packed, layer->packed));
  CHECK(at::equal(loaded->absmax, layer->absmax));
  CHECK(at::equal(loaded->nested_absmax, layer->nested_absmax));
  CHECK(at::equal(loaded->offset, layer->offset));
  CHECK(loaded->bias.scalar_type() == layer->bias.scalar_type());
  CHECK(at::equal(loaded->bias, layer->bias));
  CHECK(at::equal(loaded->forward(x), y));
  const auto copy = std::dynamic_pointer_cast<Linear4bitImpl>(layer->clone());
  CHECK(copy->packed.data_ptr() != layer->packed.data_ptr());
  CHECK(at::equal(copy->forward(x), y));
}

TEST_CASE("Linear4bit: bad options name the argument", "[cpu][nn][nf4]") {
  require_error_parts<c10::TypeError>([] { Linear4bit(Linear4bitOptions(64, 64).compute_dtype(at::kDouble)); },
                                      {"compute_dtype", "Double"});
  require_error_parts<c10::ValueError>([] { Linear4bit(Linear4bitOptions(64, 64).blocksize(100)); },
                                       {"blocksize", "100"});
  require_error_parts<c10::ValueError>([] { Linear4bit(Linear4bitOptions(0, 64)); }, {"in_features", "0"});
}
