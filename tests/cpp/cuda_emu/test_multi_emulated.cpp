// The multi-adapter CUDA kernels (segmented lora_multi_add, per-token lora_token_add, the backward's row dropout) and
// their launch plans, run by the CPU emulator and checked against float64 references: adapters of different ranks
// (1 to 130: every rank tile and two 64-rank passes), rows of no adapter, dropout per row, x, adapter and output
// dtypes apart.
#include <ATen/ATen.h>
#include <lorafuse/ops/lora_multi.h>

#include <cmath>
#include <vector>

#include "catch.h"
#include "cuda_emu/dtype_of.h"
#include "cuda_emu/reference.h"
// the emulator's macros (threadIdx, __shared__, ...) come after other headers and before the kernels'
#include "cuda_emu/emulator.h"

#include "cuda/lora_multi/lora_multi_launch.cuh"

namespace {

using lorafuse::cuda::AdapterSlot;
using lorafuse_test::dtype_of;
using lorafuse_test::keep_scale;
using lorafuse_test::rel_err;
using lorafuse_test::tol_of;

struct Batch {
  at::Tensor x, base_out, row_adapter;  // x [T, in] (rows with stride ldx), base_out [T, out]
  std::vector<at::Tensor> a, b;         // A [r, in], B [out, r] in the adapter dtype
  std::vector<double> scale;
  std::vector<AdapterSlot> slots;
  std::vector<int64_t> ranks;
  int64_t ldx = 0, max_rank = 0;
};

Batch make_batch(int64_t tokens, int64_t in, int64_t out, const std::vector<int64_t>& ranks, at::ScalarType xt,
                 at::ScalarType at_, at::ScalarType yt) {
  Batch b;
  b.ldx = in + 3;
  b.x = at::randn({tokens, b.ldx}).to(xt).narrow(1, 0, in);
  b.base_out = at::randn({tokens, out}).to(yt);
  const auto n = static_cast<int64_t>(ranks.size());
  b.row_adapter = at::randint(-1, n, {tokens}, at::kLong);
  for (int64_t i = 0; i < n; ++i) {
    b.a.push_back(at::randn({ranks[i], in}).div(std::sqrt(static_cast<double>(in))).to(at_));
    b.b.push_back(at::randn({out, ranks[i]}).to(at_));
    b.scale.push_back(0.5 + 0.25 * static_cast<double>(i));
    b.slots.push_back(
        AdapterSlot{b.a.back().data_ptr(), b.b.back().data_ptr(), ranks[i], static_cast<float>(b.scale.back())});
    b.max_rank = std::max(b.max_rank, ranks[i]);
  }
  b.ranks = ranks;
  return b;
}

// float64: y[t] = base_out[t] + scaleᵢ·(mask(x)[t]·Aᵢᵀ)·Bᵢᵀ for i = row_adapter[t] ≥ 0; u_sorted the shrink per sorted
// row.
at::Tensor reference(const Batch& b, const at::Tensor& keep, at::Tensor* u_sorted = nullptr,
                     const at::Tensor& order = {}) {
  at::Tensor y = b.base_out.to(at::kDouble).clone();
  const at::Tensor xd = b.x.to(at::kDouble) * keep;
  const auto ra = b.row_adapter.accessor<int64_t, 1>();
  std::vector<at::Tensor> u(b.x.size(0));
  for (int64_t t = 0; t < b.x.size(0); ++t) {
    if (ra[t] < 0) continue;
    u[t] = at::mv(b.a[ra[t]].to(at::kDouble), xd[t]);
    y[t] += b.scale[ra[t]] * at::mv(b.b[ra[t]].to(at::kDouble), u[t]);
  }
  if (u_sorted != nullptr) {
    const auto o = order.accessor<int64_t, 1>();
    for (int64_t j = 0; j < order.size(0) && b.row_adapter[order[j].item<int64_t>()].item<int64_t>() >= 0; ++j) {
      (*u_sorted)[j].narrow(0, 0, u[o[j]].size(0)).copy_(u[o[j]]);
    }
  }
  return y;
}

template <typename Tx, typename Ta, typename Ty>
void check_segmented(int64_t tokens, int64_t in, int64_t out, const std::vector<int64_t>& ranks, double p) {
  CAPTURE(tokens, in, out, ranks, p);
  const auto xt = dtype_of<Tx>(), at_ = dtype_of<Ta>(), yt = dtype_of<Ty>();
  Batch b = make_batch(tokens, in, out, ranks, xt, at_, yt);
  const auto n = static_cast<int64_t>(ranks.size());
  const auto [order, offsets] = lorafuse::lora_segments(b.row_adapter, n);
  const int64_t sorted = order.size(0);
  at::Tensor u = at::full({sorted, b.max_rank}, std::nan(""), at::kFloat);
  at::Tensor y = b.base_out.clone();
  at::Tensor rng = at::zeros({2}, at::kLong);
  const uint64_t seed = 0x0123456789abcdefULL, offset = 20;
  const lorafuse::cuda::MultiPlan plan = lorafuse::cuda::plan_multi(sorted, b.ranks.data(), n);

  lorafuse::cuda::MultiShrinkParams sp{};
  sp.x = b.x.data_ptr();
  sp.ldx = b.ldx;
  sp.in = in;
  sp.adapters = b.slots.data();
  sp.num_adapters = n;
  sp.order = order.const_data_ptr<int64_t>();
  sp.offsets = offsets.const_data_ptr<int64_t>();
  sp.u = u.data_ptr<float>();
  sp.ldu = b.max_rank;
  sp.drop = lorafuse_test::dropout(p, seed, offset);
  sp.drop.rng_out = p > 0 ? rng.data_ptr<int64_t>() : nullptr;
  const uint64_t launches = lorafuse_emu::g_launches;
  lorafuse::cuda::run_multi_shrink<Tx, Ta>(lorafuse_emu::Launcher{}, sp, plan);
  lorafuse::cuda::MultiExpandParams ep{};
  ep.u = u.data_ptr<float>();
  ep.ldu = b.max_rank;
  ep.adapters = b.slots.data();
  ep.num_adapters = n;
  ep.order = sp.order;
  ep.offsets = sp.offsets;
  ep.y = y.data_ptr();
  ep.out = out;
  lorafuse::cuda::run_multi_expand<Ty, Ta>(lorafuse_emu::Launcher{}, ep, plan);

  if (tokens == 0) {  // nothing to launch
    REQUIRE(lorafuse_emu::g_launches == launches);
    return;
  }
  at::Tensor u_ref = at::zeros({sorted, b.max_rank}, at::kDouble);
  const at::Tensor y_ref = reference(b, keep_scale(tokens, in, p, seed, offset), &u_ref, order);
  if (sorted > 0) {
    // each sorted row's own ranks are written (the others are never read)
    const auto o = order.accessor<int64_t, 1>();
    const auto ra = b.row_adapter.accessor<int64_t, 1>();
    for (int64_t j = 0; j < sorted; ++j) {
      if (ra[o[j]] < 0) break;  // the base's rows come last
      const int64_t r = ranks[ra[o[j]]];
      REQUIRE(rel_err(u[j].narrow(0, 0, r), u_ref[j].narrow(0, 0, r)) < 2e-5);
    }
  }
  REQUIRE(rel_err(y, y_ref) < tol_of(xt == at::kFloat ? yt : xt));
  // rows of no adapter keep base_out's bits
  const at::Tensor none = b.row_adapter.lt(0);
  REQUIRE(at::equal(y.index({none}), b.base_out.index({none})));
  if (p > 0) {
    REQUIRE(static_cast<uint64_t>(rng[0].item<int64_t>()) == seed);
    REQUIRE(static_cast<uint64_t>(rng[1].item<int64_t>()) == offset);
  }
}

template <typename Tx, typename Ta, typename Ty>
void check_token(int64_t tokens, int64_t in, int64_t out, const std::vector<int64_t>& ranks) {
  CAPTURE(tokens, in, out, ranks);
  const auto xt = dtype_of<Tx>(), at_ = dtype_of<Ta>(), yt = dtype_of<Ty>();
  Batch b = make_batch(tokens, in, out, ranks, xt, at_, yt);
  at::Tensor u = at::full({tokens, b.max_rank}, std::nan(""), at::kFloat);
  at::Tensor y = b.base_out.clone();
  lorafuse::cuda::TokenParams p{};
  p.x = b.x.data_ptr();
  p.ldx = b.ldx;
  p.in = in;
  p.adapters = b.slots.data();
  p.row_adapter = b.row_adapter.const_data_ptr<int64_t>();
  p.u = u.data_ptr<float>();
  p.ldu = b.max_rank;
  p.y = y.data_ptr();
  p.out = out;
  lorafuse::cuda::run_token<Tx, Ta, Ty>(lorafuse_emu::Launcher{}, p, tokens, b.max_rank);
  const at::Tensor y_ref = reference(b, at::ones({tokens, in}, at::kDouble));
  REQUIRE(rel_err(y, y_ref) < tol_of(xt == at::kFloat ? yt : xt));
  const at::Tensor none = b.row_adapter.lt(0);
  REQUIRE(at::equal(y.index({none}), b.base_out.index({none})));
  // the CPU op computes the same rows
  const at::Tensor cpu = lorafuse::lora_token_add(b.base_out, b.x, b.a, b.b, b.scale, b.row_adapter);
  REQUIRE(rel_err(y, cpu) < tol_of(xt == at::kFloat ? yt : xt));
}

}  // namespace

