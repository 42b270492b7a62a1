// lorafuse::lq_lora — LQ-LoRA on a LibTorch model: the targeted Linear layers become quantized layers in the
// configurations the bit allocation chose (lorafuse::lq_plan), with a LoRA adapter starting at L1·L2.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <map>
#include <string>

#include <lorafuse/config/lora_config.h>
#include <lorafuse/config/lq_lora_config.h>
#include <lorafuse/quant/lq_lora.h>

namespace lorafuse {

/// LQ-LoRA on `module`, in place. `targets` selects the layers as inject_lora does (its target_modules,
/// lora_dropout and the other adapter fields; r and lora_alpha are taken from `config`); each selected layer must
/// be a plain torch::nn::Linear that can be swapped (a LinearSlot or ModuleDict entry, as the reference Llama keeps
/// them). Each weight W is decomposed as Q + L1·L2 under the configuration the allocation gives it
/// (lorafuse::lq_plan, with `fisher[path]` where given); the layer becomes a lorafuse::nn::Linear4bit holding Q in
/// that format (compute dtype: the weight's), and adapter `adapter_name` is injected with lora_A = L2/√s,
/// lora_B = L1/√s (s = lora_alpha / r), so that the model computes with Q + L1·L2 ≈ W. Returns the plan (per
/// matrix its configuration, bits, error; the averages; the allocation).
///
/// Errors (ValueError naming the argument) leave the model unchanged: an invalid config, a selected layer that is not
/// a plain Linear or cannot be swapped, a Fisher for a layer that is not selected, and lq_plan's errors.
LqPlan lq_lora(torch::nn::Module& module, const LqLoraConfig& config,
               const LoraConfig& targets = LoraConfig().target_modules("all-linear"),
               const std::string& adapter_name = "default", const std::map<std::string, at::Tensor>& fisher = {},
               const LqProgress& progress = {});

}  // namespace lorafuse
