#include <c10/util/Exception.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_layer.h>
#include <lorafuse/quant/quantize_model.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/modules/linear.h>

#include <utility>

namespace lorafuse {
namespace {

struct Target {
  torch::nn::Module* parent;
  std::string name;
  std::string path;
};

void collect(torch::nn::Module& module, const std::string& prefix, const QuantConfig& config,
             std::vector<Target>& out) {
  for (const auto& child : module.named_children()) {
    const std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    const auto* kind = nn::base_kind_of(*child.value());
    if (kind != nullptr && std::string(kind->name()) == "linear") {
      if (!config.keeps_dense(path)) out.push_back({&module, child.key(), path});
    } else if (nn::as_lora_layer(child.value().get()) == nullptr) {
      collect(*child.value(), path, config, out);
    }
  }
}

}  // namespace

std::vector<std::string> quantize_model(torch::nn::Module& module, const QuantConfig& config) {
  config.validate();
  std::vector<Target> targets;
  collect(module, "", config, targets);
  // Everything that can refuse is checked before the first layer is replaced: nothing changes on an error.
  for (const auto& t : targets) {
    TORCH_CHECK_VALUE(nn::can_replace_child(*t.parent, t.name),
                      nn::cannot_replace_message(*t.parent, t.path, "quantize_model"));
    const auto& weight = t.parent->named_children()[t.name]->as<torch::nn::LinearImpl>()->weight;
    TORCH_CHECK_VALUE(!weight.is_meta(), "quantize_model: \"", t.path,
                      "\" has its weight on the meta device; load its values first");
    const auto dtype = config.compute_dtype().value_or(weight.scalar_type());
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "quantize_model: \"", t.path,
                     "\" has a ", weight.scalar_type(),
                     " weight; give QuantConfig().compute_dtype (float32, bfloat16 or float16)");
    torch::NoGradGuard no_grad;
    TORCH_CHECK_VALUE(weight.isfinite().all().item<bool>(), "quantize_model: \"", t.path,
                      "\" has NaN or infinite weights, which a quantized weight cannot hold");
  }
  std::vector<std::string> paths;
  for (const auto& t : targets) {
    torch::nn::Linear dense(std::dynamic_pointer_cast<torch::nn::LinearImpl>(t.parent->named_children()[t.name]));
    auto layer = nn::Linear4bitImpl::from_weight(
        dense->weight, dense->bias,
        nn::linear4bit_options(config, dense->weight.size(1), dense->weight.size(0), dense->bias.defined(),
                               config.compute_dtype().value_or(dense->weight.scalar_type())));
    layer->train(dense->is_training());
    dense = nullptr;  // the parent's registry then holds the last reference to the dense weight
    nn::replace_child(*t.parent, t.name, std::move(layer));
    paths.push_back(t.path);
  }
  return paths;
}

}  // namespace lorafuse