TEST_CASE("emulated segmented multi-adapter kernels match float64", "[cuda-emu][multi]") {
  at::manual_seed(11);
  const std::vector<int64_t> mixed = {3, 16, 40, 70};
  SECTION("float32") { check_segmented<float, float, float>(37, 150, 70, mixed, 0.0); }
  SECTION("float32 with dropout") { check_segmented<float, float, float>(37, 150, 70, mixed, 0.3); }
  SECTION("ranks past two tiles") { check_segmented<float, float, float>(20, 40, 300, {1, 130}, 0.2); }
  SECTION("float16 x, float32 adapters") { check_segmented<__half, float, __half>(29, 96, 33, {8, 33}, 0.0); }
  SECTION("bfloat16 x and adapters, float32 output") {
    check_segmented<__nv_bfloat16, __nv_bfloat16, float>(29, 96, 33, {8, 33, 64}, 0.1);
  }
  SECTION("one adapter, many rows (several tiles per segment)") {
    check_segmented<float, float, float>(150, 64, 40, {16}, 0.0);
  }
  SECTION("no rows") { check_segmented<float, float, float>(0, 16, 8, {4, 8}, 0.0); }
}

TEST_CASE("emulated per-token multi-adapter kernels match float64 and the CPU op", "[cuda-emu][multi]") {
  at::manual_seed(12);
  SECTION("float32") { check_token<float, float, float>(9, 300, 270, {3, 16, 70}); }
  SECTION("float16") { check_token<__half, __half, __half>(6, 64, 40, {8, 24}); }
  SECTION("bfloat16 x, float32 adapters") { check_token<__nv_bfloat16, float, __nv_bfloat16>(6, 64, 40, {8, 24}); }
}

