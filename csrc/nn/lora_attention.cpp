#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_attention.h>
#include <lorafuse/ops/adapted_weight.h>
#include <torch/nn/functional/activation.h>
#include <torch/serialize/archive.h>

namespace lorafuse::nn {
namespace {

constexpr const char* kRefusal =
    "nn::LoraMultiheadAttention adapts the attention's weights as PEFT's MultiheadAttention does: DoRA and "
    "LoftQ/PiSSA/OLoRA are not supported there";

// W, or W + scale·B·A for a route.
at::Tensor adapted(const at::Tensor& weight, const std::optional<LoraAdapters::Route>& route) {
  return route ? lorafuse::lora_adapted_weight(weight, route->a->weight, route->b->weight, route->scale) : weight;
}

}  // namespace

// ---- the output projection's adapters ---------------------------------------------------------------------
void AttentionOutProjImpl::reset() { adapters.reset(*this, embed_dim_, embed_dim_, options_); }

void AttentionOutProjImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  adapters.save(archive);
}

void AttentionOutProjImpl::load(torch::serialize::InputArchive& archive) {
  adapters.load(archive, *this, options_, "LoraMultiheadAttention::load (out_proj)");
  torch::nn::Module::load(archive);
}

// ---- the layer ---------------------------------------------------------------------------------------------
void check_attention(const torch::nn::MultiheadAttentionImpl& base, const std::string& what) {
  TORCH_CHECK_VALUE(base._qkv_same_embed_dim, what,
                    ": a MultiheadAttention whose key and value sizes (kdim=", base.options.kdim(),
                    ", vdim=", base.options.vdim(), ") differ from embed_dim=", base.options.embed_dim(),
                    " keeps separate q/k/v weights; lorafuse (as PEFT) adapts the packed in_proj_weight of an "
                    "attention whose query, key and value share embed_dim");
  TORCH_CHECK_VALUE(at::isFloatingType(base.in_proj_weight.scalar_type()), what,
                    ": the attention's weights must be floating point; found ", base.in_proj_weight.scalar_type());
}

LoraMultiheadAttentionImpl::LoraMultiheadAttentionImpl(torch::nn::MultiheadAttention base,
                                                       const LoraAdapterOptions& adapter,
                                                       const std::string& adapter_name) {
  TORCH_CHECK_VALUE(!base.is_empty(), "base: expected a torch::nn::MultiheadAttention, found an empty holder");
  check_attention(*base, "base");
  check_adapter_name(adapter_name);
  adapters_.table().check_add(adapter_name, adapter, base->in_proj_weight.scalar_type());
  pending_base_ = std::move(base);
  reset();
  add_adapter(adapter_name, adapter);
}

void LoraMultiheadAttentionImpl::reset() {
  torch::nn::MultiheadAttention base = std::move(pending_base_);
  pending_base_ = nullptr;
  const bool wrapping = !base.is_empty();
  AttentionOutProj out{nullptr};
  if (!wrapping) {  // Cloneable::clone: placeholders sharing the original's tensors, then overwritten by its deep copy
    TORCH_CHECK(!base_layer.is_empty(), "LoraMultiheadAttention::reset: no base layer to wrap");
    base = torch::nn::MultiheadAttention(std::make_shared<torch::nn::MultiheadAttentionImpl>(*base_layer));
    out = AttentionOutProj(std::make_shared<AttentionOutProjImpl>(*out_proj_adapters));
  }
  base_layer = register_module("base_layer", base);
  if (wrapping) {
    for (auto& p : base_layer->parameters()) p.set_requires_grad(false);
    out = AttentionOutProj(base_layer->options.embed_dim(), base_options());
  }
  out_proj_adapters = register_module("out_proj_adapters", out);
  const int64_t e = base_layer->options.embed_dim();
  adapters_.reset(*this, e, 3 * e, base_options());
  in_unmerged_ = register_buffer("in_proj_weight_unmerged", at::empty({0}, base_options()));
  out_unmerged_ = register_buffer("out_proj_weight_unmerged", at::empty({0}, base_options()));
}

