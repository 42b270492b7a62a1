#include "csrc/ops/common/lora_linear_checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace lorafuse::detail {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_strided_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor; found layout ",
                    t.layout());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; found ", name,
                    " on ", t.device());
}

void check_scalars(const char* op, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be a finite number; found ", scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); found ", dropout_p);
}

}  // namespace

int64_t leading_numel(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) n *= sizes[d];
  return n;
}

c10::SymInt leading_sym_numel(const at::Tensor& x) {
  c10::SymInt n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n = n * x.sym_size(d);
  return n;
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v = sizes.vec();
  v.back() = last;
  return v;
}

at::ScalarType lora_acc_dtype(const at::Tensor& x, const at::Tensor& lora_a) {
  return (x.scalar_type() == at::kDouble || lora_a.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

void check_lora_branch_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const c10::SymInt& out, const char* out_from, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(x.defined() && lora_a.defined() && lora_b.defined(), op,
                    ": x, lora_a and lora_b must all be tensors; found an undefined tensor");
  TORCH_CHECK_VALUE(x.layout() == at::kStrided, op, ": x must be a dense (strided) tensor; found layout ", x.layout());
  check_strided_on(op, "lora_a", lora_a, x);
  check_strided_on(op, "lora_b", lora_b, x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [..., in] (at least 1 dimension); found a 0-d tensor");
  TORCH_CHECK_VALUE(lora_a.dim() == 2, op, ": lora_a must be 2-D [r, in]; found shape ", lora_a.sym_sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == 2, op, ": lora_b must be 2-D [out, r]; found shape ", lora_b.sym_sizes());
  const c10::SymInt in = x.sym_size(-1);
  const c10::SymInt r = lora_a.sym_size(0);
  TORCH_CHECK_VALUE(lora_a.sym_size(1) == in, op, ": lora_a must have shape [r, in] with in = x.size(-1) = ", in,
                    "; found lora_a of shape ", lora_a.sym_sizes());
  TORCH_CHECK_VALUE(r >= 1, op, ": lora_a must have at least one row (rank r >= 1); found lora_a of shape ",
                    lora_a.sym_sizes());
  TORCH_CHECK_VALUE(lora_b.sym_size(0) == out && lora_b.sym_size(1) == r, op, ": lora_b must have shape [out, r] = [",
                    out, ", ", r, "] (", out_from, ", r from lora_a); found lora_b of shape ", lora_b.sym_sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(is_float_dtype(xt), op, ": x must be float32, float16, bfloat16 or float64; found x of dtype ", xt);
  const auto at_ = lora_a.scalar_type();
  TORCH_CHECK_TYPE(at_ == xt || at_ == at::kFloat, op, ": lora_a must have x's dtype ", xt,
                   " or float32; found lora_a of dtype ", at_);
  TORCH_CHECK_TYPE(lora_b.scalar_type() == at_, op, ": lora_b must have lora_a's dtype ", at_,
                   "; found lora_b of dtype ", lora_b.scalar_type());
  const auto dev = x.device().type();
  TORCH_CHECK_VALUE(dev == at::kCPU || dev == at::kCUDA || dev == at::kMeta, op,
                    ": tensors must be on cpu, cuda or meta; found x on ", x.device());
  check_scalars(op, scale, dropout_p);
}

void check_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            double scale, double dropout_p) {
  TORCH_CHECK_VALUE(x.defined() && weight.defined() && lora_a.defined() && lora_b.defined(), op,
                    ": x, weight, lora_a and lora_b must all be tensors; found an undefined tensor");
  TORCH_CHECK_VALUE(x.layout() == at::kStrided, op, ": x must be a dense (strided) tensor; found layout ", x.layout());
  check_strided_on(op, "weight", weight, x);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_strided_on(op, "bias", *bias, x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [..., in] (at least 1 dimension); found a 0-d tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out, in]; found shape ", weight.sym_sizes());
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1, op, ": bias must be 1-D [out]; found shape ", bias->sym_sizes());
  }
  // sizes: in from x, out from weight, r from lora_a
  const c10::SymInt in = x.sym_size(-1);
  const c10::SymInt out = weight.sym_size(0);
  TORCH_CHECK_VALUE(weight.sym_size(1) == in, op, ": weight must have shape [out, in] with in = x.size(-1) = ", in,
                    "; found weight of shape ", weight.sym_sizes(), " for x of shape ", x.sym_sizes());
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->sym_size(0) == out, op, ": bias must have shape [out] = [", out,
                      "] (out from weight); found bias of shape ", bias->sym_sizes());
  }
  check_lora_branch_args(op, x, lora_a, lora_b, out, "out from weight", scale, dropout_p);
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(weight.scalar_type() == xt, op, ": weight must have x's dtype ", xt, "; found weight of dtype ",
                   weight.scalar_type());
  if (has_bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == xt, op, ": bias must have x's dtype ", xt, "; found bias of dtype ",
                     bias->scalar_type());
  }
}

