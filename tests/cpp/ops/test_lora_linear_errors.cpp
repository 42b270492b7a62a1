// Bad input to lora_linear through the C++ API: one case per failure. Each throws c10::ValueError (shapes,
// devices, values) or c10::TypeError (dtypes), whose message names the argument, what was found and what
// was expected.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <lorafuse/ops.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <optional>
#include <string>
#include <vector>

#include "catch.h"
#include "ops/lora_test_util.h"

using lorafuse_test::contains;

namespace {

// Valid arguments: x [3, 5], weight [4, 5], bias [4], lora_a [2, 5], lora_b [4, 2]; a case overrides one.
struct Args {
  at::Tensor x = at::randn({3, 5});
  at::Tensor weight = at::randn({4, 5});
  std::optional<at::Tensor> bias = at::randn({4});
  at::Tensor lora_a = at::randn({2, 5});
  at::Tensor lora_b = at::randn({4, 2});
  double scale = 0.5;
  double dropout_p = 0.0;
};

// Calls lora_linear and lora_linear_forward with `args`; both must throw E with every part in the message.
template <class E>
void require_error(const Args& args, const std::vector<std::string>& parts) {
  auto check = [&](const std::string& msg) {
    INFO("message: " << msg);
    for (const auto& part : parts) {
      INFO("expected part: " << part);
      CHECK(contains(msg, part));
    }
  };
  REQUIRE_THROWS_AS(lorafuse::lora_linear(args.x, args.weight, args.bias, args.lora_a, args.lora_b, args.scale,
                                          args.dropout_p),
                    E);
  check(lorafuse_test::message_of<E>([&] {
    lorafuse::lora_linear(args.x, args.weight, args.bias, args.lora_a, args.lora_b, args.scale, args.dropout_p);
  }));
  check(lorafuse_test::message_of<E>([&] {
    lorafuse::lora_linear_forward(args.x, args.weight, args.bias, args.lora_a, args.lora_b, args.scale,
                                  args.dropout_p);
  }));
}

}  // namespace

TEST_CASE("the valid arguments used by the error cases are accepted", "[cpu][errors]") {
  const Args args;
  const at::Tensor y = lorafuse::lora_linear(args.x, args.weight, args.bias, args.lora_a, args.lora_b, args.scale,
                                             args.dropout_p);
  CHECK(y.sizes() == at::IntArrayRef({3, 4}));
}

TEST_CASE("in mismatch: weight", "[cpu][errors]") {
  Args a;
  a.weight = at::randn({4, 6});
  require_error<c10::ValueError>(a, {"weight", "in = x.size(-1) = 5", "found weight of shape [4, 6]"});
}

TEST_CASE("in mismatch: lora_a", "[cpu][errors]") {
  Args a;
  a.lora_a = at::randn({2, 6});
  require_error<c10::ValueError>(a, {"lora_a", "in = x.size(-1) = 5", "found lora_a of shape [2, 6]"});
}

TEST_CASE("out mismatch: lora_b", "[cpu][errors]") {
  Args a;
  a.lora_b = at::randn({3, 2});
  require_error<c10::ValueError>(a, {"lora_b", "[out, r] = [4, 2]", "found lora_b of shape [3, 2]"});
}

TEST_CASE("out mismatch: bias", "[cpu][errors]") {
  Args a;
  a.bias = at::randn({5});
  require_error<c10::ValueError>(a, {"bias", "[out] = [4]", "found bias of shape [5]"});
}

TEST_CASE("r mismatch: lora_b", "[cpu][errors]") {
  Args a;
  a.lora_b = at::randn({4, 3});
  require_error<c10::ValueError>(a, {"lora_b", "[out, r] = [4, 2]", "found lora_b of shape [4, 3]"});
}

TEST_CASE("rank 0 adapter: lora_a with no rows", "[cpu][errors]") {
  Args a;
  a.lora_a = at::randn({0, 5});
  a.lora_b = at::randn({4, 0});
  require_error<c10::ValueError>(a, {"lora_a", "r >= 1", "[0, 5]"});
}

