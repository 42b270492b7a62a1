// The lora_linear CUDA kernels and launch plans, run by the CPU emulator and checked against ATen
// references in float64. This is the same kernel source that nvcc compiles; the GPU suite (tests/python,
// the [cuda] cases) checks the real thing where a GPU exists.
#include <ATen/ATen.h>

#include <limits>

#include "catch.h"
#include "cuda_emu/dtype_of.h"
#include "cuda_emu/reference.h"
// the emulator's macros (threadIdx, __shared__, ...) come after other headers and before the kernels'
#include "cuda_emu/emulator.h"

#include "cuda/lora_linear/lora_linear_launch.cuh"

namespace {

using lorafuse::cuda::BackwardPlan;
using lorafuse::cuda::DropoutParams;

using lorafuse_test::dropout;
using lorafuse_test::dtype_of;
using lorafuse_test::keep_scale;
using lorafuse_test::rel_err;
using lorafuse_test::tol_of;

struct Case {
  int64_t tokens, in, out, r;
  double p;
  bool strided_rows;
};

template <typename Tx, typename Ta>
void check_forward(const Case& c) {
  CAPTURE(c.tokens, c.in, c.out, c.r, c.p, c.strided_rows);
  const auto xt = dtype_of<Tx>(), at_ = dtype_of<Ta>();
  const int64_t ldx = c.strided_rows ? c.in + 5 : c.in;
  at::Tensor x_store = at::randn({c.tokens, ldx}).to(xt);
  at::Tensor x = x_store.narrow(1, 0, c.in);  // rows with stride ldx
  at::Tensor a = at::randn({c.r, c.in}).to(at_), b = at::randn({c.out, c.r}).to(at_);
  at::Tensor bias = at::randn({c.out}).to(xt);
  at::Tensor u = at::full({c.tokens, c.r}, std::nan(""), at::kFloat);
  at::Tensor y = at::full({c.tokens, c.out}, std::nan(""), at::kFloat).to(xt);
  at::Tensor rng = at::zeros({2}, at::kLong);
  const uint64_t seed = 0x1234567890abcdefULL, offset = 12;
  const float scale = 0.75f;

  lorafuse::cuda::ShrinkParams sp{};
  sp.x = x_store.data_ptr();
  sp.ldx = ldx;
  sp.a = a.data_ptr();
  sp.u = u.data_ptr<float>();
  sp.tokens = c.tokens;
  sp.in = c.in;
  sp.r = c.r;
  sp.drop = dropout(c.p, seed, offset);
  sp.drop.rng_out = c.p > 0 ? rng.data_ptr<int64_t>() : nullptr;
  lorafuse::cuda::run_shrink<Tx, Ta>(lorafuse_emu::Launcher{}, sp);

  lorafuse::cuda::ExpandParams ep{};
  ep.u = u.data_ptr<float>();
  ep.b = b.data_ptr();
  ep.bias = bias.data_ptr();
  ep.y = y.data_ptr();
  ep.tokens = c.tokens;
  ep.out = c.out;
  ep.r = c.r;
  ep.scale = scale;
  lorafuse::cuda::run_expand<Tx, Ta>(lorafuse_emu::Launcher{}, ep);

  const auto xd = x.to(at::kDouble) * keep_scale(c.tokens, c.in, c.p, seed, offset);
  const auto u_ref = at::mm(xd, a.to(at::kDouble).t());
  const auto y_ref = bias.to(at::kDouble) + scale * at::mm(u_ref, b.to(at::kDouble).t());
  if (c.tokens == 0) return;
  REQUIRE(rel_err(u, u_ref) < 2e-5);  // u is fp32 whatever the input dtype
  REQUIRE(rel_err(y, y_ref) < tol_of(xt));
  if (c.p > 0) {
    REQUIRE(static_cast<uint64_t>(rng[0].item<int64_t>()) == seed);
    REQUIRE(static_cast<uint64_t>(rng[1].item<int64_t>()) == offset);
  }
}

template <typename Tx, typename Ta>
void check_backward(const Case& c, bool need_x, bool need_a, bool need_b, bool need_bias) {
  CAPTURE(c.tokens, c.in, c.out, c.r, c.p, c.strided_rows, need_x, need_a, need_b, need_bias);
  const auto xt = dtype_of<Tx>(), at_ = dtype_of<Ta>();
  const int64_t ldx = c.strided_rows ? c.in + 3 : c.in;
  at::Tensor x_store = at::randn({c.tokens, ldx}).to(xt);
  at::Tensor x = x_store.narrow(1, 0, c.in);
  at::Tensor a = at::randn({c.r, c.in}).to(at_), b = at::randn({c.out, c.r}).to(at_);
  at::Tensor dy = at::randn({c.tokens, c.out}).to(xt);
  at::Tensor u = at::randn({c.tokens, c.r});
  at::Tensor rng = at::tensor({int64_t{77}, int64_t{8}}, at::kLong);
  const float scale = 1.25f;
  const bool need_v = need_x || need_a;
  const BackwardPlan plan = lorafuse::cuda::plan_backward(c.tokens, c.in, c.out, /*sm_count=*/4);

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor v = at::full({c.tokens, c.r}, std::nan(""), f32);
  at::Tensor v_part = at::full({plan.out_col_tiles, c.tokens, c.r}, std::nan(""), f32);
  at::Tensor db_part = at::full({plan.out_splits, c.out, c.r}, std::nan(""), f32);
  at::Tensor bias_part = at::full({plan.out_splits, c.out}, std::nan(""), f32);
  at::Tensor da_part = at::full({plan.x_splits, c.r, c.in}, std::nan(""), f32);
  at::Tensor gb = at::empty({c.out, c.r}, at_), gbias = at::empty({c.out}, xt);
  at::Tensor ga = at::empty({c.r, c.in}, at_), gx = at::full({c.tokens, c.in}, std::nan(""), at::kFloat).to(xt);
  const lorafuse_emu::Launcher launch;

  lorafuse::cuda::GradOutParams gp{};
  gp.dy = dy.data_ptr();
  gp.b = b.data_ptr();
  gp.u = u.data_ptr<float>();
  gp.v_part = need_v ? v_part.data_ptr<float>() : nullptr;
  gp.db_part = need_b ? db_part.data_ptr<float>() : nullptr;
  gp.bias_part = need_bias ? bias_part.data_ptr<float>() : nullptr;
  gp.tokens = c.tokens;
  gp.out = c.out;
  gp.r = c.r;
  lorafuse::cuda::run_grad_out<Tx, Ta>(launch, gp, plan);
  if (need_v)
    lorafuse::cuda::run_reduce<float>(launch, v_part.data_ptr<float>(), plan.out_col_tiles, c.tokens * c.r, 1.f,
                                      v.data_ptr<float>());
  if (need_b)
    lorafuse::cuda::run_reduce<Ta>(launch, db_part.data_ptr<float>(), plan.out_splits, c.out * c.r, scale,
                                   reinterpret_cast<Ta*>(gb.data_ptr()));
  if (need_bias)
    lorafuse::cuda::run_reduce<Tx>(launch, bias_part.data_ptr<float>(), plan.out_splits, c.out, 1.f,
                                   reinterpret_cast<Tx*>(gbias.data_ptr()));
  if (need_v) {
    lorafuse::cuda::GradXParams xp{};
    xp.x = x_store.data_ptr();
    xp.ldx = ldx;
    xp.a = a.data_ptr();
    xp.v = v.data_ptr<float>();
    xp.dx = need_x ? gx.data_ptr() : nullptr;
    xp.da_part = need_a ? da_part.data_ptr<float>() : nullptr;
    xp.tokens = c.tokens;
    xp.in = c.in;
    xp.r = c.r;
    xp.scale = scale;
    xp.drop = dropout(c.p, 0, 0);
    xp.drop.rng_in = c.p > 0 ? rng.data_ptr<int64_t>() : nullptr;
    lorafuse::cuda::run_grad_x<Tx, Ta>(launch, xp, plan);
    if (need_a)
      lorafuse::cuda::run_reduce<Ta>(launch, da_part.data_ptr<float>(), plan.x_splits, c.r * c.in, scale,
                                     reinterpret_cast<Ta*>(ga.data_ptr()));
  }

  const auto dyd = dy.to(at::kDouble), xd_mask = keep_scale(c.tokens, c.in, c.p, 77, 8);
  const auto v_ref = at::mm(dyd, b.to(at::kDouble));
  if (need_v) REQUIRE(rel_err(v, v_ref) < 2e-5);
  if (need_b) REQUIRE(rel_err(gb, scale * at::mm(dyd.t(), u.to(at::kDouble))) < tol_of(at_));
  if (need_bias) REQUIRE(rel_err(gbias, dyd.sum(0)) < tol_of(xt));
  if (need_x) REQUIRE(rel_err(gx, scale * at::mm(v_ref, a.to(at::kDouble)) * xd_mask) < tol_of(xt));
  if (need_a) REQUIRE(rel_err(ga, scale * at::mm(v_ref.t(), x.to(at::kDouble) * xd_mask)) < tol_of(at_));
}

template <typename Tx, typename Ta>
void forward_sweep() {
  for (const Case& c : {Case{5, 300, 7, 16, 0.0, false},     // decode path (T <= 16)
                        Case{16, 129, 260, 70, 0.3, true},   // decode, r > 64, dropout, strided rows
                        Case{37, 300, 300, 16, 0.0, false},  // prefill: partial block, 2 column tiles
                        Case{70, 1, 3, 1, 0.0, true},        // in = 1, r = 1
                        Case{41, 257, 31, 40, 0.25, false},  // rank tile 64 holding 40, dropout
                        Case{19, 130, 9, 70, 0.1, true}}) {  // two rank tiles (64 + 6)
    check_forward<Tx, Ta>(c);
  }
}

template <typename Tx, typename Ta>
void backward_sweep() {
  check_backward<Tx, Ta>(Case{37, 300, 270, 16, 0.0, false}, true, true, true, true);  // 2x2 column tiles, 3 splits
  check_backward<Tx, Ta>(Case{50, 129, 33, 8, 0.3, true}, true, true, true, true);     // dropout, strided rows
  check_backward<Tx, Ta>(Case{20, 70, 300, 70, 0.2, false}, true, true, true, true);   // two rank tiles
  check_backward<Tx, Ta>(Case{9, 31, 17, 32, 0.0, false}, false, true, true, false);   // no dX, no dbias
  check_backward<Tx, Ta>(Case{9, 31, 17, 5, 0.5, false}, true, false, false, true);    // dX and dbias only
}

}  // namespace

