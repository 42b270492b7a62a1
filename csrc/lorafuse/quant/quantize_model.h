// lorafuse::quantize_model — QLoRA's first step: a model's Linear layers replaced in place by 4-bit ones.
#pragma once

#include <lorafuse/config/quant_config.h>
#include <torch/nn/module.h>

#include <string>
#include <vector>

namespace lorafuse {

/// Replaces, in place, every torch::nn::Linear of `module` (exactly that type: the dense base kind) by a
/// lorafuse::nn::Linear4bit holding its weight in NF4 on the CPU kernels (bitsandbytes' bytes), except layers that
/// config.modules_to_not_convert keeps dense; one layer at a time, each dense weight freed once its parent lets go
/// of it, so peak memory stays near the model's own size. Layers must sit where they can be swapped (a
/// lorafuse::nn::LinearSlot or a torch::nn::ModuleDict; the reference Llama keeps them so): checked for every layer
/// before any is replaced. Then inject_lora adds adapters as usual (QLoRA). Returns the paths quantized.
std::vector<std::string> quantize_model(torch::nn::Module& module, const QuantConfig& config = QuantConfig());

}  // namespace lorafuse
