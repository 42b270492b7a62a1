// lorafuse::nn::LoraLinear4bit — QLoRA's layer: a frozen 4-bit NF4 base (lorafuse::nn::Linear4bit) with named LoRA
// adapters, as LoraLinear is over a dense base.
#pragma once

#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_adapters.h>
#include <lorafuse/nn/lora_layer.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse::nn {

/// y = base(x) + scale · (dropout(x)·Aᵀ)·Bᵀ for the active adapter, with base a Linear4bit (lorafuse::linear4bit)
/// and the branch added by lorafuse::lora_branch; the adapters are kept as LoraLinear keeps them
/// (`lora_A.<name>.weight` [r, in], `lora_B.<name>.weight` [out, r], only the active one trains), with the dtype rule
/// of LoraLinear over the compute dtype (float32 adapters for a 16-bit compute dtype, as PEFT's autocast). The 4-bit
/// weight is buffers: it never trains.
///
/// Merging: merge() refuses (rounding W + scale·B·A to 4 bits changes the layer's outputs) unless asked with
/// `requantize`: then the base holds the merged weight in NF4 (lorafuse::nf4_merge), merge_error() reports what the
/// rounding cost, and unmerge() restores the old bytes exactly (kept in the `*_unmerged` buffers).
/// merge_and_unload() gives a dense Linear in the compute dtype holding dequant(W) + scale·B·A.
class LoraLinear4bitImpl : public torch::nn::Cloneable<LoraLinear4bitImpl>, public LoraLayer {
 public:
  /// Wraps `base` (not copied: the layer shares its buffers) with one adapter; the base's bias is frozen.
  LoraLinear4bitImpl(Linear4bit base, const LoraAdapterOptions& adapter, const std::string& adapter_name = "default");

  void reset() override;
  void reset_parameters() { adapters_.reset_parameters(); }
  void pretty_print(std::ostream& stream) const override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// [..., in] → [..., out] in x's dtype. Under a mixed-batch AdapterScope, each row runs its own adapter.
  at::Tensor forward(const at::Tensor& x);

  // ---- LoraLayer ----------------------------------------------------------------------------------
  torch::nn::Module& module() override { return *this; }
  at::Tensor lora_forward(const at::Tensor& x) override { return forward(x); }
  int64_t in_features() const override { return base_layer->options.in_features(); }
  int64_t out_features() const override { return base_layer->options.out_features(); }
  at::Tensor base_bias() const override { return base_layer->bias; }
  const AdapterTable& adapters() const noexcept override { return adapters_.table(); }
  void add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate = true) override;
  void set_adapter(const std::string& name) override;
  void clear_active_adapter() override;
  void delete_adapter(const std::string& name) override;
  void disable_adapters() override;
  void enable_adapters() override;
  at::Tensor& lora_a(const std::string& name) override { return adapters_.lora_a(name); }
  at::Tensor& lora_b(const std::string& name) override { return adapters_.lora_b(name); }
  at::Tensor& lora_magnitude(const std::string& name) override { return adapters_.lora_magnitude(name); }
  /// scale · B · A in float32 [out, in].
  at::Tensor delta_weight(const std::string& name) const { return adapters_.delta_weight(name); }
  void merge(const std::vector<std::string>& adapter_names = {}, bool requantize = false) override;
  void unmerge() override;
  std::optional<MergeError> merge_error() const override;
  /// The dense layer this one computes with the active adapter merged (also while adapters are disabled, as PEFT
  /// does): Linear in the compute dtype holding dequant(W) + scale·B·A (summed in float32, rounded once), the
  /// base's bias. This layer is left without adapters.
  torch::nn::Linear merge_and_unload();
  std::shared_ptr<torch::nn::Module> unload_merged() override { return merge_and_unload().ptr(); }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_layer.ptr(); }
  std::shared_ptr<torch::nn::Module> unloaded_dense() const override { return dense_merged().ptr(); }
  /// The dense Linear merge_and_unload gives, computed without changing this layer.
  torch::nn::Linear dense_merged() const;
  std::shared_ptr<torch::nn::Module> shallow_copy() const override {
    return std::make_shared<LoraLinear4bitImpl>(*this);
  }

  /// The wrapped 4-bit base.
  Linear4bit base_layer{nullptr};
  torch::nn::ModuleDict lora_A{nullptr};
  torch::nn::ModuleDict lora_B{nullptr};

 private:
  at::TensorOptions base_options() const;
  at::Tensor routed_forward(const at::Tensor& x, const LoraAdapters::Route& route);
  void drop_unmerged_copy();

  Linear4bit pending_base_{nullptr};  // consumed by the first reset() of the wrapping constructor
  LoraAdapters adapters_;
  // buffers: the base's bytes before a requantized merge (else [0]), and [output_error, adapter_error] (else [0])
  at::Tensor packed_unmerged_, absmax_unmerged_, nested_absmax_unmerged_, offset_unmerged_, merge_error_;
};

TORCH_MODULE(LoraLinear4bit);

}  // namespace lorafuse::nn