TEST_CASE("emulated CUDA kernels: plan_backward splits cover every token once", "[cuda-emu]") {
  for (int64_t tokens : {1, 15, 16, 17, 1000, 8192}) {
    for (int64_t cols : {1, 300, 4096}) {
      const BackwardPlan p = lorafuse::cuda::plan_backward(tokens, cols, cols, 132);
      CAPTURE(tokens, cols);
      REQUIRE(p.out_tokens_per_split % lorafuse::cuda::kGradOutTokens == 0);
      REQUIRE(p.x_tokens_per_split % lorafuse::cuda::kGradXTokens == 0);
      REQUIRE(p.out_splits * p.out_tokens_per_split >= tokens);
      REQUIRE((p.out_splits - 1) * p.out_tokens_per_split < tokens);
      REQUIRE(p.x_splits * p.x_tokens_per_split >= tokens);
      REQUIRE((p.x_splits - 1) * p.x_tokens_per_split < tokens);
    }
  }
}

TEST_CASE("emulated CUDA kernels: forward (shrink + expand) against float64", "[cuda-emu]") {
  at::manual_seed(1);
  SECTION("float32") { forward_sweep<float, float>(); }
  SECTION("bfloat16 with float32 adapter") { forward_sweep<__nv_bfloat16, float>(); }
  SECTION("float16") { forward_sweep<__half, __half>(); }
}

