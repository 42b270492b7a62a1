#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <lorafuse/quant/lq_decompose.h>

#include <cmath>
#include <limits>

#include "csrc/ops/common/nf_checks.h"

namespace lorafuse {
namespace {

constexpr const char* kOp = "lq_decompose";

// Orthonormal columns spanning a's.
at::Tensor orth(const at::Tensor& a) { return std::get<0>(at::linalg_qr(a, "reduced")); }

// The rank-r factors of a [m, n] by a randomized SVD (Halko, Martinsson and Tropp): sketch Y = A·G with G Gaussian
// [n, r + p], `power_iters` rounds of re-orthogonalised power iteration, then the exact SVD of the small Qᵀ·A.
std::pair<at::Tensor, at::Tensor> low_rank_factors(const at::Tensor& a, int64_t rank, int64_t oversampling,
                                                   int64_t power_iters, at::Generator& gen) {
  const int64_t m = a.size(0), n = a.size(1);
  const int64_t k = std::min(rank + oversampling, std::min(m, n));
  at::Tensor q = orth(at::mm(a, at::randn({n, k}, gen, a.options())));
  for (int64_t i = 0; i < power_iters; ++i) q = orth(at::mm(a, orth(at::mm(a.t(), q))));
  auto [u, s, vh] = at::linalg_svd(at::mm(q.t(), a), /*full_matrices=*/false);
  const at::Tensor root = at::sqrt(s.narrow(0, 0, rank));
  return {at::mm(q, u.narrow(1, 0, rank)).mul(root), vh.narrow(0, 0, rank).mul(root.unsqueeze(1))};
}

void check(const at::Tensor& weight, const LqDecomposeOptions& o) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, kOp, ": weight: expected a 2-D tensor [out, in], found ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  const auto dtype = weight.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
                    ": weight: expected float32, bfloat16 or float16, found ", dtype);
  const int64_t smallest = std::min(weight.size(0), weight.size(1));
  TORCH_CHECK_VALUE(o.rank() >= 1 && o.rank() < smallest, kOp, ": rank: expected 1 <= rank < min(out, in) = ", smallest,
                    " for weight ", weight.sizes(), ", found ", o.rank());
  detail::parse_nf_format(kOp, o.format());
  TORCH_CHECK_VALUE(o.max_iters() >= 1, kOp, ": max_iters: expected >= 1, found ", o.max_iters());
  TORCH_CHECK_VALUE(std::isfinite(o.tol()) && o.tol() >= 0, kOp, ": tol: expected a finite value >= 0, found ",
                    o.tol());
  TORCH_CHECK_VALUE(o.oversampling() >= 0 && o.power_iters() >= 0, kOp,
                    ": oversampling and power_iters: expected >= 0, found ", o.oversampling(), " and ",
                    o.power_iters());
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(), kOp, ": weight: expected finite values");
  TORCH_CHECK_VALUE(!o.fisher().has_value() || !o.fisher()->defined() || !o.fisher()->is_meta(), kOp,
                    ": fisher: is on the meta device (it has no values)");
  if (o.fisher().has_value() && o.fisher()->defined()) {
    const at::Tensor& f = *o.fisher();
    TORCH_CHECK_VALUE(f.sizes() == weight.sizes(), kOp, ": fisher: expected the weight's shape ", weight.sizes(),
                      ", found ", f.sizes());
    TORCH_CHECK_VALUE(at::isfinite(f).all().item<bool>() && f.ge(0).all().item<bool>(), kOp,
                      ": fisher: expected finite values >= 0 (sums of squared gradients)");
    TORCH_CHECK_VALUE(f.gt(0).any().item<bool>(), kOp,
                      ": fisher: all zero (no gradient reached this weight), which would weight every error by 0; "
                      "compute it on data that uses the layer, or leave it out");
  }
}

// sqrt of the means along `dim`, clamped below at 1e-12 of the largest (and at the smallest normal float).
at::Tensor fisher_scale(const at::Tensor& fisher, int64_t dim) {
  const at::Tensor d = at::sqrt(fisher.mean(dim, /*keepdim=*/true));
  const float floor = std::max(d.max().item<float>() * 1e-12f, std::numeric_limits<float>::min());
  return d.clamp_min(floor);
}

}  // namespace

LqDecomposition lq_decompose(const at::Tensor& weight, const LqDecomposeOptions& options) {
  TORCH_CHECK_VALUE(!weight.defined() || !weight.is_meta(), kOp,
                    ": weight: is on the meta device (it has no values); load it first");
  at::NoGradGuard no_grad;  // numerics on values: no autograd graph, whatever requires grad
  check(weight, options);
  // On the CPU, whatever the weight's device: the sketch's generator and the quantization are the CPU's (the results
  // are CPU tensors; callers move them).
  const at::Tensor w = weight.detach().to(at::kCPU, at::kFloat).contiguous();
  const bool weighted = options.fisher().has_value() && options.fisher()->defined();
  at::Tensor root_f, dr, dc;
  if (weighted) {
    const at::Tensor f = options.fisher()->detach().to(at::kCPU, at::kFloat);
    root_f = at::sqrt(f);
    dr = fisher_scale(f, 1);  // [out, 1]
    dc = fisher_scale(f, 0);  // [1, in]
  }
  const auto norm = [&](const at::Tensor& e) { return (weighted ? e.mul(root_f) : e).norm().item<double>(); };
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed());
  const std::vector<int64_t> shape = {w.size(0), w.size(1)};
  LqDecomposition out;
  out.norm = norm(w);
  out.error = std::numeric_limits<double>::infinity();
  at::Tensor q_dense = at::zeros_like(w);
  for (int64_t it = 1; it <= options.max_iters(); ++it) {
    const at::Tensor residual = w.sub(q_dense);
    at::Tensor l1, l2;
    if (weighted) {
      std::tie(l1, l2) = low_rank_factors(dr.mul(residual).mul(dc), options.rank(), options.oversampling(),
                                          options.power_iters(), gen);
      l1 = l1.div(dr);
      l2 = l2.div(dc);
    } else {
      std::tie(l1, l2) = low_rank_factors(residual, options.rank(), options.oversampling(), options.power_iters(), gen);
    }
    const at::Tensor low = at::mm(l1, l2);
    NfWeight q = quantize_nf(w.sub(low), options.format(), options.stat_dtype());
    q_dense = dequantize_nf(q.packed, q.absmax, q.nested_absmax, q.offset, options.format(), shape, at::kFloat);
    const double error = norm(w.sub(q_dense).sub(low));
    out.errors.push_back(error);
    const double best = out.error;
    if (error < best) {
      out.error = error;
      out.l1 = l1.contiguous();
      out.l2 = l2.contiguous();
      out.q = q;
      out.best_iteration = it;
    }
    if (it > 1 && !(best - error > options.tol() * best)) break;  // too little gain, or worse
  }
  return out;
}

}  // namespace lorafuse
