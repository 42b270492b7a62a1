// Saving and loading adapters of a LibTorch model in PEFT's format, and swapping them at run time.
//
// Thread-safety contract. On one model, these may run at the same time:
//   - forward on any number of threads, each choosing its adapter with a lorafuse::AdapterScope (or
//     running the model's active adapter), with autograd off or on;
//   - one thread calling load_adapter under a new name on a model that already has an active adapter and
//     LoRA layers for every layer the file adapts (a file without biases), and delete_adapter of an adapter that is
//     neither active nor in use by a running forward (a forward that started with it finishes with it).
// Everything else changes the model and must not overlap anything: inject_lora, a load_adapter that has
// to wrap new layers or that loads biases, set_adapter, merge/unmerge, enable/disable, to(), training
// steps, load/save of module archives. Inference with a per-thread adapter never needs the active one.
#pragma once

#include <lorafuse/io/adapter.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/peft/inject.h>
#include <torch/arg.h>
#include <torch/nn/module.h>

#include <string>

namespace lorafuse {

using nn::AdapterScope;

/// Writes adapter `adapter_name` of `module` to folder `dir` as PEFT does (adapter_config.json +
/// adapter_model.safetensors; see io::write_adapter for the atomic replacement). The config selects
/// exactly the layers that have the adapter (see io::describe_adapter). Tensors are written as the layer
/// holds them (float32 for a float16/bfloat16 base). With bias "all" / "lora_only" the trained biases are
/// written too, as PEFT writes them.
void save_adapter(torch::nn::Module& module, const std::string& dir, const std::string& adapter_name = "default");

struct LoadAdapterOptions {
  /// Load even if the file lacks weights for some layers that its config targets in this model (those
  /// layers then do not get the adapter). Off: that is an error naming the layers.
  TORCH_ARG(bool, partial) = false;
  /// PEFT's is_trainable. Off (the default, as PEFT): the loaded adapter is frozen and the model is put in eval mode
  /// (inference; a model in eval mode already is left untouched, so loading beside running forwards stays safe);
  /// adapters already there keep their state. On: it trains like one from inject_lora once it is active (at once on a
  /// model without LoRA layers; beside other adapters it waits, inactive and frozen, for set_adapter — PEFT makes
  /// it trainable at once: lorafuse trains the active adapter only).
  TORCH_ARG(bool, is_trainable) = false;
  /// PEFT's autocast_adapter_dtype: true keeps a float16/bfloat16 base's adapters in float32; false makes them in the
  /// base's dtype (the file's tensors are cast to it).
  TORCH_ARG(bool, autocast_adapter_dtype) = true;
};

/// Loads the adapter in folder `dir` (PEFT's format) under `adapter_name`.
///   - On a model without LoRA layers it injects them from the file's adapter_config.json, as PEFT's
///     from_pretrained does; the adapter becomes active (frozen, the model in eval mode, unless
///     options.is_trainable: then it trains like one from inject_lora).
///   - On a model that has LoRA layers, it adds the adapter beside the others (inactive, frozen) until
///     set_adapter or an AdapterScope chooses it.
/// dtype rule: the file's floating tensors are cast to the layer's adapter dtype (float32 for a
/// float16/bfloat16 base, else the base weight's dtype), as if the adapter were trained there.
/// Everything is checked before the model changes (io::read_adapter and io::plan_adapter_load list the
/// errors); warnings (an all-zero lora_B, unknown config fields) go through TORCH_WARN.
/// report.trainable / report.total are counted when the load injects (a model without adapters); loading
/// beside other adapters leaves them 0, so that its cost does not grow with the adapters already loaded.
InjectReport load_adapter(torch::nn::Module& module, const std::string& dir,
                          const std::string& adapter_name = "default", const LoadAdapterOptions& options = {});
/// The same from an adapter read already (io::read_adapter), without warning again about what reading found.
InjectReport load_adapter(torch::nn::Module& module, const io::AdapterFile& file,
                          const std::string& adapter_name = "default", const LoadAdapterOptions& options = {});

}  // namespace lorafuse
