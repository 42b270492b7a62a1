// The multi-adapter ops from LibTorch (<lorafuse/ops/lora_multi.h>): segments, each row equal to lora_add with its
// adapter, heterogeneous ranks, and autograd through the dispatcher giving each adapter its own rows' gradients.
#include <ATen/ATen.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_multi.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse_test::require_error_parts;

TEST_CASE("lora_multi_add: each row through its own adapter", "[ops][lora_multi]") {
  at::manual_seed(3);
  const int64_t in = 16, out = 12;
  const std::vector<int64_t> ranks = {3, 6};
  const std::vector<double> scale = {0.5, 1.5};
  std::vector<at::Tensor> a, b;
  for (const int64_t r : ranks) {
    a.push_back(at::randn({r, in}, at::kDouble).requires_grad_());
    b.push_back(at::randn({out, r}, at::kDouble).requires_grad_());
  }
  const at::Tensor rows = at::tensor({1, -1, 0, 1, 0}, at::kLong);
  const auto segments = lorafuse::lora_segments(rows, 2);
  CHECK(segments.order.equal(at::tensor({2, 4, 0, 3, 1}, at::kLong)));  // the base's row last
  CHECK(segments.offsets.equal(at::tensor({0, 2, 4}, at::kLong)));

  const at::Tensor x = at::randn({5, in}, at::kDouble).requires_grad_();
  const at::Tensor base = at::randn({5, out}, at::kDouble);
  const at::Tensor y = lorafuse::lora_multi_add(base, x, a, b, scale, segments);
  for (int64_t t = 0; t < 5; ++t) {
    const int64_t i = rows[t].item<int64_t>();
    const at::Tensor want =
        i < 0 ? base[t] : lorafuse::lora_add(base.narrow(0, t, 1), x.narrow(0, t, 1), a[i], b[i], scale[i]).squeeze(0);
    CHECK(at::allclose(y[t], want, 1e-12, 1e-12));
  }
  // gradients: adapter 0 from rows 2 and 4 only
  const at::Tensor dy = at::randn({5, out}, at::kDouble);
  const auto grads = torch::autograd::grad({y}, {a[0], b[1], x}, {dy});
  const at::Tensor r0 = at::tensor({2, 4}, at::kLong);
  const at::Tensor alone = lorafuse::lora_add(base.index_select(0, r0), x.index_select(0, r0), a[0], b[0], scale[0]);
  const auto want = torch::autograd::grad({alone}, {a[0]}, {dy.index_select(0, r0)});
  CHECK(at::allclose(grads[0], want[0], 1e-12, 1e-12));
  CHECK(grads[2][1].abs().max().item<double>() == 0.0);  // a base row: no LoRA term in dX

  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lora_segments(at::tensor({0, 2}, at::kLong), 2);
      },
      {"lorafuse.lora_segments: row_adapter: expected indices in [-1, 2)"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lora_multi_add(base, x, {a[0]}, {b[0], b[1]}, scale, segments);
      },
      {"lora_a, lora_b and scale: expected one entry per adapter, found 1, 2 and 2"});
}

TEST_CASE("a C++ LoraLinear routes each row of a mixed batch to its adapter", "[ops][lora_multi]") {
  at::manual_seed(4);
  lorafuse::nn::LoraLinear layer(lorafuse::nn::LoraLinearOptions(8, 6));
  layer->add_adapter("one", lorafuse::nn::LoraAdapterOptions().r(2).init_lora_weights(false));
  layer->add_adapter("two", lorafuse::nn::LoraAdapterOptions().r(5).lora_alpha(3).init_lora_weights(false));
  const at::Tensor x = at::randn({3, 4, 8});  // 3 rows of 4 tokens
  const std::vector<std::string> names = {"two", "__base__", "one"};
  at::Tensor y;
  {
    const lorafuse::nn::AdapterScope scope(names);
    y = layer->forward(x);
  }
  for (int64_t i = 0; i < 3; ++i) {
    const lorafuse::nn::AdapterScope scope(i == 1 ? "" : names[i]);
    CHECK(at::allclose(y[i], layer->forward(x.narrow(0, i, 1))[0], 1e-6, 1e-6));
  }
  // the name a mixed batch's scope reports cannot be opened as an adapter name
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::nn::AdapterScope scope(lorafuse::nn::AdapterScope::kMixedBatch); }, {"adapter"});
}