TEST_CASE("wrong rank: 0-d x", "[cpu][errors]") {
  Args a;
  a.x = at::scalar_tensor(1.0);
  require_error<c10::ValueError>(a, {"x must have shape [..., in]", "at least 1 dimension", "found a 0-d tensor"});
}

TEST_CASE("wrong rank: 1-D weight", "[cpu][errors]") {
  Args a;
  a.weight = at::randn({5});
  require_error<c10::ValueError>(a, {"weight must be 2-D [out, in]", "found shape [5]"});
}

TEST_CASE("wrong rank: 3-D weight", "[cpu][errors]") {
  Args a;
  a.weight = at::randn({1, 4, 5});
  require_error<c10::ValueError>(a, {"weight must be 2-D [out, in]", "found shape [1, 4, 5]"});
}

TEST_CASE("wrong rank: 1-D lora_a", "[cpu][errors]") {
  Args a;
  a.lora_a = at::randn({5});
  require_error<c10::ValueError>(a, {"lora_a must be 2-D [r, in]", "found shape [5]"});
}

TEST_CASE("wrong rank: 3-D lora_b", "[cpu][errors]") {
  Args a;
  a.lora_b = at::randn({1, 4, 2});
  require_error<c10::ValueError>(a, {"lora_b must be 2-D [out, r]", "found shape [1, 4, 2]"});
}

TEST_CASE("wrong rank: 2-D bias", "[cpu][errors]") {
  Args a;
  a.bias = at::randn({1, 4});
  require_error<c10::ValueError>(a, {"bias must be 1-D [out]", "found shape [1, 4]"});
}

TEST_CASE("dtype mismatch: weight vs x", "[cpu][errors]") {
  Args a;
  a.x = a.x.to(at::kHalf);
  a.bias = std::nullopt;
  require_error<c10::TypeError>(a, {"weight", "x's dtype Half", "found weight of dtype Float"});
}

TEST_CASE("dtype mismatch: bias vs x", "[cpu][errors]") {
  Args a;
  a.bias = a.bias->to(at::kDouble);
  require_error<c10::TypeError>(a, {"bias", "x's dtype Float", "found bias of dtype Double"});
}

TEST_CASE("dtype mismatch: float64 lora_a with bfloat16 x", "[cpu][errors]") {
  Args a;
  a.x = a.x.to(at::kBFloat16);
  a.weight = a.weight.to(at::kBFloat16);
  a.bias = a.bias->to(at::kBFloat16);
  a.lora_a = a.lora_a.to(at::kDouble);
  a.lora_b = a.lora_b.to(at::kDouble);
  require_error<c10::TypeError>(a, {"lora_a", "x's dtype BFloat16 or float32", "found lora_a of dtype Double"});
}

TEST_CASE("dtype mismatch: lora_b vs lora_a", "[cpu][errors]") {
  Args a;
  a.lora_b = a.lora_b.to(at::kDouble);
  require_error<c10::TypeError>(a, {"lora_b", "lora_a's dtype Float", "found lora_b of dtype Double"});
}

TEST_CASE("dtype: integer x", "[cpu][errors]") {
  Args a;
  a.x = at::ones({3, 5}, at::kInt);
  require_error<c10::TypeError>(a, {"x must be float32, float16, bfloat16 or float64", "found x of dtype Int"});
}

TEST_CASE("device mismatch: weight on meta, x on cpu", "[cpu][errors]") {
  Args a;
  a.weight = at::empty({4, 5}, at::TensorOptions().device(at::kMeta));
  require_error<c10::ValueError>(a, {"weight", "x's device cpu", "found weight on meta"});
}

TEST_CASE("device mismatch: x on meta, the rest on cpu", "[cpu][errors]") {
  Args a;
  a.x = at::empty({3, 5}, at::TensorOptions().device(at::kMeta));
  require_error<c10::ValueError>(a, {"weight", "x's device meta", "found weight on cpu"});
}

TEST_CASE("device mismatch: lora_a on meta", "[cpu][errors]") {
  Args a;
  a.lora_a = at::empty({2, 5}, at::TensorOptions().device(at::kMeta));
  require_error<c10::ValueError>(a, {"lora_a", "x's device cpu", "found lora_a on meta"});
}