void check_lora_add_args(const char* op, const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(base_out.defined() && x.defined(), op,
                    ": base_out and x must both be tensors; found an undefined tensor");
  TORCH_CHECK_VALUE(base_out.dim() == x.dim() && base_out.dim() >= 1, op,
                    ": base_out must have x's number of dimensions (the base layer's output for x, [..., out]); "
                    "found base_out of shape ",
                    base_out.sym_sizes(), " for x of shape ", x.sym_sizes());
  check_strided_on(op, "base_out", base_out, x);
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK_VALUE(base_out.sym_size(d) == x.sym_size(d), op,
                      ": base_out must have shape [..., out] with x's leading dimensions; found base_out of shape ",
                      base_out.sym_sizes(), " for x of shape ", x.sym_sizes());
  }
  TORCH_CHECK_TYPE(is_float_dtype(base_out.scalar_type()), op,
                   ": base_out must be float32, float16, bfloat16 or float64; found base_out of dtype ",
                   base_out.scalar_type());
  check_lora_branch_args(op, x, lora_a, lora_b, base_out.sym_size(-1), "out from base_out", scale, dropout_p);
}

void check_lora_linear_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state,
                                     double scale, double dropout_p) {
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) {
    check_lora_linear_args(op, x, *weight, std::nullopt, lora_a, lora_b, scale, dropout_p);
  } else {  // the backward of lora_add: no base GEMM, out from lora_b
    TORCH_CHECK_VALUE(lora_b.defined() && lora_b.dim() == 2, op, ": lora_b must be 2-D [out, r]");
    check_lora_branch_args(op, x, lora_a, lora_b, lora_b.sym_size(0), "out from lora_b", scale, dropout_p);
  }
  check_strided_on(op, "grad_out", grad_out, x);
  check_strided_on(op, "u", u, x);
  check_strided_on(op, "rng_state", rng_state, x);

  auto expected_out = x.sym_sizes().vec();
  expected_out.back() = lora_b.sym_size(0);
  TORCH_CHECK_VALUE(grad_out.sym_sizes() == c10::SymIntArrayRef(expected_out), op, ": grad_out must have shape ",
                    c10::SymIntArrayRef(expected_out),
                    " (x's shape with the last dimension replaced by out); found grad_out of shape ",
                    grad_out.sym_sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have x's dtype ", x.scalar_type(),
                   "; found ", grad_out.scalar_type());

  const c10::SymInt tokens = leading_sym_numel(x);
  const auto acc = lora_acc_dtype(x, lora_a);
  TORCH_CHECK_VALUE(u.dim() == 2 && u.sym_size(0) == tokens && u.sym_size(1) == lora_a.sym_size(0), op,
                    ": u must have shape [T, r] = [", tokens, ", ", lora_a.sym_size(0),
                    "] as returned by lora_linear_forward; found u of shape ", u.sym_sizes());
  TORCH_CHECK_TYPE(u.scalar_type() == acc, op, ": u must have dtype ", acc,
                   " as returned by lora_linear_forward; found ", u.scalar_type());
  TORCH_CHECK_VALUE(rng_state.dim() == 1 && rng_state.sym_size(0) == 2 && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state must be an int64 tensor of shape [2] as returned by lora_linear_forward; found ",
                    rng_state.scalar_type(), " of shape ", rng_state.sym_sizes());
}

}  // namespace lorafuse::detail
