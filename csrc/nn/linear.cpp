#include <c10/util/Exception.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_attention.h>
#include <lorafuse/nn/lora_layer.h>
#include <torch/nn/modules/container/moduledict.h>

#include <utility>

namespace lorafuse::nn {
namespace {

// Module's parameter registry is protected; a pointer to member named through a derived class is the
// standard way to reach it for another module (the registry entry itself must change, not a copy).
struct RegistryAccess : torch::nn::Module {
  static torch::OrderedDict<std::string, at::Tensor>& parameters(torch::nn::Module& module) {
    return module.*(&RegistryAccess::parameters_);
  }
};

}  // namespace

void replace_parameter(torch::nn::Module& module, const std::string& name, const at::Tensor& tensor) {
  auto& registry = RegistryAccess::parameters(module);
  at::Tensor* entry = registry.find(name);
  TORCH_CHECK_VALUE(entry != nullptr, "replace_parameter: module ", module.name(), " has no parameter \"", name, "\"");
  at::Tensor replacement = tensor;
  if (replacement.defined() && entry->defined()) replacement.set_requires_grad(entry->requires_grad());
  *entry = std::move(replacement);
}

void copy_requires_grad(const torch::nn::Module& from, torch::nn::Module& to) {
  auto theirs = to.named_parameters();
  for (const auto& p : from.named_parameters()) {
    if (auto* q = theirs.find(p.key())) q->set_requires_grad(p.value().requires_grad());
  }
}

void check_cloneable(const torch::nn::Module& module, const char* what) {
  for (const auto& p : module.named_parameters()) {
    TORCH_CHECK_VALUE(!p.value().is_meta(), what, ": cannot clone a model on the meta device (\"", p.key(),
                      "\" is a meta tensor); build another one from its config instead");
  }
}

torch::nn::Linear make_linear(int64_t in_features, int64_t out_features, bool bias, const c10::TensorOptions& options) {
  TORCH_CHECK_VALUE(in_features >= 0, "in_features: expected >= 0, found ", in_features);
  TORCH_CHECK_VALUE(out_features >= 0, "out_features: expected >= 0, found ", out_features);
  // LinearImpl's constructor allocates on the CPU and initialises; build a 1x1 layer and put tensors of
  // the requested shape, device and dtype in its registry instead.
  torch::nn::Linear linear(torch::nn::LinearOptions(1, 1).bias(bias));
  linear->options = torch::nn::LinearOptions(in_features, out_features).bias(bias);
  const auto tensor_options = options.requires_grad(false);
  replace_parameter(*linear, "weight", at::empty({out_features, in_features}, tensor_options));
  linear->weight = linear->named_parameters(/*recurse=*/false)["weight"];
  if (bias) {
    replace_parameter(*linear, "bias", at::empty({out_features}, tensor_options));
    linear->bias = linear->named_parameters(/*recurse=*/false)["bias"];
  }
  linear->reset_parameters();  // torch::nn::Linear's init; shapes only on meta
  return linear;
}

void LinearSlot::reset(torch::nn::Module& owner, const std::string& name, const torch::nn::LinearOptions& options,
                       const c10::TensorOptions& tensor_options) {
  // A bound slot belongs to an owner being cloned: a same-kind copy sharing the original's tensors (no
  // allocation), which Cloneable::clone then overwrites with the clone of the original's layer.
  std::shared_ptr<torch::nn::Module> layer;
  if (module_ == nullptr) {
    layer = make_linear(options.in_features(), options.out_features(), options.bias(), tensor_options).ptr();
  } else if (const LoraLayer* lora = as_lora_layer(module_.get())) {
    layer = lora->shallow_copy();
  } else if (const auto* slot_module = dynamic_cast<const SlotModule*>(module_.get())) {
    layer = slot_module->shallow_copy();
  } else {
    layer = base_kind_of(*module_)->shallow_copy(*module_);
  }
  rebind(owner.register_module(name, std::move(layer)));
}

void LinearSlot::rebind(std::shared_ptr<torch::nn::Module> layer) {
  TORCH_CHECK_VALUE(layer != nullptr, "LinearSlot::rebind: layer is null");
  torch::nn::Module* raw = layer.get();
  if (LoraLayer* lora = as_lora_layer(raw)) {
    call_ = [lora](const at::Tensor& x) { return lora->lora_forward(x); };
  } else if (const BaseKind* kind = base_kind_of(*raw)) {
    call_ = [kind, raw](const at::Tensor& x) { return kind->forward(*raw, x); };
  } else if (auto* slot_module = dynamic_cast<SlotModule*>(raw)) {
    call_ = [slot_module](const at::Tensor& x) { return slot_module->slot_forward(x); };
  } else {
    TORCH_CHECK_TYPE(false,
                     "LinearSlot::rebind: expected a torch::nn::Linear, a lorafuse LoRA layer or a modules-to-save "
                     "layer, found ",
                     layer->name());
  }
  module_ = std::move(layer);
}

at::Tensor LinearSlot::operator()(const at::Tensor& x) const {
  TORCH_CHECK(call_, "LinearSlot: called before reset() bound it to a layer");
  return call_(x);
}

namespace {

LinearSlot* slot_of(torch::nn::Module& parent, const std::string& name) {
  auto* owner = dynamic_cast<LinearSlotOwner*>(&parent);
  return owner == nullptr ? nullptr : owner->linear_slot(name);
}

AttentionSlot* attention_slot_of(torch::nn::Module& parent, const std::string& name) {
  auto* owner = dynamic_cast<AttentionSlotOwner*>(&parent);
  return owner == nullptr ? nullptr : owner->attention_slot(name);
}

// Child `name` of `parent` replaced in the registry and in the slot its forward calls.
template <typename Slot>
bool rebind_slot(Slot* slot, torch::nn::Module& parent, const std::string& name,
                 std::shared_ptr<torch::nn::Module>& replacement) {
  if (slot == nullptr) return false;
  parent.replace_module(name, replacement);
  slot->rebind(std::move(replacement));
  return true;
}

}  // namespace

bool can_replace_child(torch::nn::Module& parent, const std::string& name) {
  return slot_of(parent, name) != nullptr || attention_slot_of(parent, name) != nullptr ||
         dynamic_cast<torch::nn::ModuleDictImpl*>(&parent) != nullptr;
}

bool replace_child(torch::nn::Module& parent, const std::string& name, std::shared_ptr<torch::nn::Module> replacement) {
  if (rebind_slot(slot_of(parent, name), parent, name, replacement) ||
      rebind_slot(attention_slot_of(parent, name), parent, name, replacement))
    return true;
  if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&parent)) {
    dict->update({{name, std::move(replacement)}});
    return true;
  }
  return false;
}

std::string cannot_replace_message(const torch::nn::Module& parent, const std::string& path, const char* what) {
  return std::string(what) + ": cannot replace \"" + path + "\": its parent (" + parent.name() +
         ") calls it through a typed holder that lorafuse cannot rewire. Keep such layers in a "
         "lorafuse::nn::LinearSlot (with the parent implementing lorafuse::nn::LinearSlotOwner; an attention in an "
         "AttentionSlot, the parent an AttentionSlotOwner) or in a "
         "torch::nn::ModuleDict, or build the layer as a lorafuse::nn::LoraLinear yourself";
}

}  // namespace lorafuse::nn
