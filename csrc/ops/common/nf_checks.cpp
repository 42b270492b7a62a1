#include "csrc/ops/common/nf_checks.h"

#include <lorafuse/ops/nf.h>

#include <ATen/ops/any.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linspace.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/min.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/select.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <iterator>
#include <vector>

#include "csrc/ops/common/lora_linear_checks.h"
#include "cuda/shared/nf4.h"
#include "cuda/shared/nf_code.h"

namespace lorafuse::detail {
namespace {

bool is_input_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

bool power_of_two_in(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi && (v & (v - 1)) == 0; }

}  // namespace

nf::Format parse_nf_format(const char* op, at::IntArrayRef format) {
  TORCH_CHECK_VALUE(format.size() == 4, op, ": format: expected [bits, blocksize, stat_bits, stat_blocksize], found ",
                    format);
  const nf::Format f{format[0], format[1], format[2], format[3]};
  TORCH_CHECK_VALUE(f.bits >= 2 && f.bits <= 8, op, ": format: bits: expected 2 .. 8, found ", f.bits);
  TORCH_CHECK_VALUE(power_of_two_in(f.blocksize, 16, 4096), op,
                    ": format: blocksize: expected a power of two in [16, 4096], found ", f.blocksize);
  TORCH_CHECK_VALUE(f.stat_bits == 0 || (f.stat_bits >= 2 && f.stat_bits <= 8), op,
                    ": format: stat_bits: expected 0 (float32 absmax) or 2 .. 8, found ", f.stat_bits);
  if (f.nested()) {
    TORCH_CHECK_VALUE(power_of_two_in(f.stat_blocksize, 16, 4096), op,
                      ": format: stat_blocksize: expected a power of two in [16, 4096] with stat_bits = ", f.stat_bits,
                      ", found ", f.stat_blocksize);
  } else {
    TORCH_CHECK_VALUE(f.stat_blocksize == 0, op,
                      ": format: stat_blocksize: expected 0 with stat_bits = 0 (no double quantization), found ",
                      f.stat_blocksize);
  }
  return f;
}

nf::Format nf4_format(const char* op, int64_t blocksize, bool double_quant) {
  const auto* begin = std::begin(nf4::kBlocksizes);
  const auto* end = std::end(nf4::kBlocksizes);
  TORCH_CHECK_VALUE(
      std::find(begin, end, blocksize) != end, op,
      ": blocksize: expected one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (bitsandbytes' sizes), found ", blocksize);
  return double_quant ? nf::Format{4, blocksize, 8, nf4::kNestedBlocksize} : nf::Format{4, blocksize, 0, 0};
}

std::vector<int64_t> format_list(const nf::Format& f) { return {f.bits, f.blocksize, f.stat_bits, f.stat_blocksize}; }

void check_nf_finite(const char* op, const at::Tensor& flat) {
  const auto bad = at::isfinite(flat).logical_not();
  if (!bad.any().item<bool>()) return;
  const int64_t index = at::nonzero(bad)[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, op, ": weight: expected finite values, found ", flat[index].item<float>(), " at flat index ",
                    index);
}

void check_quantize_nf_args(const char* op, const at::Tensor& weight, const nf::Format& f, at::ScalarType stat_dtype) {
  TORCH_CHECK_VALUE(weight.defined(), op, ": weight must be a tensor");
  TORCH_CHECK_VALUE(weight.layout() == at::kStrided, op, ": weight must be a dense (strided) tensor, found layout ",
                    weight.layout());
  TORCH_CHECK_TYPE(is_input_float(weight.scalar_type()), op, ": weight: expected float32, bfloat16 or float16, found ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.sym_numel() > 0, op, ": weight: expected at least one element, found shape ",
                    weight.sym_sizes());
  TORCH_CHECK_TYPE(is_input_float(stat_dtype), op, ": stat_dtype: expected float32, bfloat16 or float16, found ",
                   stat_dtype);
  TORCH_CHECK_TYPE(f.nested() || stat_dtype == at::kFloat, op,
                   ": stat_dtype: expected float32 without double quantization (stat_bits = 0), found ", stat_dtype);
}

bool check_dequantize_nf_args(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              const nf::Format& f, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_input_float(dtype), op, ": dtype: expected float32, bfloat16 or float16, found ", dtype);
  int64_t n = 1;
  for (const auto d : shape) {
    TORCH_CHECK_VALUE(d >= 0, op, ": shape: expected sizes >= 0, found ", shape);
    n *= d;
  }
  TORCH_CHECK_VALUE(n > 0, op, ": shape: expected at least one element, found ", shape);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed: expected uint8, found ", packed.scalar_type());
  const int64_t bytes = nf::stream_bytes(n, f.bits);
  TORCH_CHECK_VALUE(packed.sym_numel() == bytes, op, ": packed: expected ", bytes, " bytes (", f.bits,
                    "-bit codes) for shape ", shape, ", found ", packed.sym_numel(), " (shape ", packed.sym_sizes(),
                    ")");
  const int64_t blocks = nf::blocks_of(n, f.blocksize);
  const bool nested = nested_absmax.has_value() && nested_absmax->defined() && nested_absmax->sym_numel() > 0;
  TORCH_CHECK_VALUE(nested == f.nested(), op, ": nested_absmax: ",
                    f.nested() ? "expected the statistics' scales (double quantization: stat_bits > 0), found none"
                               : "given, but the format has stat_bits = 0 (no double quantization)");
  if (nested) {
    const int64_t stat_bytes = nf::stream_bytes(blocks, f.stat_bits);
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                     ": absmax: expected uint8 codes with nested_absmax (double quantization), found ",
                     absmax.scalar_type());
    TORCH_CHECK_VALUE(absmax.sym_numel() == stat_bytes, op, ": absmax: expected ", stat_bytes, " bytes (", f.stat_bits,
                      "-bit codes of ", blocks, " blocks of ", f.blocksize, " in shape ", shape, "), found ",
                      absmax.sym_numel());
    TORCH_CHECK_TYPE(is_input_float(nested_absmax->scalar_type()), op,
                     ": nested_absmax: expected float32, bfloat16 or float16, found ", nested_absmax->scalar_type());
    const int64_t nested_blocks = nf::blocks_of(blocks, f.stat_blocksize);
    TORCH_CHECK_VALUE(nested_absmax->sym_numel() == nested_blocks, op, ": nested_absmax: expected ", nested_blocks,
                      " values (one per ", f.stat_blocksize, " blocks), found ", nested_absmax->sym_numel());
    TORCH_CHECK_VALUE(offset.has_value() && offset->defined() && offset->sym_numel() == 1, op,
                      ": offset: expected one float32 value with nested_absmax (double quantization)");
    TORCH_CHECK_TYPE(offset->scalar_type() == at::kFloat, op, ": offset: expected float32, found ",
                     offset->scalar_type());
  } else {
    TORCH_CHECK_VALUE(absmax.sym_numel() == blocks, op, ": absmax: expected ", blocks, " values (one per block of ",
                      f.blocksize, " in shape ", shape, "), found ", absmax.sym_numel());
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

bool check_nf_linear_args(const char* op, const at::Tensor& x, int64_t x_features, const at::Tensor& packed,
                          const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& offset, const nf::Format& f, int64_t out_features,
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
  const bool nested =
      check_dequantize_nf_args(op, packed, absmax, nested_absmax, offset, f, {out_features, in_features}, at::kFloat);
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

bool check_nf_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               const nf::Format& f, int64_t out_features, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1, op, ": x: expected [..., in_features], found ",
                    x.defined() ? "a 0-d tensor" : "an undefined tensor");
  const int64_t in_features = x.size(-1);
  const bool nested = check_nf_linear_args(op, x, in_features, packed, absmax, nested_absmax, offset, f, out_features,
                                           in_features, bias);
  check_lora_branch_args(op, x, lora_a, lora_b, out_features, "out_features", scale, dropout_p);
  return nested;
}