TEST_CASE("emulated CUDA kernels: backward (grad_out + grad_x + reductions) against float64", "[cuda-emu]") {
  at::manual_seed(2);
  SECTION("float32") { backward_sweep<float, float>(); }
  SECTION("bfloat16") { backward_sweep<__nv_bfloat16, __nv_bfloat16>(); }
  SECTION("float16 with float32 adapter") { backward_sweep<__half, float>(); }
}

TEST_CASE("emulated CUDA kernels: the decode shrink runs one block per rank row", "[cuda-emu]") {
  at::Tensor x = at::randn({3, 40}), a = at::randn({6, 40}), u = at::zeros({3, 6});
  lorafuse::cuda::ShrinkParams sp{};
  sp.x = x.data_ptr();
  sp.ldx = 40;
  sp.a = a.data_ptr();
  sp.u = u.data_ptr<float>();
  sp.tokens = 3;
  sp.in = 40;
  sp.r = 6;
  const uint64_t before = lorafuse_emu::g_launches;
  lorafuse::cuda::run_shrink<float, float>(lorafuse_emu::Launcher{}, sp);
  REQUIRE(lorafuse_emu::g_launches == before + 1);
  REQUIRE(rel_err(u, at::mm(x.to(at::kDouble), a.to(at::kDouble).t())) < 2e-5);
}

