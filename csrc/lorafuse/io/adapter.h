// PEFT-format adapter files: adapter_config.json + adapter_model.safetensors. This is the one
// implementation of the format and of the tensor-name mapping; the C++ save_adapter/load_adapter
// (<lorafuse/peft/adapters.h>) and the Python front both go through it.
//
// Tensor names: base_model.model.<module path>.lora_A.weight [r, in] and ...lora_B.weight [out, r]; a DoRA adapter
// (use_dora) also ...lora_magnitude_vector [out]; with bias "all" or "lora_only" also the trained biases under
// base_model.model.<parameter path>; a module that modules_to_save trains whole, its state under
// base_model.model.<module path>.<key> (e.g. base_model.model.classifier.weight), as PEFT writes it.
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
/// Where PEFT's files keep the output projection's factors of an adapted attention module (ModuleInfo::is_attention)
/// at <path>: <path>.base_layer.out_proj.lora_A.weight / .lora_B.weight (its packed q/k/v projection's at <path>).
constexpr const char* kAttentionOutProj = ".base_layer.out_proj";

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

/// A module that the adapter trains whole (modules_to_save): its state (state_dict keys within the module → tensor).
struct SavedModule {
  std::string path;
  std::vector<std::pair<std::string, at::Tensor>> state;
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
  /// The modules that config.saved_modules() trains whole, in file order: the outermost module path of each tensor
  /// that ends with a saved_modules() entry.
  std::vector<SavedModule> saved_modules;
  /// Things worth telling the user that do not stop a load (an all-zero lora_B, unknown config fields).
  std::vector<std::string> warnings;
};

/// adapter_config.json text → LoraConfig. ValueErrors name the field: malformed JSON, a field of the wrong
/// type, a peft_type other than LORA, and every PEFT feature lorafuse does not support yet (lora_bias,
/// trainable_token_indices, init_lora_weights such as "eva", ...), named. Unknown fields are ignored with a warning
/// appended to `warnings`.
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
  /// An attention module's output projection (file path <path>.base_layer.out_proj; modules[index] is the attention
  /// module, lora_A [r, embed_dim], lora_B [embed_dim, r]).
  bool out_proj = false;
};

/// Matches `file` against a model's modules (path, type, is_linear, in/out features). ValueErrors: a module
/// in the file that the model lacks or that is not a Linear layer; A or B not matching the layer's
/// [r, in] / [out, r]; a Linear layer that the config targets but the file lacks, unless `partial`. An attention
/// module's two parts: the one at its path and the one at <path>.base_layer.out_proj (out_proj), both needed.
std::vector<LoadTarget> plan_adapter_load(const AdapterFile& file, const std::vector<ModuleInfo>& modules,
                                          bool partial);

/// A module that load_adapter gives the adapter's own copy to (modules_to_save): modules[index], the file's state.
struct SavedModuleLoad {
  size_t index;
  std::vector<std::pair<std::string, at::Tensor>> state;
};

/// Matches the file's saved modules (modules_to_save) against a model's modules: each must be a module that the
/// config's modules_to_save names there (select_saved_modules, warnings appended to `warnings`; `lora_targets`, the
/// plan_adapter_load result, none inside them). ValueErrors: a saved
/// module the model lacks or that modules_to_save does not name; a module it names that the file holds no state for,
/// unless `partial`. Whether the keys and shapes fit the module is the loader's check (it holds the module).
std::vector<SavedModuleLoad> plan_saved_modules_load(const AdapterFile& file, const std::vector<ModuleInfo>& modules,
                                                     bool partial, std::vector<std::string>& warnings,
                                                     const std::vector<LoadTarget>& lora_targets = {});

/// A ValueError naming `path` unless a file's `state` of a module kept whole fits the module's own state `own` (its
/// state_dict keys with their shapes): the same keys, each of the same shape.
void check_saved_state(const std::string& path, const std::vector<std::pair<std::string, std::vector<int64_t>>>& own,
                       const std::vector<std::pair<std::string, at::Tensor>>& state);

/// One layer's adapter to save: modules[index] with these options and weights.
struct SaveSource {
  size_t index;
  nn::LoraAdapterOptions adapter;
  at::Tensor lora_A;
  at::Tensor lora_B;
  at::Tensor magnitude;  // [out] for a DoRA adapter (adapter.use_dora()), else undefined
  /// An attention module's output projection (saved as <path>.base_layer.out_proj; modules[index] the attention).
  bool out_proj = false;
};

/// The AdapterFile for these layers of a model: a LoraConfig that selects exactly these layers in
/// `modules` (the layers' names, e.g. ["q_proj", "v_proj"], when they select exactly these layers, else
/// their full paths), r and lora_alpha the most common values with rank_pattern/alpha_pattern for the
/// others. ValueErrors: no layers; layers disagreeing on lora_dropout, use_rslora, bias, task_type or use_dora.
/// `saved`: the modules the adapter trains whole (modules_to_save), each module's path and state; the config's
/// modules_to_save names them (their last names when these name exactly them, else their paths).
AdapterFile describe_adapter(const std::vector<ModuleInfo>& modules, const std::vector<SaveSource>& layers,
                             std::vector<std::pair<std::string, at::Tensor>> biases = {},
                             std::vector<SavedModule> saved = {});

/// "base_model.model.<path>.lora_A.weight", "...lora_B.weight" and DoRA's "...lora_magnitude_vector" (which 'M'); an
/// embedding layer's "...lora_embedding_A" / "...lora_embedding_B".
std::string lora_tensor_name(const std::string& module_path, char which /* 'A', 'B' or 'M' */, bool embedding = false);

}  // namespace lorafuse::io
