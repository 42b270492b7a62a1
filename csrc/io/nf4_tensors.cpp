// bitsandbytes' NF4 tensors in a Hugging Face checkpoint (see <lorafuse/io/nf4_tensors.h>).
#include <ATen/ops/all.h>
#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/lt.h>
#include <c10/util/Exception.h>
#include <lorafuse/io/nf4_tensors.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "csrc/config/json.h"
#include "csrc/ops/common/nf_checks.h"
#include "cuda/shared/nf4.h"
#include "cuda/shared/nf_code.h"
#include "cuda/shared/nf_format.h"

namespace lorafuse::io {
namespace {

using json = nlohmann::ordered_json;
using lorafuse::detail::parse_json;

constexpr std::pair<const char*, at::ScalarType> kWeightDtypes[] = {
    {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};

const char* weight_dtype_name(at::ScalarType dtype) {
  for (const auto& [n, d] : kWeightDtypes) {
    if (d == dtype) return n;
  }
  TORCH_CHECK_TYPE(false, "nf4 checkpoint: dtype: expected float32, bfloat16 or float16, found ", dtype);
}

at::Tensor float_table(const float* values, int64_t n) {
  at::Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(t.data_ptr<float>(), values, sizeof(float) * n);
  return t;
}

at::Tensor nf4_code() { return float_table(nf4::kCode, 16); }
at::Tensor dynamic_code() { return float_table(lorafuse::detail::dynamic_code().data(), 256); }

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// A checkpoint tensor that must be there, a 1-D or any-shaped `dtype` tensor of `numel` elements; returned flat.
at::Tensor expect(const std::function<at::Tensor(const std::string&)>& get, const std::string& tensor,
                  at::ScalarType dtype, int64_t numel, const std::string& where, const std::string& why) {
  at::Tensor t = get(tensor);
  TORCH_CHECK_VALUE(t.defined(), where, ": the checkpoint has no \"", tensor, "\" (", why, ")");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, where, ": \"", tensor, "\" is ", t.scalar_type(), "; expected ", dtype,
                    " (", why, ")");
  TORCH_CHECK_VALUE(t.numel() == numel, where, ": \"", tensor, "\" has shape ", shape_str(t), " (", t.numel(),
                    " elements); expected ", numel, " (", why, ")");
  return t.contiguous().reshape({numel});
}

void expect_code(const at::Tensor& t, const at::Tensor& code, const std::string& tensor, const std::string& where,
                 const char* which) {
  const float* a = t.data_ptr<float>();
  const float* b = code.data_ptr<float>();
  for (int64_t i = 0; i < code.numel(); ++i) {
    TORCH_CHECK_VALUE(a[i] == b[i], where, ": \"", tensor, "\"[", i, "] is ", a[i], " but ", which, " has ", b[i],
                      "; lorafuse decodes with that code only, so this weight would load as other values");
  }
}

void expect_finite_statistics(const at::Tensor& t, const std::string& tensor, const std::string& where) {
  TORCH_CHECK_VALUE(t.isfinite().all().item<bool>() && !t.lt(0).any().item<bool>(), where, ": \"", tensor,
                    "\" holds negative, NaN or infinite block maxima; expected finite values >= 0");
}

int64_t int_field(const json& state, const char* key, const std::string& where) {
  const auto& v = state[key];
  TORCH_CHECK_VALUE(v.is_number_integer(), where, ": quant_state: ", key, ": expected an integer, found ", v.dump());
  return v.get<int64_t>();
}

float finite_float_field(const json& state, const char* key, const std::string& where) {
  const auto& v = state[key];
  TORCH_CHECK_VALUE(v.is_number(), where, ": quant_state: ", key, ": expected a number, found ", v.dump());
  const float value = static_cast<float>(v.get<double>());
  TORCH_CHECK_VALUE(std::isfinite(value), where, ": quant_state: ", key, ": expected a finite float32, found ",
                    v.dump());
  return value;
}

// Statistics without double quantization: one float32 absmax per block, and no nested tensors in the checkpoint
// (`fields` names the quant_state fields that would have announced them).
void read_plain_absmax(const std::function<at::Tensor(const std::string&)>& get, const std::string& name,
                       int64_t blocks, const std::string& where, const char* fields, NfWeight& weight) {
  for (const char* extra : {".nested_absmax", ".nested_quant_map"}) {
    TORCH_CHECK_VALUE(!get(name + extra).defined(), where, ": the checkpoint has \"", name, extra,
                      "\" but the quant_state has no ", fields, " fields (double quantization)");
  }
  const std::string absmax_name = name + ".absmax";
  weight.absmax = expect(get, absmax_name, at::kFloat, blocks, where, "one float32 per block");
  expect_finite_statistics(weight.absmax, absmax_name, where);
  weight.nested_absmax = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  weight.offset = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
}

std::string string_field(const json& state, const char* key, const std::string& where) {
  const auto& v = state[key];
  TORCH_CHECK_VALUE(v.is_string(), where, ": quant_state: ", key, ": expected a string, found ", v.dump());
  return v.get<std::string>();
}

at::Tensor to_bytes_tensor(const std::string& text) {
  at::Tensor bytes = at::empty({static_cast<int64_t>(text.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(bytes.data_ptr(), text.data(), text.size());
  return bytes;
}

at::Tensor float_vector(const std::vector<float>& v) { return float_table(v.data(), static_cast<int64_t>(v.size())); }

// lorafuse's layout for a format other than bitsandbytes' NF4.
std::vector<std::pair<std::string, at::Tensor>> nf_checkpoint_tensors(const std::string& name, const Nf4Tensor& t) {
  const auto fmt = t.format_list();
  const nf::Format f = lorafuse::detail::parse_nf_format("nf checkpoint", fmt);
  const auto& w = t.weight;
  json state = json::object();
  state["quant_type"] = "nf";
  state["bits"] = f.bits;
  state["blocksize"] = f.blocksize;
  state["dtype"] = weight_dtype_name(t.dtype);
  state["shape"] = t.shape;
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back(name, w.packed.detach().to(at::kCPU).contiguous().reshape({-1, 1}));
  out.emplace_back(name + ".absmax", w.absmax.detach().to(at::kCPU).contiguous().reshape({-1}));
  out.emplace_back(name + ".quant_map", float_vector(nf::code(static_cast<int>(f.bits))));
  if (f.nested()) {
    state["stat_bits"] = f.stat_bits;
    state["stat_blocksize"] = f.stat_blocksize;
    state["stat_dtype"] = weight_dtype_name(t.stat_dtype);
    state["offset"] = static_cast<double>(w.offset.detach().to(at::kCPU).reshape({}).item<float>());
    out.emplace_back(name + ".nested_absmax", w.nested_absmax.detach().to(at::kCPU).contiguous().reshape({-1}));
    out.emplace_back(name + ".nested_quant_map", float_vector(lorafuse::detail::statistics_code(f.stat_bits)));
  }
  out.emplace_back(name + kNfStateSuffix, to_bytes_tensor(state.dump()));
  return out;
}

at::ScalarType dtype_field(const json& state, const char* key, const std::string& where) {
  const std::string name = string_field(state, key, where);
  for (const auto& [n, d] : kWeightDtypes) {
    if (name == n) return d;
  }
  TORCH_CHECK_VALUE(false, where, ": quant_state: ", key,
                    ": expected \"float32\", \"bfloat16\" or \"float16\", found \"", name, "\"");
}

// The dense shape of a quant_state (positive sizes, at most 2^48 elements) and its element count.
std::vector<int64_t> shape_field(const json& state, const std::string& where, int64_t& n) {
  const auto& shape = state["shape"];
  TORCH_CHECK_VALUE(shape.is_array() && !shape.empty(), where,
                    ": quant_state: shape: expected a non-empty list of sizes, found ", shape.dump());
  std::vector<int64_t> out;
  n = 1;
  for (const auto& d : shape) {
    TORCH_CHECK_VALUE(d.is_number_integer() && d.get<int64_t>() > 0, where,
                      ": quant_state: shape: expected positive sizes, found ", shape.dump());
    const int64_t size = d.get<int64_t>();
    TORCH_CHECK_VALUE(n <= (int64_t{1} << 48) / size, where, ": quant_state: shape ", shape.dump(),
                      " is too large (more than 2^48 elements)");
    n *= size;
    out.push_back(size);
  }
  return out;
}

// A weight in lorafuse's layout, every rule checked (the counterpart of the NF4 reader below).
Nf4Tensor read_nf_tensors(const std::string& name, const std::function<at::Tensor(const std::string&)>& get,
                          const std::string& where, const json& state) {
  static const std::set<std::string> kFields = {"quant_type", "bits",           "blocksize",  "dtype", "shape",
                                                "stat_bits",  "stat_blocksize", "stat_dtype", "offset"};
  for (const auto& [key, unused] : state.items()) {
    TORCH_CHECK_VALUE(kFields.count(key) != 0, where, ": quant_state: unknown field \"", key,
                      "\" (expected quant_type, bits, blocksize, dtype, shape, stat_bits, stat_blocksize, stat_dtype, "
                      "offset); refused rather than guessed at");
  }
  for (const char* key : {"quant_type", "bits", "blocksize", "dtype", "shape"}) {
    TORCH_CHECK_VALUE(state.contains(key), where, ": quant_state: the field \"", key, "\" is missing");
  }
  TORCH_CHECK_VALUE(string_field(state, "quant_type", where) == "nf", where,
                    ": quant_state: quant_type: expected \"nf\" in lorafuse's layout, found ",
                    state["quant_type"].dump());
  const int nested_fields = static_cast<int>(state.contains("stat_bits")) +
                            static_cast<int>(state.contains("stat_blocksize")) +
                            static_cast<int>(state.contains("stat_dtype")) + static_cast<int>(state.contains("offset"));
  TORCH_CHECK_VALUE(nested_fields == 0 || nested_fields == 4, where,
                    ": quant_state: stat_bits, stat_blocksize, stat_dtype and offset go together (double "
                    "quantization); found ",
                    nested_fields, " of them");
  const bool nested = nested_fields == 4;
  Nf4Tensor out;
  out.format = {int_field(state, "bits", where), int_field(state, "blocksize", where),
                nested ? int_field(state, "stat_bits", where) : 0,
                nested ? int_field(state, "stat_blocksize", where) : 0};
  const nf::Format f = lorafuse::detail::parse_nf_format((where + ": quant_state").c_str(), out.format);
  out.blocksize = f.blocksize;
  out.dtype = dtype_field(state, "dtype", where);
  int64_t n = 0;
  out.shape = shape_field(state, where, n);
  const int64_t blocks = nf::blocks_of(n, f.blocksize);
  out.weight.packed = expect(get, name, at::kByte, nf::stream_bytes(n, f.bits), where, "the packed codes")
                          .reshape({nf::stream_bytes(n, f.bits), 1});
  const std::string absmax_name = name + ".absmax";
  if (nested) {
    out.stat_dtype = dtype_field(state, "stat_dtype", where);
    const float offset_value = finite_float_field(state, "offset", where);
    out.weight.absmax =
        expect(get, absmax_name, at::kByte, nf::stream_bytes(blocks, f.stat_bits), where, "the statistics' codes");
    out.weight.nested_absmax = expect(get, name + ".nested_absmax", out.stat_dtype,
                                      nf::blocks_of(blocks, f.stat_blocksize), where, "one scale per statistics block");
    expect_finite_statistics(out.weight.nested_absmax.to(at::kFloat), name + ".nested_absmax", where);
    const auto code = lorafuse::detail::statistics_code(f.stat_bits);
    const at::Tensor map = expect(get, name + ".nested_quant_map", at::kFloat, static_cast<int64_t>(code.size()), where,
                                  "the statistics' code");
    expect_code(map, float_vector(code), name + ".nested_quant_map", where, "the statistics' code");
    out.weight.offset = at::full({}, offset_value, at::TensorOptions().dtype(at::kFloat));
  } else {
    read_plain_absmax(get, name, blocks, where, "statistics", out.weight);
  }
  const auto code = nf::code(static_cast<int>(f.bits));
  const at::Tensor map =
      expect(get, name + ".quant_map", at::kFloat, static_cast<int64_t>(code.size()), where, "the NF code values");
  expect_code(map, float_vector(code), name + ".quant_map", where, "the NF code");
  return out;
}

}  // namespace

std::vector<int64_t> Nf4Tensor::format_list() const {
  if (!format.empty()) return format;
  return nested() ? std::vector<int64_t>{4, blocksize, 8, nf4::kNestedBlocksize}
                  : std::vector<int64_t>{4, blocksize, 0, 0};
}

bool Nf4Tensor::is_nf4() const { return lorafuse::is_bnb_nf4(format_list(), stat_dtype); }

std::vector<std::pair<std::string, at::Tensor>> nf4_checkpoint_tensors(const std::string& name, const Nf4Tensor& t) {
  if (!t.is_nf4()) return nf_checkpoint_tensors(name, t);
  const auto& w = t.weight;
  TORCH_CHECK_VALUE(w.packed.defined() && w.absmax.defined(), "nf4 checkpoint: \"", name,
                    "\": packed and absmax are required");
  json state = json::object();
  state["quant_type"] = "nf4";
  state["blocksize"] = t.blocksize;
  state["dtype"] = weight_dtype_name(t.dtype);
  state["shape"] = t.shape;
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back(name, w.packed.detach().to(at::kCPU).contiguous().reshape({-1, 1}));
  out.emplace_back(name + ".absmax", w.absmax.detach().to(at::kCPU).contiguous().reshape({-1}));
  out.emplace_back(name + ".quant_map", nf4_code());
  if (t.nested()) {
    state["nested_blocksize"] = nf4::kNestedBlocksize;
    state["nested_dtype"] = "float32";
    state["nested_offset"] = static_cast<double>(w.offset.detach().to(at::kCPU).reshape({}).item<float>());
    out.emplace_back(name + ".nested_absmax", w.nested_absmax.detach().to(at::kCPU).contiguous().reshape({-1}));
    out.emplace_back(name + ".nested_quant_map", dynamic_code());
  }
  const std::string text = state.dump();
  at::Tensor bytes = at::empty({static_cast<int64_t>(text.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(bytes.data_ptr(), text.data(), text.size());
  out.emplace_back(name + kNf4StateSuffix, bytes);
  return out;
}

std::optional<std::string> nf4_weight_of_state(const std::string& tensor_name) {
  for (const std::string suffix : {kNf4StateSuffix, kNfStateSuffix}) {
    if (tensor_name.size() > suffix.size() &&
        tensor_name.compare(tensor_name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      return tensor_name.substr(0, tensor_name.size() - suffix.size());
    }
  }
  return std::nullopt;
}

Nf4Tensor read_nf4_tensors(const std::string& name, const std::function<at::Tensor(const std::string&)>& get,
                           const std::string& what) {
  const std::string where = what + ": \"" + name + "\"";
  const bool bnb = get(name + kNf4StateSuffix).defined(), ours = get(name + kNfStateSuffix).defined();
  TORCH_CHECK_VALUE(!(bnb && ours), where, ": the checkpoint has both \"", name, kNf4StateSuffix, "\" and \"", name,
                    kNfStateSuffix, "\"; one weight has one quant_state");
  const std::string state_name = name + (ours ? kNfStateSuffix : kNf4StateSuffix);
  const at::Tensor state_bytes = get(state_name);
  TORCH_CHECK_VALUE(state_bytes.defined(), where, ": the checkpoint has no \"", state_name, "\"");
  TORCH_CHECK_VALUE(state_bytes.scalar_type() == at::kByte && state_bytes.dim() == 1, where, ": \"", state_name,
                    "\" is ", state_bytes.scalar_type(), " ", shape_str(state_bytes),
                    "; expected uint8 [n] (the bytes of a JSON object)");
  const at::Tensor contiguous_state = state_bytes.contiguous();
  const char* text = static_cast<const char*>(contiguous_state.const_data_ptr());
  const json state = parse_json(text, text + contiguous_state.numel(), where + ": quant_state");
  TORCH_CHECK_VALUE(state.is_object(), where, ": quant_state: expected a JSON object, found ", state.type_name());
  if (ours) return read_nf_tensors(name, get, where, state);
  static const std::set<std::string> kFields = {"quant_type",       "blocksize",    "dtype",        "shape",
                                                "nested_blocksize", "nested_dtype", "nested_offset"};
  for (const auto& [key, unused] : state.items()) {
    TORCH_CHECK_VALUE(kFields.count(key) != 0, where, ": quant_state: unknown field \"", key,
                      "\" (expected quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, "
                      "nested_offset); refused rather than guessed at");
  }
  for (const char* key : {"quant_type", "blocksize", "dtype", "shape"}) {
    TORCH_CHECK_VALUE(state.contains(key), where, ": quant_state: the field \"", key, "\" is missing");
  }
  const std::string quant_type = string_field(state, "quant_type", where);
  TORCH_CHECK_VALUE(quant_type == "nf4", where, ": quant_state: quant_type: lorafuse has NF4 kernels only; found \"",
                    quant_type, "\"");
  Nf4Tensor out;
  out.blocksize = int_field(state, "blocksize", where);
  TORCH_CHECK_VALUE(
      std::find(std::begin(nf4::kBlocksizes), std::end(nf4::kBlocksizes), out.blocksize) != std::end(nf4::kBlocksizes),
      where, ": quant_state: blocksize: expected 32, 64, 128, 256, 512, 1024, 2048 or 4096, found ", out.blocksize);
  const std::string dtype = string_field(state, "dtype", where);
  bool known_dtype = false;
  for (const auto& [n, d] : kWeightDtypes) {
    if (dtype == n) out.dtype = d, known_dtype = true;
  }
  TORCH_CHECK_VALUE(known_dtype, where,
                    ": quant_state: dtype: expected \"float32\", \"bfloat16\" or \"float16\", found \"", dtype, "\"");
  int64_t n = 0;
  out.shape = shape_field(state, where, n);
  const auto& shape = state["shape"];
  const int nested_fields = static_cast<int>(state.contains("nested_blocksize")) +
                            static_cast<int>(state.contains("nested_dtype")) +
                            static_cast<int>(state.contains("nested_offset"));
  TORCH_CHECK_VALUE(nested_fields == 0 || nested_fields == 3, where,
                    ": quant_state: nested_blocksize, nested_dtype and nested_offset go together (double "
                    "quantization); found ",
                    nested_fields, " of them");
  const bool nested = nested_fields == 3;
  const int64_t blocks = lorafuse::detail::nf4_blocks(n, out.blocksize);

  // The packed codes: ceil(n/2) bytes, in whatever dtype bitsandbytes stored them (quant_storage).
  const at::Tensor packed = get(name);
  TORCH_CHECK_VALUE(packed.defined(), where, ": the checkpoint has no \"", name, "\" (the packed 4-bit codes)");
  const int64_t bytes = (n + 1) / 2;
  TORCH_CHECK_VALUE(packed.numel() * static_cast<int64_t>(packed.element_size()) == bytes && !packed.is_complex(),
                    where, ": \"", name, "\" holds ", packed.numel() * static_cast<int64_t>(packed.element_size()),
                    " bytes (", packed.scalar_type(), " ", shape_str(packed), "); the shape ", shape.dump(),
                    " packs into ", bytes, " bytes");
  out.weight.packed = packed.contiguous().reshape({-1}).view(at::kByte).reshape({bytes, 1});

  const std::string absmax_name = name + ".absmax";
  if (nested) {
    TORCH_CHECK_VALUE(int_field(state, "nested_blocksize", where) == nf4::kNestedBlocksize, where,
                      ": quant_state: nested_blocksize: expected ", nf4::kNestedBlocksize, " (bitsandbytes'), found ",
                      state["nested_blocksize"].dump());
    const std::string nested_dtype = string_field(state, "nested_dtype", where);
    TORCH_CHECK_VALUE(nested_dtype == "float32", where, ": quant_state: nested_dtype: expected \"float32\", found \"",
                      nested_dtype, "\"");
    const float offset_value = finite_float_field(state, "nested_offset", where);
    out.weight.absmax = expect(get, absmax_name, at::kByte, blocks, where, "8-bit codes, one per block");
    out.weight.nested_absmax =
        expect(get, name + ".nested_absmax", at::kFloat, lorafuse::detail::nf4_blocks(blocks, nf4::kNestedBlocksize),
               where, "one per 256 blocks");
    expect_finite_statistics(out.weight.nested_absmax, name + ".nested_absmax", where);
    const at::Tensor nested_map =
        expect(get, name + ".nested_quant_map", at::kFloat, 256, where, "the dynamic 8-bit code");
    expect_code(nested_map, dynamic_code(), name + ".nested_quant_map", where, "bitsandbytes' dynamic code");
    out.weight.offset = at::full({}, offset_value, at::TensorOptions().dtype(at::kFloat));
  } else {
    read_plain_absmax(get, name, blocks, where, "nested", out.weight);
  }
  const at::Tensor code = expect(get, name + ".quant_map", at::kFloat, 16, where, "the 16 NF4 code values");
  expect_code(code, nf4_code(), name + ".quant_map", where, "NF4's code");
  out.format = out.format_list();
  return out;
}

}  // namespace lorafuse::io