void LoraMultiheadAttentionImpl::reset_parameters() {
  adapters_.reset_parameters();
  out_proj_adapters->adapters.reset_parameters();
}

std::shared_ptr<torch::nn::Module> LoraMultiheadAttentionImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "LoraMultiheadAttention::clone");
  auto copy = torch::nn::Cloneable<LoraMultiheadAttentionImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  auto* layer = copy->as<LoraMultiheadAttentionImpl>();
  layer->adapters_.refresh_routes();
  layer->out_proj_adapters->adapters.refresh_routes();
  return copy;
}

std::tuple<at::Tensor, at::Tensor> LoraMultiheadAttentionImpl::forward(const at::Tensor& query, const at::Tensor& key,
                                                                       const at::Tensor& value,
                                                                       const at::Tensor& key_padding_mask,
                                                                       bool need_weights, const at::Tensor& attn_mask,
                                                                       bool average_attn_weights) {
  TORCH_CHECK_VALUE(AdapterScope::rows() == nullptr,
                    "use_adapter with one adapter per row: a MultiheadAttention's adapters adapt its weights, one set "
                    "per call, so lorafuse (as PEFT) does not run them per row; run each adapter's rows in a batch of "
                    "their own");
  const auto route = adapters_.route();
  const auto out_route = out_proj_adapters->adapters.route();
  auto& base = *base_layer;
  if (!route && !out_route) {
    return base.forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights);
  }
  return torch::nn::functional::detail::multi_head_attention_forward(
      query, key, value, base.options.embed_dim(), base.options.num_heads(), adapted(base.in_proj_weight, route),
      base.in_proj_bias, base.bias_k, base.bias_v, base.options.add_zero_attn(), base.options.dropout(),
      adapted(base.out_proj->weight, out_route), base.out_proj->bias, base.is_training(), key_padding_mask,
      need_weights, attn_mask, /*use_separate_proj_weight=*/false, {}, {}, {}, {}, {}, average_attn_weights);
}

at::Tensor LoraMultiheadAttentionImpl::lora_forward(const at::Tensor& /*x*/) {
  TORCH_CHECK_VALUE(false,
                    "LoraMultiheadAttention: an attention takes query, key and value; its owner calls it through a "
                    "lorafuse::nn::AttentionSlot, not a LinearSlot");
}

void LoraMultiheadAttentionImpl::add_adapter(const std::string& name, const LoraAdapterOptions& options,
                                             bool activate) {
  adapters_.add(*this, name, options, activate, base_options(), {}, kRefusal);
  out_proj_adapters->set_options(base_options());
  out_proj_adapters->adapters.add(*out_proj_adapters, name, options, activate, base_options(), {}, kRefusal);
  if (options.lora_dropout() > 0) {
    TORCH_WARN("add_adapter(\"", name, "\"): lora_dropout=", options.lora_dropout(),
               " does not act on a MultiheadAttention's adapters: the attention computes with the adapted weights "
               "whole (as in PEFT)");
  }
}

void LoraMultiheadAttentionImpl::set_adapter(const std::string& name) {
  adapters_.activate(name, [this] { unmerge(); });
  out_proj_adapters->adapters.activate(name, [] {});
}

void LoraMultiheadAttentionImpl::clear_active_adapter() {
  adapters_.clear_active([this] { unmerge(); });
  out_proj_adapters->adapters.clear_active([] {});
}

void LoraMultiheadAttentionImpl::delete_adapter(const std::string& name) {
  adapters_.remove(name);
  if (out_proj_adapters->adapters.table().has(name)) out_proj_adapters->adapters.remove(name);
}

void LoraMultiheadAttentionImpl::disable_adapters() {
  adapters_.disable([this] { unmerge(); });
  out_proj_adapters->adapters.disable([] {});
}

void LoraMultiheadAttentionImpl::enable_adapters() {
  adapters_.enable();
  out_proj_adapters->adapters.enable();
}

