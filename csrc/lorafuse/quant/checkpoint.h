// Loading and saving a model's weights as a Hugging Face checkpoint folder, 4-bit layers included
// (transformers + bitsandbytes' format, <lorafuse/io/checkpoint.h>): a model quantized by transformers loads into
// lorafuse, and one quantized by lorafuse loads into transformers.
#pragma once

#include <lorafuse/config/quant_config.h>
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/nn/linear4bit.h>
#include <torch/arg.h>
#include <torch/nn/module.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse {

struct LoadCheckpointOptions {
  /// Quantize the Linear layers that the checkpoint holds dense while they load (one at a time, so the dense
  /// model never exists as a whole), except config.modules_to_not_convert. nullopt: dense layers stay dense.
  TORCH_ARG(std::optional<QuantConfig>, quantize) = std::nullopt;
  /// Every parameter and buffer of the model must be in the checkpoint and every tensor of the checkpoint used.
  TORCH_ARG(bool, strict) = true;
};

/// Loads the checkpoint folder `dir` (config.json; model.safetensors or the shards of model.safetensors.index.json)
/// into `module`, whose parameters may be on the meta device (a skeleton: nothing allocated until loaded):
///   - a Linear layer whose weight the checkpoint holds in NF4 becomes a lorafuse::nn::Linear4bit with those bytes,
///     computing in config.json's bnb_4bit_compute_dtype (else the weight's dtype); with options.quantize, a dense
///     one becomes one too. Such layers must sit where they can be swapped (a LinearSlot or a ModuleDict).
///   - every other parameter and buffer takes the checkpoint's values in the model's own dtype and device.
/// Everything is read and checked before the model changes: a missing or unexpected tensor (strict), a shape that
/// differs, a 4-bit weight where the model has no Linear layer, a model with LoRA layers (load the base first, then
/// inject_lora). Returns the paths of the layers now in 4 bits.
std::vector<std::string> load_checkpoint(torch::nn::Module& module, const std::string& dir,
                                         const LoadCheckpointOptions& options = LoadCheckpointOptions());

/// What load_checkpoint reads into a model, decided (and every tensor read or quantized) before the model changes:
/// the one implementation of its rules, which the C++ load_checkpoint and Python's lorafuse.load_checkpoint both run
/// over their own description of the model and then apply to their own modules.
struct CheckpointLayer {  // a dense Linear or 4-bit layer of the model
  std::string path;
  int64_t in_features = 0, out_features = 0;
  bool has_bias = false;
  /// For a 4-bit layer: its blocksize, double quantization and compute dtype (nullopt: the checkpoint weight's dtype),
  /// with which a dense weight in the checkpoint is quantized for it. nullopt: a dense layer.
  std::optional<QuantConfig> nf4;
};
struct CheckpointState {           // a parameter or persistent buffer, each tensor once
  std::vector<std::string> names;  // all its names (a tied weight has several); the first is its name
  std::vector<int64_t> shape;
  bool is_meta = false;
};
struct CheckpointLoadPlan {
  /// (index into the layers, the 4-bit layer that replaces it: its bytes read or quantized, on the CPU)
  std::vector<std::pair<size_t, std::shared_ptr<nn::Linear4bitImpl>>> layers;
  /// (the checkpoint tensor, index into the state) for every other parameter and buffer
  std::vector<std::pair<std::string, size_t>> assignments;
};
/// load_checkpoint's decisions for a model described by `layers`, `state` and `modules` (every module's path and type
/// name, for the error about a 4-bit weight where the model has no Linear layer); raises what load_checkpoint raises.
/// `replaceable(i)`, when given, runs for each layer that a 4-bit layer will replace, before anything of it is read
/// (a model that cannot swap that layer raises there).
CheckpointLoadPlan plan_checkpoint_load(const io::CheckpointReader& reader, const std::vector<CheckpointLayer>& layers,
                                        const std::vector<CheckpointState>& state,
                                        const std::map<std::string, std::string>& modules,
                                        const LoadCheckpointOptions& options,
                                        const std::function<void(size_t)>& replaceable = {});

/// Saves `module`'s weights as checkpoint folder `dir` (atomically; other files in it kept): each Linear4bit as
/// transformers stores a 4-bit layer, every other parameter and buffer as it is (a tensor shared under two names is
/// saved once, under the first). config.json is `model_config_json` (a JSON object: the model's Hugging Face config,
/// e.g. LlamaConfig::to_hf_json()) with quantization_config set when the model has 4-bit layers
/// (QuantConfig::to_hf_json: llm_int8_skip_modules lists the Linear layers left dense) and removed otherwise.
/// A model with LoRA layers is refused: save adapters with save_adapter, or merge_and_unload first.
void save_checkpoint(torch::nn::Module& module, const std::string& dir, const std::string& model_config_json = "{}");

}  // namespace lorafuse