TEST_CASE("emulator: a barrier that not every thread reaches is reported", "[cuda-emu]") {
  struct P {
    int unused;
  };
  auto divergent = +[](P) {
    if (threadIdx.x == 0) __shfl_xor_sync(0xffffffffu, 1.f, 1);  // lane 0 alone at a warp shuffle
    __syncthreads();                                             // everyone else here: neither completes
  };
  REQUIRE_THROWS_AS(lorafuse_emu::launch(divergent, dim3(1), 64, 0, P{0}), std::runtime_error);
}

TEST_CASE("emulated CUDA kernels: dropped elements are exact zeros in backward (inf in x stays out of dA)",
          "[cuda-emu]") {
  const int64_t tokens = 20, in = 40, r = 4;
  const double p = 0.5;
  const at::Tensor mask = keep_scale(tokens, in, p, 77, 8);  // the mask the kernel regenerates
  at::Tensor x = at::randn({tokens, in});
  x.masked_fill_(mask.eq(0), std::numeric_limits<float>::infinity());  // inf exactly where dropped
  at::Tensor a = at::randn({r, in}), v = at::randn({tokens, r});
  at::Tensor rng = at::tensor({int64_t{77}, int64_t{8}}, at::kLong);
  const BackwardPlan plan = lorafuse::cuda::plan_backward(tokens, in, 8, /*sm_count=*/4);
  at::Tensor da_part = at::empty({plan.x_splits, r, in}), da = at::empty({r, in}), dx = at::empty({tokens, in});
  lorafuse::cuda::GradXParams xp{};
  xp.x = x.data_ptr();
  xp.ldx = in;
  xp.a = a.data_ptr();
  xp.v = v.data_ptr<float>();
  xp.dx = dx.data_ptr();
  xp.da_part = da_part.data_ptr<float>();
  xp.tokens = tokens;
  xp.in = in;
  xp.r = r;
  xp.scale = 1.f;
  xp.drop = dropout(p, 0, 0);
  xp.drop.rng_in = rng.data_ptr<int64_t>();
  const lorafuse_emu::Launcher launch;
  lorafuse::cuda::run_grad_x<float, float>(launch, xp, plan);
  lorafuse::cuda::run_reduce<float>(launch, da_part.data_ptr<float>(), plan.x_splits, r * in, 1.f,
                                    da.data_ptr<float>());
  REQUIRE(at::isfinite(da).all().item<bool>());
  REQUIRE(at::isfinite(dx).all().item<bool>());
  const auto xd = x.to(at::kDouble).masked_fill(mask.eq(0), 0.0) * mask;
  REQUIRE(rel_err(da, at::mm(v.to(at::kDouble).t(), xd)) < 2e-5);
}