TEST_CASE("emulated row dropout of the multi-adapter backward masks each row as its batch row", "[cuda-emu][multi]") {
  const int64_t n = 5, in = 37, tokens = 12;
  const double p = 0.4;
  const uint64_t seed = 99, offset = 4;
  const at::Tensor rows = at::randn({n, in});
  const at::Tensor ids = at::tensor({7, 0, 11, 3, 3}, at::kLong);
  at::Tensor got = rows.clone();
  const at::Tensor rng = at::tensor({static_cast<int64_t>(seed), static_cast<int64_t>(offset)}, at::kLong);
  lorafuse::cuda::RowsDropoutParams rp{};
  rp.rows = got.data_ptr<float>();
  rp.row_ids = ids.const_data_ptr<int64_t>();
  rp.n = n;
  rp.in = in;
  rp.drop = lorafuse_test::dropout(p, 0, 0);  // the threshold; (seed, offset) come from rng_in
  rp.drop.rng_in = rng.const_data_ptr<int64_t>();
  lorafuse::cuda::run_rows_dropout(lorafuse_emu::Launcher{}, rp);
  const at::Tensor want = rows.to(at::kDouble) * keep_scale(tokens, in, p, seed, offset).index_select(0, ids);
  REQUIRE(rel_err(got, want) < 1e-6);
  REQUIRE(got.eq(0).any().item<bool>());  // something was dropped (p = 0.4 over 185 elements)
}
