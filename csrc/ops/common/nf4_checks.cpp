#include "csrc/ops/common/nf4_checks.h"

#include <ATen/ops/any.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linspace.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/select.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "csrc/ops/common/lora_linear_checks.h"
#include "cuda/shared/nf4.h"

namespace lorafuse::detail {
namespace {

bool is_input_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_blocksize(const char* op, int64_t blocksize) {
  const auto* begin = std::begin(nf4::kBlocksizes);
  const auto* end = std::end(nf4::kBlocksizes);
  TORCH_CHECK_VALUE(
      std::find(begin, end, blocksize) != end, op,
      ": blocksize: expected one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (bitsandbytes' sizes), found ", blocksize);
}

}  // namespace

void check_nf4_finite(const at::Tensor& flat) {
  const auto bad = at::isfinite(flat).logical_not();
  if (!bad.any().item<bool>()) return;
  const int64_t index = at::nonzero(bad)[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "lorafuse.quantize_nf4: weight: expected finite values, found ", flat[index].item<float>(),
                    " at flat index ", index);
}

void check_quantize_nf4_args(const at::Tensor& weight, int64_t blocksize) {
  constexpr const char* op = "lorafuse.quantize_nf4";
  TORCH_CHECK_VALUE(weight.defined(), op, ": weight must be a tensor");
  TORCH_CHECK_VALUE(weight.layout() == at::kStrided, op, ": weight must be a dense (strided) tensor, found layout ",
                    weight.layout());
  TORCH_CHECK_TYPE(is_input_float(weight.scalar_type()), op, ": weight: expected float32, bfloat16 or float16, found ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.sym_numel() > 0, op, ": weight: expected at least one element, found shape ",
                    weight.sym_sizes());
  check_blocksize(op, blocksize);
}

bool check_dequantize_nf4_args(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  check_blocksize(op, blocksize);
  TORCH_CHECK_TYPE(is_input_float(dtype), op, ": dtype: expected float32, bfloat16 or float16, found ", dtype);
  int64_t n = 1;
  for (const auto d : shape) {
    TORCH_CHECK_VALUE(d >= 0, op, ": shape: expected sizes >= 0, found ", shape);
    n *= d;
  }
  TORCH_CHECK_VALUE(n > 0, op, ": shape: expected at least one element, found ", shape);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed: expected uint8, found ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.sym_numel() == (n + 1) / 2, op, ": packed: expected ", (n + 1) / 2,
                    " bytes (two codes each) for shape ", shape, ", found ", packed.sym_numel(), " (shape ",
                    packed.sym_sizes(), ")");
  const int64_t blocks = nf4_blocks(n, blocksize);
  TORCH_CHECK_VALUE(absmax.sym_numel() == blocks, op, ": absmax: expected ", blocks, " values (one per block of ",
                    blocksize, " in shape ", shape, "), found ", absmax.sym_numel());
  const bool nested = nested_absmax.has_value() && nested_absmax->defined() && nested_absmax->sym_numel() > 0;
  if (nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                     ": absmax: expected uint8 codes with nested_absmax (double quantization), found ",
                     absmax.scalar_type());
    TORCH_CHECK_TYPE(nested_absmax->scalar_type() == at::kFloat, op, ": nested_absmax: expected float32, found ",
                     nested_absmax->scalar_type());
    const int64_t nested_blocks = nf4_blocks(blocks, nf4::kNestedBlocksize);
    TORCH_CHECK_VALUE(nested_absmax->sym_numel() == nested_blocks, op, ": nested_absmax: expected ", nested_blocks,
                      " values (one per 256 blocks), found ", nested_absmax->sym_numel());
    TORCH_CHECK_VALUE(offset.has_value() && offset->defined() && offset->sym_numel() == 1, op,
                      ": offset: expected one float32 value with nested_absmax (double quantization)");
    TORCH_CHECK_TYPE(offset->scalar_type() == at::kFloat, op, ": offset: expected float32, found ",
                     offset->scalar_type());
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op,
                     ": absmax: expected float32 (uint8 codes need nested_absmax and offset), found ",
                     absmax.scalar_type());
    TORCH_CHECK_VALUE(!offset.has_value() || !offset->defined() || offset->sym_numel() == 0, op,
                      ": offset is given but nested_absmax is not; double quantization needs both");
  }
  const auto device = packed.device();
  for (const auto* t : {&absmax, nested ? &*nested_absmax : nullptr, nested ? &*offset : nullptr}) {
    if (t != nullptr) {
      TORCH_CHECK_VALUE(t->device() == device, op, ": every tensor must be on packed's device ", device,
                        "; found one on ", t->device());
    }
  }
  return nested;
}

