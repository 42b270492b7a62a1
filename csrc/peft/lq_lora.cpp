#include <c10/util/Exception.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/peft/lq_lora.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <set>

#include "csrc/peft/sites.h"

namespace lorafuse {

LqPlan lq_lora(torch::nn::Module& module, const LqLoraConfig& config, const LoraConfig& targets,
               const std::string& adapter_name, const std::map<std::string, at::Tensor>& fisher,
               const LqProgress& progress) {
  config.validate();
  LoraConfig lora = targets;
  lora.r(config.r()).lora_alpha(config.lora_alpha());
  lora.validate();
  // The adapter starts at s·B·A = L1·L2 with s = lora_alpha / r, the same r and s everywhere: refused, not bent.
  TORCH_CHECK_VALUE(!lora.use_rslora(),
                    "lq_lora: targets: use_rslora: LQ-LoRA's adapter is scaled by lora_alpha / r; "
                    "found use_rslora = true");
  TORCH_CHECK_VALUE(lora.rank_pattern().empty() && lora.alpha_pattern().empty(),
                    "lq_lora: targets: rank_pattern and alpha_pattern: LQ-LoRA uses one rank (LqLoraConfig::r) and one "
                    "lora_alpha for every matrix; found per-module patterns");
  nn::check_adapter_name(adapter_name);
  // Everything is checked, and the plan computed, before anything changes.
  const auto sites = detail::sites_of(module);
  const auto chosen = detail::select_in(module, sites, lora);
  std::vector<LqMatrix> matrices;
  std::set<std::string> paths;
  for (const auto& c : chosen) {
    const auto& s = sites[c.index];
    const auto* kind = nn::base_kind_of(*s.module);
    TORCH_CHECK_VALUE(kind != nullptr && std::string(kind->name()) == "linear", "lq_lora: \"", s.path, "\" is a ",
                      s.module->name(),
                      "; LQ-LoRA decomposes the dense weight of a plain torch::nn::Linear "
                      "(quantize or inject after lq_lora, not before)");
    TORCH_CHECK_VALUE(nn::can_replace_child(*s.parent, s.name),
                      nn::cannot_replace_message(*s.parent, s.path, "lq_lora"));
    const auto it = fisher.find(s.path);
    matrices.push_back({s.path, s.module->as<torch::nn::LinearImpl>()->weight.detach(),
                        it == fisher.end() ? at::Tensor() : it->second});
    paths.insert(s.path);
  }
  for (const auto& [path, f] : fisher) {
    TORCH_CHECK_VALUE(paths.count(path) == 1, "lq_lora: fisher: \"", path, "\" is not a targeted Linear layer");
  }
  LqPlan plan = lq_plan(matrices, config, progress);

  std::vector<std::string> swapped;
  for (size_t i = 0; i < chosen.size(); ++i) {
    const auto& s = sites[chosen[i].index];
    const auto& p = plan.matrices[i];
    const auto* dense = s.module->as<torch::nn::LinearImpl>();
    const auto& f = p.config.format;
    const auto options = nn::Linear4bitOptions(p.in_features, p.out_features)
                             .bias(dense->bias.defined())
                             .compute_dtype(dense->weight.scalar_type())
                             .blocksize(f[1])
                             .double_quant(f[2] > 0)
                             .bits(f[0])
                             .stat_bits(f[2] > 0 ? f[2] : 8)
                             .stat_blocksize(f[2] > 0 ? f[3] : 256)
                             .stat_dtype(p.config.stat_dtype);
    const auto device = dense->weight.device();
    auto layer = nn::Linear4bitImpl::from_nf4(
        options, {p.q.packed.to(device), p.q.absmax.to(device), p.q.nested_absmax.to(device), p.q.offset.to(device)},
        dense->bias.defined() ? dense->bias.detach() : at::Tensor());
    layer->train(s.module->is_training());
    nn::replace_child(*s.parent, s.name, std::move(layer));
    swapped.push_back(s.path);
  }
  inject_lora(module, LoraConfig(lora).target_modules(swapped), adapter_name);
  const double root = std::sqrt(config.lora_alpha() / static_cast<double>(config.r()));
  torch::NoGradGuard no_grad;
  std::map<std::string, nn::LoraLayer*> layers;
  for (const auto& [path, layer] : lora_layers(module)) layers[path] = layer;
  for (const auto& p : plan.matrices) {
    nn::LoraLayer* layer = layers.at(p.name);
    at::Tensor& a = layer->lora_a(adapter_name);
    at::Tensor& b = layer->lora_b(adapter_name);
    a.copy_(p.l2.div(root));
    b.copy_(p.l1.div(root));
  }
  return plan;
}

}  // namespace lorafuse