bool check_nf_lora_linear_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                        const at::Tensor& packed, const at::Tensor& absmax,
                                        const std::optional<at::Tensor>& nested_absmax,
                                        const std::optional<at::Tensor>& offset, const nf::Format& f,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
                                        const at::Tensor& rng_state, double scale, double dropout_p) {
  check_lora_linear_backward_args(op, grad_out, x, std::nullopt, lora_a, lora_b, u, rng_state, scale, dropout_p);
  const int64_t out_features = lora_b.size(0);
  return check_nf_linear_args(op, grad_out, out_features, packed, absmax, nested_absmax, offset, f, out_features,
                              x.size(-1), std::nullopt);
}

void check_nf_statistics_frozen(const char* op, const at::Tensor& absmax,
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

namespace {

using CodeTables = std::array<std::vector<float>, nf::kMaxBits + 1>;  // one per width 2 .. 8

const std::vector<float>& table_of(const CodeTables& tables, int64_t bits) {
  TORCH_CHECK(bits >= nf::kMinBits && bits <= nf::kMaxBits, "lorafuse: no code of ", bits, " bits");
  return tables[static_cast<size_t>(bits)];
}

}  // namespace

const std::vector<float>& statistics_code(int64_t stat_bits) {
  static const CodeTables tables = [] {
    CodeTables t;
    for (int64_t b = nf::kMinBits; b <= nf::kMaxBits; ++b) {
      if (b == 8) {
        t[b].assign(dynamic_code().begin(), dynamic_code().end());
        continue;
      }
      const int64_t levels = (int64_t{1} << b) - 1;
      for (int64_t k = 0; k <= levels; ++k) t[b].push_back(static_cast<float>(k) / static_cast<float>(levels));
    }
    return t;
  }();
  return table_of(tables, stat_bits);
}

const std::vector<float>& weight_code(int64_t bits) {
  static const CodeTables tables = [] {
    CodeTables t;
    for (int b = nf::kMinBits; b <= nf::kMaxBits; ++b) t[static_cast<size_t>(b)] = nf::code(b);
    return t;
  }();
  return table_of(tables, bits);
}

const std::vector<uint8_t>& dynamic_lut() {
  static const std::vector<uint8_t> lut = [] {
    std::vector<uint8_t> table(nf4::kLutSize);
    nf4::build_lut(dynamic_code().data(), table.data());
    return table;
  }();
  return lut;
}

at::Tensor statistics_offset(const nf::Format& f, const at::Tensor& absmax) {
  return f.dynamic_statistics() ? at::mean(absmax) : at::min(absmax);
}

}  // namespace lorafuse::detail

// The public rule (lorafuse/ops/nf.h), here beside the format's other checks so that every target that reads the
// format (the checkpoint fuzzer too) has it.
namespace lorafuse {

bool is_bnb_nf4(at::IntArrayRef format, at::ScalarType stat_dtype) {
  TORCH_CHECK_VALUE(format.size() == 4, "lorafuse.is_bnb_nf4: format: expected [bits, blocksize, stat_bits, ",
                    "stat_blocksize], found ", format.size(), " values");
  const bool sizes =
      std::find(std::begin(nf4::kBlocksizes), std::end(nf4::kBlocksizes), format[1]) != std::end(nf4::kBlocksizes);
  const bool stats = (format[2] == 8 && format[3] == nf4::kNestedBlocksize && stat_dtype == at::kFloat) ||
                     (format[2] == 0 && format[3] == 0);
  return format[0] == 4 && sizes && stats;
}

}  // namespace lorafuse
