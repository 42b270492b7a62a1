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

/// One weight stored in NF4: quantize_nf4's outputs and what bitsandbytes' quant_state records beside them.
struct Nf4Tensor {
  /// packed uint8 [ceil(n/2), 1]; absmax; nested_absmax and offset ([0] each when not double-quantized).
  Nf4Weight weight;
  int64_t blocksize = 64;
  /// The dense weight's shape and dtype (the dtype bitsandbytes dequantizes to).
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kFloat;

  bool nested() const { return weight.nested_absmax.defined() && weight.nested_absmax.numel() > 0; }
};

/// The checkpoint tensors of the weight `name` (e.g. "model.layers.0.mlp.up_proj.weight") stored as `t`, as
/// transformers writes them: `name` (uint8 [ceil(n/2), 1]), name.absmax (uint8 when nested, else float32),
/// name.quant_map (float32 [16], the NF4 code), when nested name.nested_absmax and name.nested_quant_map (float32
/// [256], the dynamic code), and name + kNf4StateSuffix: the UTF-8 bytes (uint8 [len]) of a JSON object with
/// quant_type, blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype, nested_offset.
std::vector<std::pair<std::string, at::Tensor>> nf4_checkpoint_tensors(const std::string& name, const Nf4Tensor& t);

/// If `tensor_name` is an NF4 weight's quant_state, that weight's name; else nullopt.
std::optional<std::string> nf4_weight_of_state(const std::string& tensor_name);

/// Reads the NF4 weight `name` back from a checkpoint's tensors (`get` returns the tensor of that name, or an
/// undefined tensor when there is none), checking everything against the quant_state JSON: its syntax, fields and
/// their types (unknown fields refused), quant_type nf4, an allowed blocksize, dtype float32/bfloat16/float16,
/// nested fields all present or all absent (nested_blocksize 256, nested_dtype float32, a finite nested_offset); each
/// tensor present with the dtype and element count the shape and block size imply (the packed bytes may be stored
/// in another dtype, bitsandbytes' quant_storage: they are read as bytes); quant_map equal to NF4's code and
/// nested_quant_map to the dynamic code (any other code would decode to other values); finite statistics. ValueErrors
/// name `what`, the tensor, what was found and what was expected.
Nf4Tensor read_nf4_tensors(const std::string& name, const std::function<at::Tensor(const std::string&)>& get,
                           const std::string& what);

}  // namespace lorafuse::io