void LoraMultiheadAttentionImpl::merge(const std::vector<std::string>& adapter_names, bool /*requantize*/) {
  const auto everything = adapters_.table().plan_merge(adapter_names);
  const auto before = adapters_.table().merged();
  if (everything == before) return;  // merged already (plan_merge warned)
  adapters_.merge_dense(base_layer->in_proj_weight, /*transposed=*/false, in_unmerged_, everything);
  try {
    out_proj_adapters->adapters.merge_dense(base_layer->out_proj->weight, false, out_unmerged_, everything);
  } catch (...) {  // both or neither
    adapters_.unmerge_dense(base_layer->in_proj_weight, in_unmerged_);
    if (!before.empty()) adapters_.merge_dense(base_layer->in_proj_weight, false, in_unmerged_, before);
    throw;
  }
}

void LoraMultiheadAttentionImpl::unmerge() {
  adapters_.unmerge_dense(base_layer->in_proj_weight, in_unmerged_);
  out_proj_adapters->adapters.unmerge_dense(base_layer->out_proj->weight, out_unmerged_);
}

torch::nn::MultiheadAttention LoraMultiheadAttentionImpl::merge_and_unload() {
  out_proj_adapters->adapters.unload_dense(base_layer->out_proj->weight, /*transposed=*/false, out_unmerged_);
  adapters_.unload_dense(base_layer->in_proj_weight, /*transposed=*/false, in_unmerged_);
  return base_layer;
}

void LoraMultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::LoraMultiheadAttention(embed_dim=" << base_layer->options.embed_dim()
         << ", num_heads=" << base_layer->options.num_heads() << ", " << adapters().describe() << ")";
}

void LoraMultiheadAttentionImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  adapters_.save(archive);
}

void LoraMultiheadAttentionImpl::load(torch::serialize::InputArchive& archive) {
  adapters_.load(archive, *this, base_options(), "LoraMultiheadAttention::load");
  torch::nn::Module::load(archive);
}

// ---- the slot ------------------------------------------------------------------------------------------------
void AttentionSlot::reset(torch::nn::Module& owner, const std::string& name,
                          const torch::nn::MultiheadAttentionOptions& options) {
  std::shared_ptr<torch::nn::Module> layer;
  if (module_ == nullptr) {
    layer = std::make_shared<torch::nn::MultiheadAttentionImpl>(options);
  } else if (const auto* lora = module_->as<LoraMultiheadAttentionImpl>()) {
    layer = lora->shallow_copy();
  } else {
    layer = std::make_shared<torch::nn::MultiheadAttentionImpl>(*module_->as<torch::nn::MultiheadAttentionImpl>());
  }
  rebind(owner.register_module(name, std::move(layer)));
}

void AttentionSlot::rebind(std::shared_ptr<torch::nn::Module> layer) {
  TORCH_CHECK_VALUE(layer != nullptr, "AttentionSlot::rebind: layer is null");
  TORCH_CHECK_TYPE(
      layer->as<torch::nn::MultiheadAttentionImpl>() != nullptr || layer->as<LoraMultiheadAttentionImpl>() != nullptr,
      "AttentionSlot::rebind: expected a torch::nn::MultiheadAttention or a "
      "lorafuse::nn::LoraMultiheadAttention, found ",
      layer->name());
  module_ = std::move(layer);
}

std::tuple<at::Tensor, at::Tensor> AttentionSlot::operator()(const at::Tensor& query, const at::Tensor& key,
                                                             const at::Tensor& value,
                                                             const at::Tensor& key_padding_mask, bool need_weights,
                                                             const at::Tensor& attn_mask) const {
  TORCH_CHECK(module_ != nullptr, "AttentionSlot: called before reset() bound it to a module");
  if (auto* lora = module_->as<LoraMultiheadAttentionImpl>()) {
    return lora->forward(query, key, value, key_padding_mask, need_weights, attn_mask);
  }
  return module_->as<torch::nn::MultiheadAttentionImpl>()->forward(query, key, value, key_padding_mask, need_weights,
                                                                   attn_mask);
}

}  // namespace lorafuse::nn
