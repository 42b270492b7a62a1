// PEFT-format adapter files: adapter_config.json + adapter_model.safetensors. This is the one
// implementation of the format and of the tensor-name mapping; the C++ save_adapter/load_adapter
// (<lorafuse/peft/adapters.h>) and the Python front both go through it.
//
// Tensor names: base_model.model.<module path>.lora_A.weight [r, in] and ...lora_B.weight [out, r]; a DoRA adapter
// (use_dora) also ...lora_magnitude_vector [out]; with bias "all" or "lora_only" also the trained biases under
// base_model.model.<parameter path>.
#pragma once

#include <ATen/core/Tensor.h>
#include <lorafuse/config/lora_config.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse::io {

constexpr const char* kAdapterConfigFile = "adapter_config.json";
constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";

/// One layer's adapter in a file.
struct AdapterLayer {
  /// Module path in the model, e.g. "model.layers.0.self_attn.q_proj".
  std::string path;
  at::Tensor lora_A;     // [r, in]
  at::Tensor lora_B;     // [out, r]
  at::Tensor magnitude;  // DoRA's magnitude vector [out]; undefined unless the config says use_dora
  /// An embedding layer's adapter: PEFT names its tensors ...lora_embedding_A [r, num_embeddings] and
  /// ...lora_embedding_B [embedding_dim, r] (no ".weight"), in and out being num_embeddings and embedding_dim.
  bool embedding = false;
};

/// An adapter as PEFT stores it.
struct AdapterFile {
  LoraConfig config;
  /// The config's target_modules was null (PEFT then picks by model type); the file's layers are the targets.
  bool targets_from_file = false;
  /// Informational, written to adapter_config.json.
  std::string base_model_name_or_path;
  /// In file order.
  std::vector<AdapterLayer> layers;
  /// Trained biases (bias "all" / "lora_only"): parameter path in the model → tensor.
  std::vector<std::pair<std::string, at::Tensor>> biases;
  /// Base weights of adapted layers, as PEFT saves them for embedding layers in target_modules (its
  /// save_embedding_layers: ...embed_tokens.base_layer.weight, ...lm_head.base_layer.weight): module path → the base
  /// layer's weight in its own layout. Loading puts them into the base layer, as PEFT does.
  std::vector<std::pair<std::string, at::Tensor>> base_weights;
  /// Things worth telling the user that do not stop a load (an all-zero lora_B, unknown config fields).
  std::vector<std::string> warnings;
};

/// adapter_config.json text → LoraConfig. ValueErrors name the field: malformed JSON, a field of the wrong
/// type, a peft_type other than LORA, and every PEFT feature lorafuse does not support yet (use_dora,
/// modules_to_save, lora_bias, init_lora_weights other than
/// true/false/"gaussian", ...), named. Unknown fields are ignored with a warning appended to `warnings`.
AdapterFile parse_adapter_config(const std::string& json_text, const std::string& what);

/// The adapter_config.json that PEFT writes for `file.config` (PEFT's LoraConfig fields).
std::string adapter_config_json(const AdapterFile& file);

/// Reads and validates the adapter in folder `dir`: the config (above), then the safetensors file (every
/// rule of the format) and its tensors: names in PEFT's scheme, lora_A and lora_B for each module, 2-D
/// floating tensors (float32/float16/bfloat16/float64), ranks agreeing with each other and with the config
/// (rank_pattern applied), finite values. Zero-element tensors are rejected with the reason they occur
/// (a save from partitioned training without gathering). An all-zero lora_B is a warning.
AdapterFile read_adapter(const std::string& dir);

/// Writes `file` into folder `dir` (created if absent) atomically as a pair: both files are written and
/// flushed into a new folder beside it, which then takes `dir`'s place in one rename (other files in `dir`
/// are kept, hard-linked into the new folder). A crash leaves the old adapter or the new one, never a mix.
void write_adapter(const std::string& dir, const AdapterFile& file);

/// One layer that load_adapter gives the adapter to: modules[index], its options, the file's weights.
struct LoadTarget {
  size_t index;
  nn::LoraAdapterOptions adapter;
  at::Tensor lora_A;
  at::Tensor lora_B;
  at::Tensor magnitude;    // [out] for a DoRA adapter, else undefined
  at::Tensor base_weight;  // the file's weight for the base layer (PEFT's save_embedding_layers), else undefined
};

/// Matches `file` against a model's modules (path, type, is_linear, in/out features). ValueErrors: a module
/// in the file that the model lacks or that is not a Linear layer; A or B not matching the layer's
/// [r, in] / [out, r]; a Linear layer that the config targets but the file lacks, unless `partial`.
std::vector<LoadTarget> plan_adapter_load(const AdapterFile& file, const std::vector<ModuleInfo>& modules,
                                          bool partial);

/// One layer's adapter to save: modules[index] with these options and weights.
struct SaveSource {
  size_t index;
  nn::LoraAdapterOptions adapter;
  at::Tensor lora_A;
  at::Tensor lora_B;
  at::Tensor magnitude;  // [out] for a DoRA adapter (adapter.use_dora()), else undefined
};

/// The AdapterFile for these layers of a model: a LoraConfig that selects exactly these layers in
/// `modules` (the layers' names, e.g. ["q_proj", "v_proj"], when they select exactly these layers, else
/// their full paths), r and lora_alpha the most common values with rank_pattern/alpha_pattern for the
/// others. ValueErrors: no layers; layers disagreeing on lora_dropout, use_rslora, bias, task_type or use_dora.
AdapterFile describe_adapter(const std::vector<ModuleInfo>& modules, const std::vector<SaveSource>& layers,
                             std::vector<std::pair<std::string, at::Tensor>> biases = {});

/// "base_model.model.<path>.lora_A.weight", "...lora_B.weight" and DoRA's "...lora_magnitude_vector" (which 'M'); an
/// embedding layer's "...lora_embedding_A" / "...lora_embedding_B".
std::string lora_tensor_name(const std::string& module_path, char which /* 'A', 'B' or 'M' */, bool embedding = false);

}  // namespace lorafuse::io
