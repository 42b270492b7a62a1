// Hugging Face model checkpoints: a folder holding config.json and model.safetensors (or shards listed by
// model.safetensors.index.json), with the 4-bit layers of transformers + bitsandbytes (NF4) in their own format.
// The one implementation of that format: the C++ load/save (<lorafuse/quant/checkpoint.h>) and Python's
// lorafuse.load_checkpoint / save_checkpoint both go through it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <lorafuse/config/quant_config.h>
#include <lorafuse/io/nf4_tensors.h>
#include <lorafuse/io/safetensors.h>

#include <cstdint>
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

/// Writes checkpoint folder `dir` atomically (replace_folder_atomically): config.json and model.safetensors holding
/// `tensors` (metadata {"format": "pt"}, as transformers writes). config.json is `model_config_json` (a JSON object)
/// with its `quantization_config` derived from the NF4 weights among `tensors` (QuantConfig::to_hf_json: the most
/// common dtype of their quant_states as the compute dtype, double quantization if any is nested, and
/// `dense_modules`, the Linear layers left dense, as llm_int8_skip_modules), or removed when there are none. A
/// model.safetensors.index.json in `dir` and the shards it lists are dropped (they would describe the old model);
/// other files are kept.
void write_checkpoint(const std::string& dir, const std::string& model_config_json,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::vector<std::string>& dense_modules = {});

}  // namespace lorafuse::io