TEST_CASE("dropout_p outside 0 <= p < 1", "[cpu][errors]") {
  for (double p : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    INFO("dropout_p = " << p);
    Args a;
    a.dropout_p = p;
    std::ostringstream found;
    found << "found " << p;
    require_error<c10::ValueError>(a, {"dropout_p", "[0, 1)", found.str()});
  }
}

TEST_CASE("scale not finite", "[cpu][errors]") {
  for (double s : {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::quiet_NaN()}) {
    INFO("scale = " << s);
    Args a;
    a.scale = s;
    std::ostringstream found;
    found << "found " << s;
    require_error<c10::ValueError>(a, {"scale", "finite", found.str()});
  }
}

TEST_CASE("weight requiring grad", "[cpu][errors]") {
  Args a;
  a.weight = a.weight.set_requires_grad(true);
  REQUIRE_THROWS_AS(lorafuse::lora_linear(a.x, a.weight, a.bias, a.lora_a, a.lora_b, a.scale, a.dropout_p),
                    c10::ValueError);
  const std::string msg = lorafuse_test::message_of<c10::ValueError>(
      [&] { lorafuse::lora_linear(a.x, a.weight, a.bias, a.lora_a, a.lora_b, a.scale, a.dropout_p); });
  INFO(msg);
  CHECK(contains(msg, "weight"));
  CHECK(contains(msg, "requires_grad=True"));
  CHECK(contains(msg, "requires_grad_(False)"));
}

TEST_CASE("errors derive from c10::Error", "[cpu][errors]") {
  Args a;
  a.lora_b = at::randn({4, 3});
  REQUIRE_THROWS_AS(lorafuse::lora_linear(a.x, a.weight, a.bias, a.lora_a, a.lora_b, a.scale, a.dropout_p),
                    c10::Error);
  a = Args{};
  a.bias = a.bias->to(at::kDouble);
  REQUIRE_THROWS_AS(lorafuse::lora_linear(a.x, a.weight, a.bias, a.lora_a, a.lora_b, a.scale, a.dropout_p),
                    c10::Error);
}

TEST_CASE("lora_linear_backward: bad grad_out, u and rng_state", "[cpu][errors]") {
  const Args a;
  const auto [y, u, rng_state] = lorafuse::lora_linear_forward(a.x, a.weight, a.bias, a.lora_a, a.lora_b, 0.5, 0.1);
  auto bwd = [&](const at::Tensor& go, const at::Tensor& uu, const at::Tensor& rs) {
    lorafuse::lora_linear_backward(go, a.x, a.weight, a.lora_a, a.lora_b, uu, rs, 0.5, 0.1, {true, true, true, true});
  };
  auto require = [](std::string msg, std::vector<std::string> parts) {
    INFO("message: " << msg);
    for (const auto& part : parts) CHECK(contains(msg, part));
  };
  SECTION("grad_out shape") {
    require(lorafuse_test::message_of<c10::ValueError>([&] { bwd(at::randn({3, 5}), u, rng_state); }),
            {"grad_out", "[3, 4]", "found grad_out of shape [3, 5]"});
  }
  SECTION("grad_out dtype") {
    require(lorafuse_test::message_of<c10::TypeError>([&] { bwd(at::randn({3, 4}, at::kDouble), u, rng_state); }),
            {"grad_out", "x's dtype Float", "found Double"});
  }
  SECTION("u shape") {
    require(lorafuse_test::message_of<c10::ValueError>([&] { bwd(at::randn({3, 4}), at::randn({3, 3}), rng_state); }),
            {"u must have shape [T, r] = [3, 2]", "found u of shape [3, 3]"});
  }
  SECTION("rng_state shape") {
    require(lorafuse_test::message_of<c10::ValueError>(
                [&] { bwd(at::randn({3, 4}), u, at::zeros({3}, at::kLong)); }),
            {"rng_state", "int64 tensor of shape [2]", "found Long of shape [3]"});
  }
  SECTION("rng_state device") {
    require(lorafuse_test::message_of<c10::ValueError>(
                [&] { bwd(at::randn({3, 4}), u, at::zeros({2}, at::dtype(at::kLong).device(at::kMeta))); }),
            {"rng_state", "x's device cpu", "found rng_state on meta"});
  }
}