bool check_nf4_linear_args(const char* op, const at::Tensor& x, int64_t x_features, const at::Tensor& packed,
                           const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                           int64_t in_features, const std::optional<at::Tensor>& bias) {
  const char* name = x_features == in_features ? "x" : "grad_out";
  TORCH_CHECK_VALUE(x.defined() && x.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
  TORCH_CHECK_TYPE(is_input_float(x.scalar_type()) || x.scalar_type() == at::kDouble, op, ": ", name,
                   ": expected float32, bfloat16, float16 or float64, found ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.sym_size(-1) == x_features, op, ": ", name, ": expected [..., ", x_features,
                    "], found shape ", x.sym_sizes());
  TORCH_CHECK_VALUE(out_features > 0 && in_features > 0, op, ": expected out_features and in_features > 0, found ",
                    out_features, " and ", in_features);
  TORCH_CHECK_VALUE(packed.device() == x.device(), op, ": packed must be on ", name, "'s device ", x.device(),
                    "; found ", packed.device());
  const bool nested = check_dequantize_nf4_args(op, packed, absmax, nested_absmax, offset, blocksize,
                                                {out_features, in_features}, at::kFloat);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == out_features, op, ": bias: expected [", out_features,
                      "], found shape ", bias->sym_sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias: expected x's dtype ", x.scalar_type(),
                     ", found ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias must be on x's device ", x.device(), "; found ",
                      bias->device());
  }
  return nested;
}

bool check_nf4_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                                int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1, op, ": x: expected [..., in_features], found ",
                    x.defined() ? "a 0-d tensor" : "an undefined tensor");
  const int64_t in_features = x.size(-1);
  const bool nested = check_nf4_linear_args(op, x, in_features, packed, absmax, nested_absmax, offset, blocksize,
                                            out_features, in_features, bias);
  check_lora_branch_args(op, x, lora_a, lora_b, out_features, "out_features", scale, dropout_p);
  return nested;
}

bool check_nf4_lora_linear_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& packed, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& offset, int64_t blocksize,
                                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
                                         const at::Tensor& rng_state, double scale, double dropout_p) {
  check_lora_linear_backward_args(op, grad_out, x, std::nullopt, lora_a, lora_b, u, rng_state, scale, dropout_p);
  const int64_t out_features = lora_b.size(0);
  return check_nf4_linear_args(op, grad_out, out_features, packed, absmax, nested_absmax, offset, blocksize,
                               out_features, x.size(-1), std::nullopt);
}

void check_nf4_statistics_frozen(const char* op, const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& offset) {
  const std::pair<const char*, const at::Tensor*> statistics[] = {
      {"absmax", &absmax},
      {"nested_absmax", nested_absmax.has_value() ? &*nested_absmax : nullptr},
      {"offset", offset.has_value() ? &*offset : nullptr}};
  for (const auto& [name, t] : statistics) {
    TORCH_CHECK_VALUE(t == nullptr || !t->defined() || !t->requires_grad(), op, ": ", name,
                      " requires grad, but the 4-bit weight is frozen and gets no gradient (QLoRA trains the "
                      "adapters); call requires_grad_(False) on it, or train a dense layer instead");
  }
}

const std::array<float, 256>& dynamic_code() {
  // bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), step by step in the same
  // ATen ops so that every value is the same float: for each exponent i, the midpoints of linspace(0.1, 1, 2^i + 1)
  // scaled by ±10^(i-6); then 0 and 1; sorted.
  static const std::array<float, 256> code = [] {
    std::vector<float> data;
    for (int i = 0; i < 7; ++i) {
      const auto bounds = at::linspace(0.1, 1, (int64_t{1} << i) + 1, at::TensorOptions().dtype(at::kFloat));
      const at::Tensor means = bounds.slice(0, 0, -1).add(bounds.slice(0, 1)).div(2.0);
      const double scale = i == 6 ? 1.0 : std::pow(10.0, i - 6);
      for (const double sign : {1.0, -1.0}) {
        const at::Tensor values = means.mul(sign * scale).contiguous();
        const float* v = values.data_ptr<float>();
        data.insert(data.end(), v, v + values.numel());
      }
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    TORCH_CHECK(data.size() == 256, "dynamic_code: expected 256 values, made ", data.size());
    std::sort(data.begin(), data.end());
    std::array<float, 256> out{};
    std::copy(data.begin(), data.end(), out.begin());
    return out;
  }();
  return code;
}

}  // namespace lorafuse::detail
