// Hugging Face model checkpoints: a folder holding config.json and model.safetensors (or shards listed by
// model.safetensors.index.json), with the 4-bit layers of transformers + bitsandbytes (NF4) in their own format.
// The one implementation of that format: the C++ load/save (<lorafuse/quant/checkpoint.h>) and Python's
// lorafuse.load_checkpoint / save_checkpoint both go through it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <lorafuse/config/quant_config.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/ops/nf4.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse::io {

constexpr const char* kModelConfigFile = "config.json";
constexpr const char* kModelWeightsFile = "model.safetensors";
constexpr const char* kModelIndexFile = "model.safetensors.index.json";
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

/// A checkpoint folder, read lazily: the headers of its safetensors files are read and checked when it opens (the
/// shard list too: each listed name in its file, no name twice), each tensor when asked for.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& dir);

  const std::string& dir() const { return dir_; }
  /// config.json's text ("" when the folder has none).
  const std::string& config_json() const { return config_json_; }
  /// The quantization config.json announces (its quantization_config, QuantConfig::from_hf_json), if any.
  const std::optional<QuantConfig>& quant_config() const { return quant_config_; }
  /// Every tensor's name, file by file in file order.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  /// Where `name` lies (dtype and shape without reading it); ValueError if absent.
  const SafetensorsEntry& entry(const std::string& name) const;
  /// The tensor `name` on the CPU; ValueError if absent.
  at::Tensor read(const std::string& name) const;
  /// The names of the weights stored in NF4 (those with a quant_state tensor), in file order.
  std::vector<std::string> nf4_weights() const;
  /// read_nf4_tensors over this checkpoint.
  Nf4Tensor read_nf4(const std::string& name) const;
  /// The tensor names read_nf4(name) reads (name, name.absmax, ...), those present in the checkpoint.
  std::vector<std::string> nf4_tensor_names(const std::string& name) const;

 private:
  std::string dir_, config_json_;
  std::optional<QuantConfig> quant_config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index in files_
};

/// Writes checkpoint folder `dir` atomically (replace_folder_atomically): config.json holding `config_json` and
/// model.safetensors holding `tensors` (metadata {"format": "pt"}, as transformers writes). A
/// model.safetensors.index.json in `dir` and the shards it lists are dropped (they would describe the old model);
/// other files are kept.
void write_checkpoint(const std::string& dir, const std::string& config_json,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors);

}  // namespace lorafuse::io
