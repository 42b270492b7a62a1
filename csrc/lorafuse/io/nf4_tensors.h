// One NF4 weight as a Hugging Face 4-bit checkpoint holds it (transformers + bitsandbytes' names, dtypes and
// quant_state JSON): written and read back with every rule checked. <lorafuse/io/checkpoint.h> reads and writes whole
// checkpoint folders with it; fuzz/safetensors_fuzzer.cpp fuzzes the reader.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <lorafuse/ops/nf4.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse::io {

/// The suffix of the tensor holding an NF4 weight's quant_state JSON (after the weight's name).
constexpr const char* kNf4StateSuffix = ".quant_state.bitsandbytes__nf4";
/// The suffix of the tensor holding the quant_state JSON of a weight in another format of the family (lorafuse's own:
/// transformers does not read it).
constexpr const char* kNfStateSuffix = ".quant_state.lorafuse__nf";

/// One quantized weight in a checkpoint: quantize_nf's outputs and what the quant_state records beside them.
struct Nf4Tensor {
  /// packed uint8 [ceil(n·bits/8), 1]; absmax; nested_absmax and offset ([0] each when not double-quantized).
  Nf4Weight weight;
  int64_t blocksize = 64;
  /// The dense weight's shape and dtype (the dtype bitsandbytes dequantizes to).
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kFloat;
  /// The format [bits, blocksize, stat_bits, stat_blocksize] and the dtype of the statistics' scales; an empty format
  /// is bitsandbytes' NF4 with this blocksize (double-quantized when nested_absmax is given). Read back, it is always
  /// filled in.
  std::vector<int64_t> format;
  at::ScalarType stat_dtype = at::kFloat;

  bool nested() const { return weight.nested_absmax.defined() && weight.nested_absmax.numel() > 0; }
  /// The format, filled in for bitsandbytes' NF4.
  std::vector<int64_t> format_list() const;
  /// Whether this is bitsandbytes' NF4 (written in its layout, which transformers reads).
  bool is_nf4() const;
};

/// The checkpoint tensors of the weight `name` (e.g. "model.layers.0.mlp.up_proj.weight") stored as `t`, as
/// transformers writes them: `name` (uint8 [ceil(n/2), 1]), name.absmax (uint8 when nested, else float32),
/// name.quant_map (float32 [16], the NF4 code), when nested name.nested_absmax and name.nested_quant_map (float32
/// [256], the dynamic code), and name + kNf4StateSuffix: the UTF-8 bytes (uint8 [len]) of a JSON object with
/// quant_type, blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype, nested_offset.
/// Any other format is written in lorafuse's layout: the same tensor names (quant_map: the NF-b code, 2^bits values;
/// nested_quant_map: the statistics' code, 2^stat_bits values; nested_absmax in the scales' dtype) and name +
/// kNfStateSuffix, a JSON object with quant_type "nf", bits, blocksize, dtype, shape and, when nested, stat_bits,
/// stat_blocksize, stat_dtype, offset.
std::vector<std::pair<std::string, at::Tensor>> nf4_checkpoint_tensors(const std::string& name, const Nf4Tensor& t);

/// If `tensor_name` is a quantized weight's quant_state (bitsandbytes' NF4 or lorafuse's format), that weight's name;
/// else nullopt.
std::optional<std::string> nf4_weight_of_state(const std::string& tensor_name);

/// Reads the NF4 weight `name` back from a checkpoint's tensors (`get` returns the tensor of that name, or an
/// undefined tensor when there is none), checking everything against the quant_state JSON: its syntax, fields and
/// their types (unknown fields refused), quant_type nf4, an allowed blocksize, dtype float32/bfloat16/float16,
/// nested fields all present or all absent (nested_blocksize 256, nested_dtype float32, a finite nested_offset); each
/// tensor present with the dtype and element count the shape and block size imply (the packed bytes may be stored
/// in another dtype, bitsandbytes' quant_storage: they are read as bytes); quant_map equal to NF4's code and
/// nested_quant_map to the dynamic code (any other code would decode to other values); finite statistics. A weight in
/// lorafuse's layout is checked the same way against its format (lorafuse/ops/nf.h). ValueErrors name `what`, the
/// tensor, what was found and what was expected.
Nf4Tensor read_nf4_tensors(const std::string& name, const std::function<at::Tensor(const std::string&)>& get,
                           const std::string& what);

}  // namespace lorafuse::io
