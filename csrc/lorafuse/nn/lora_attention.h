// lorafuse::nn::LoraMultiheadAttention — a frozen torch::nn::MultiheadAttention with named LoRA adapters on its packed
// q/k/v projection and its output projection (PEFT's lora.MultiheadAttention; Python's lorafuse.nn.MultiheadAttention),
// and AttentionSlot, the child holder through which inject_lora can swap an owner's attention.
#pragma once

#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/lora_adapters.h>
#include <lorafuse/nn/lora_layer.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lorafuse::nn {

/// The output projection's adapters of a LoraMultiheadAttention (lora_A.<name>.weight [r, E], lora_B.<name>.weight
/// [E, r]); a child module, so that clone and archives treat them as the layer's own.
class AttentionOutProjImpl : public torch::nn::Cloneable<AttentionOutProjImpl> {
 public:
  AttentionOutProjImpl(int64_t embed_dim, const at::TensorOptions& options) : embed_dim_(embed_dim), options_(options) {
    reset();
  }
  void reset() override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  /// The options new adapters are made with (the base's device and dtype).
  void set_options(const at::TensorOptions& options) { options_ = options; }

  LoraAdapters adapters;

 private:
  int64_t embed_dim_;
  at::TensorOptions options_;
};
TORCH_MODULE(AttentionOutProj);

/// The attention computed with W + scale·B·A for its packed projection in_proj_weight [3E, E] and its output
/// projection (lorafuse::lora_adapted_weight, so the gradients reach A and B), through LibTorch's own
/// multi_head_attention_forward; nothing is written into the module, so threads may run their own adapters at once.
/// Query, key and value must share embed_dim (separate q/k/v weights are refused by name, as PEFT does). As in PEFT,
/// lora_dropout does not act on these adapters, DoRA and LoftQ/PiSSA/OLoRA are refused, and so is one adapter per row.
/// Merges fold both adapters into both weights (exact unmerge); merge_and_unload gives the MultiheadAttention back. In
/// PEFT's files the packed projection's factors are <path>.lora_A/B.weight, the output projection's
/// <path>.base_layer.out_proj.lora_A/B.weight. (PEFT 0.21 adds the output projection's delta twice; lorafuse adds it
/// once, as LoRA and PEFT's fix do.)
class LoraMultiheadAttentionImpl : public torch::nn::Cloneable<LoraMultiheadAttentionImpl>, public LoraLayer {
 public:
  /// Wraps `base` (not copied: it is frozen and shared) with one adapter.
  LoraMultiheadAttentionImpl(torch::nn::MultiheadAttention base, const LoraAdapterOptions& adapter,
                             const std::string& adapter_name = "default");

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// torch::nn::MultiheadAttention's forward: query [L, N, E], key and value [S, N, E] → (output [L, N, E], weights).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                             const at::Tensor& key_padding_mask = {}, bool need_weights = true,
                                             const at::Tensor& attn_mask = {}, bool average_attn_weights = true);

  void add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate = true) override;
  void set_adapter(const std::string& name) override;
  void clear_active_adapter() override;
  void delete_adapter(const std::string& name) override;
  void disable_adapters() override;
  void enable_adapters() override;
  /// The packed q/k/v projection's adapters (its table is the layer's).
  const AdapterTable& adapters() const noexcept override { return adapters_.table(); }
  at::Tensor& lora_a(const std::string& name) override { return adapters_.lora_a(name); }
  at::Tensor& lora_b(const std::string& name) override { return adapters_.lora_b(name); }
  at::Tensor& lora_magnitude(const std::string& name) override { return adapters_.lora_magnitude(name); }
  /// The output projection's factors: A [r, E], B [E, r].
  at::Tensor& out_proj_lora_a(const std::string& name) { return out_proj_adapters->adapters.lora_a(name); }
  at::Tensor& out_proj_lora_b(const std::string& name) { return out_proj_adapters->adapters.lora_b(name); }

  void merge(const std::vector<std::string>& adapter_names = {}, bool requantize = false) override;
  void unmerge() override;
  /// Merges the active adapter for good into both weights and returns the MultiheadAttention.
  torch::nn::MultiheadAttention merge_and_unload();

  torch::nn::Module& module() override { return *this; }
  /// An attention takes query, key and value: a ValueError (LinearSlot never holds this layer; AttentionSlot does).
  at::Tensor lora_forward(const at::Tensor& x) override;
  int64_t in_features() const override { return base_layer->options.embed_dim(); }
  int64_t out_features() const override { return 3 * base_layer->options.embed_dim(); }
  at::Tensor base_bias() const override { return {}; }
  std::shared_ptr<torch::nn::Module> unload_merged() override { return merge_and_unload().ptr(); }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_layer.ptr(); }
  std::shared_ptr<torch::nn::Module> shallow_copy() const override {
    return std::make_shared<LoraMultiheadAttentionImpl>(*this);
  }

  torch::nn::MultiheadAttention base_layer{nullptr};
  AttentionOutProj out_proj_adapters{nullptr};

 private:
  at::TensorOptions base_options() const { return base_layer->in_proj_weight.options(); }

  torch::nn::MultiheadAttention pending_base_{nullptr};  // consumed by the first reset() of the constructor
  LoraAdapters adapters_;
  at::Tensor in_unmerged_, out_unmerged_;  // buffers: the unmerged weights while anything is merged, else [0]
};

TORCH_MODULE(LoraMultiheadAttention);

/// A ValueError naming `what` unless `base` can take LoRA: query, key and value of one embed_dim (its packed
/// in_proj_weight), floating-point weights.
void check_attention(const torch::nn::MultiheadAttentionImpl& base, const std::string& what);

/// An attention child that inject_lora and merge_and_unload may swap between torch::nn::MultiheadAttention and
/// LoraMultiheadAttention (LinearSlot's counterpart: LibTorch calls a child through its owner's typed holder). A
/// module that keeps its attention in an AttentionSlot and implements AttentionSlotOwner always calls the module that
/// is registered now.
class AttentionSlot {
 public:
  /// Registers child `name` of `owner` and binds the slot to it: a fresh slot gets a new MultiheadAttention; a bound
  /// slot (an owner being cloned) a same-kind placeholder sharing the original's tensors, which Cloneable::clone then
  /// overwrites.
  void reset(torch::nn::Module& owner, const std::string& name, const torch::nn::MultiheadAttentionOptions& options);
  /// Points the slot at `layer` (a MultiheadAttention or a LoraMultiheadAttention) once the owner's child was replaced.
  void rebind(std::shared_ptr<torch::nn::Module> layer);
  /// Calls the bound module.
  std::tuple<at::Tensor, at::Tensor> operator()(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& key_padding_mask = {}, bool need_weights = true,
                                                const at::Tensor& attn_mask = {}) const;
  const std::shared_ptr<torch::nn::Module>& module() const noexcept { return module_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
};

/// Implemented by modules whose forward calls attention children through AttentionSlots.
class AttentionSlotOwner {
 public:
  virtual ~AttentionSlotOwner() = default;
  /// The slot that holds child `name`, or nullptr.
  virtual AttentionSlot* attention_slot(const std::string& name) = 0;
};

}  // namespace lorafuse::nn
