// A reference Llama decoder (Llama 2 / Llama 3 family) as LibTorch modules. Module and parameter paths are
// those of Hugging Face's LlamaForCausalLM (model.layers.3.self_attn.q_proj.weight, lm_head.weight, ...), so
// PEFT adapters and HF checkpoints map onto it one to one. Every linear layer is called through a
// lorafuse::nn::LinearSlot, so inject_lora can swap it for a LoraLinear at run time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/TensorOptions.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/pretrained.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <utility>

namespace lorafuse::models {

/// The shape of a Llama model. Field names and meanings are those of Hugging Face's LlamaConfig; the defaults
/// describe a tiny model for tests. Rope scaling, attention/MLP biases and tied embeddings are not supported
/// (Llama 2 and Llama 3 use none of them).
struct LlamaConfig {
  LlamaConfig() = default;

  /// meta-llama/Llama-2-7b-hf.
  static LlamaConfig llama2_7b();
  /// meta-llama/Meta-Llama-3-70B.
  static LlamaConfig llama3_70b();

  /// Throws c10::ValueError (c10::TypeError for a non-floating dtype) naming the field, what was found and
  /// what was expected. Every module constructor calls it.
  void validate() const;
  /// hidden_size / num_attention_heads.
  int64_t head_dim() const;

  /// The shape in a Hugging Face config.json of a LlamaForCausalLM (`json_text`; `what` names it in errors). What
  /// this model does not compute is refused by name rather than ignored: another model_type, rope_scaling, attention or
  /// MLP biases, an activation other than silu, a head_dim other than hidden_size / num_attention_heads. tensor_options
  /// stay the default (float32 on the CPU): set them to choose.
  static LlamaConfig from_hf_json(const std::string& json_text, const std::string& what = "config.json");
  /// The config.json of a LlamaForCausalLM of this shape, as transformers writes it (torch_dtype from
  /// tensor_options), so a checkpoint saved from this model loads in transformers.
  std::string to_hf_json() const;
  /// The number of parameters a LlamaForCausalLM of this shape has, without building it.
  int64_t num_parameters() const;

  /// Tokens in the vocabulary (rows of embed_tokens and lm_head).
  TORCH_ARG(int64_t, vocab_size) = 128;
  /// Width of the residual stream.
  TORCH_ARG(int64_t, hidden_size) = 64;
  /// Width of the MLP's gate/up projections.
  TORCH_ARG(int64_t, intermediate_size) = 176;
  /// Decoder layers.
  TORCH_ARG(int64_t, num_hidden_layers) = 2;
  /// Query heads.
  TORCH_ARG(int64_t, num_attention_heads) = 4;
  /// Key/value heads (grouped-query attention); must divide num_attention_heads.
  TORCH_ARG(int64_t, num_key_value_heads) = 2;
  /// Kept for Hugging Face parity; positions beyond it are not rejected.
  TORCH_ARG(int64_t, max_position_embeddings) = 2048;
  /// Base of the rotary embedding's frequencies.
  TORCH_ARG(double, rope_theta) = 10000.0;
  /// Epsilon of every RMSNorm.
  TORCH_ARG(double, rms_norm_eps) = 1e-6;
  /// Standard deviation of the embedding's normal initialisation.
  TORCH_ARG(double, initializer_range) = 0.02;
  /// lm_head computes with embed_tokens' weight: one tensor registered under both names, as Hugging Face ties them
  /// (saved once, loaded under either name; merging an adapter into it is refused). LibTorch's parameters() lists
  /// it under both names: give an optimizer that trains it each tensor once.
  TORCH_ARG(bool, tie_word_embeddings) = false;
  /// Device and dtype every weight is created with (kMeta: a skeleton that costs no memory).
  TORCH_ARG(c10::TensorOptions, tensor_options) = c10::TensorOptions().device(c10::kCPU).dtype(c10::kFloat);
};

/// cos and sin [B, T, head_dim] of Llama's rotary embedding at `position_ids` [B, T] (any integer dtype):
/// angle(p, i) = p / theta^(2 (i mod head_dim/2) / head_dim), computed in float32 (float64 when `dtype` is
/// float64) and returned in `dtype`.
std::pair<at::Tensor, at::Tensor> llama_rotary_cos_sin(const at::Tensor& position_ids, int64_t head_dim, double theta,
                                                       c10::ScalarType dtype);

/// x·cos + rotate_half(x)·sin for x [B, heads, T, head_dim] and cos, sin [B, T, head_dim]; rotate_half pairs
/// element i with i + head_dim/2 (Hugging Face's convention, not the interleaved one of Meta's checkpoints).
at::Tensor llama_apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// Options of LlamaRMSNorm.
struct LlamaRMSNormOptions {
  /* implicit */ LlamaRMSNormOptions(int64_t hidden_size) : hidden_size_(hidden_size) {}
  /// Size of the normalised (last) dimension.
  TORCH_ARG(int64_t, hidden_size);
  /// Added to the mean square before the reciprocal square root.
  TORCH_ARG(double, eps) = 1e-6;
  /// Device and dtype of `weight`.
  TORCH_ARG(c10::TensorOptions, tensor_options) = c10::TensorOptions().device(c10::kCPU).dtype(c10::kFloat);
};

/// weight · (x / sqrt(mean(x², -1) + eps)), normalised in float32 (float64 for float64 input) and cast back to
/// x's dtype before the weight is applied, as Hugging Face does.
class LlamaRMSNormImpl : public torch::nn::Cloneable<LlamaRMSNormImpl> {
 public:
  LlamaRMSNormImpl(int64_t hidden_size, double eps) : LlamaRMSNormImpl(LlamaRMSNormOptions(hidden_size).eps(eps)) {}
  explicit LlamaRMSNormImpl(LlamaRMSNormOptions options);

  void reset() override;
  /// weight = 1 (nothing to do on the meta device).
  void reset_parameters();
  /// Cloneable's deep copy, keeping each parameter's requires_grad.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;
  /// x [..., hidden_size] -> [..., hidden_size].
  at::Tensor forward(const at::Tensor& x);

  LlamaRMSNormOptions options;
  at::Tensor weight;  // [hidden_size]
};
TORCH_MODULE(LlamaRMSNorm);

/// Causal grouped-query self-attention with rotary embeddings: q_proj, k_proj, v_proj, o_proj, no biases.
class LlamaAttentionImpl : public torch::nn::Cloneable<LlamaAttentionImpl>, public lorafuse::nn::LinearSlotOwner {
 public:
  explicit LlamaAttentionImpl(LlamaConfig config);

  void reset() override;
  /// Cloneable's deep copy, keeping each parameter's requires_grad.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;
  lorafuse::nn::LinearSlot* linear_slot(const std::string& name) override;
  /// x [B, T, hidden_size]; cos, sin [B or 1, T, head_dim] (llama_rotary_cos_sin) -> [B, T, hidden_size].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

  LlamaConfig config;
  lorafuse::nn::LinearSlot q_proj, k_proj, v_proj, o_proj;
};
TORCH_MODULE(LlamaAttention);

/// down_proj(silu(gate_proj(x)) · up_proj(x)), no biases.
class LlamaMLPImpl : public torch::nn::Cloneable<LlamaMLPImpl>, public lorafuse::nn::LinearSlotOwner {
 public:
  explicit LlamaMLPImpl(LlamaConfig config);

  void reset() override;
  /// Cloneable's deep copy, keeping each parameter's requires_grad.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;
  lorafuse::nn::LinearSlot* linear_slot(const std::string& name) override;
  /// x [..., hidden_size] -> [..., hidden_size].
  at::Tensor forward(const at::Tensor& x);

  LlamaConfig config;
  lorafuse::nn::LinearSlot gate_proj, up_proj, down_proj;
};
TORCH_MODULE(LlamaMLP);

/// One pre-norm block: h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h)).
class LlamaDecoderLayerImpl : public torch::nn::Cloneable<LlamaDecoderLayerImpl> {
 public:
  explicit LlamaDecoderLayerImpl(LlamaConfig config);

  void reset() override;
  /// Cloneable's deep copy, keeping each parameter's requires_grad.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;
  /// x [B, T, hidden_size]; cos, sin as LlamaAttentionImpl::forward -> [B, T, hidden_size].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

  LlamaConfig config;
  LlamaAttention self_attn = nullptr;
  LlamaMLP mlp = nullptr;
  LlamaRMSNorm input_layernorm = nullptr;
  LlamaRMSNorm post_attention_layernorm = nullptr;
};
TORCH_MODULE(LlamaDecoderLayer);

/// The decoder stack without the LM head: embed_tokens, layers (LlamaDecoderLayer), norm. embed_tokens is called
/// through a slot, so that inject_lora can wrap it in a LoraEmbedding (target_modules naming "embed_tokens").
class LlamaModelImpl : public torch::nn::Cloneable<LlamaModelImpl>, public lorafuse::nn::LinearSlotOwner {
 public:
  explicit LlamaModelImpl(LlamaConfig config);

  void reset() override;
  /// embed_tokens ~ N(0, initializer_range) and the norms = 1 (nothing on the meta device). Linear layers keep
  /// their own initialisation.
  void reset_parameters();
  /// A deep copy that keeps each parameter's requires_grad. Unlike Cloneable's, it copies embed_tokens'
  /// table directly: torch::nn::Embedding's own clone() first allocates and initialises a table on the CPU,
  /// and cannot clone a meta table at all.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;
  /// input_ids [B, T] (int64 or int32, on the weights' device) -> last hidden state [B, T, hidden_size],
  /// after the final norm. Attention is causal; positions are 0..T-1. Token ids are not range-checked here
  /// (the embedding lookup does that on CPU). Not available on the meta device from C++ (the embedding
  /// lookup has no C++ meta kernel).
  at::Tensor forward(const at::Tensor& input_ids);
  lorafuse::nn::LinearSlot* linear_slot(const std::string& name) override;

  LlamaConfig config;
  /// The embedding table's layer (weight [vocab_size, hidden_size]); with a LoRA adapter on embed_tokens, the
  /// LoraEmbedding's base (the child registered as embed_tokens is then the LoraEmbedding).
  torch::nn::Embedding embed_tokens = nullptr;
  torch::nn::ModuleList layers = nullptr;
  LlamaRMSNorm norm = nullptr;

 private:
  lorafuse::nn::LinearSlot embed_slot_;  // what forward calls for embed_tokens
};
TORCH_MODULE(LlamaModel);

/// Llama with its language-model head: model (LlamaModel) and lm_head (no bias).
class LlamaForCausalLMImpl : public torch::nn::Cloneable<LlamaForCausalLMImpl>,
                             public lorafuse::nn::LinearSlotOwner,
                             public lorafuse::nn::PretrainedModel {
 public:
  explicit LlamaForCausalLMImpl(LlamaConfig config);

  void reset() override;
  /// A deep copy that keeps each parameter's requires_grad and clones the children directly: Cloneable's
  /// clone() would first build (allocate and initialise) a whole second model through reset() and then
  /// overwrite it.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;
  lorafuse::nn::LinearSlot* linear_slot(const std::string& name) override;
  /// "llama": LoraConfig's default targets are q_proj and v_proj.
  std::string model_type() const override { return "llama"; }
  /// "lm_head": "all-linear" leaves it out.
  std::string output_layer() const override { return "lm_head"; }
  /// input_ids [B, T] -> logits [B, T, vocab_size] in the weights' dtype.
  at::Tensor forward(const at::Tensor& input_ids);
  /// Every parameter once. With tie_word_embeddings one tensor is registered under two names and
  /// Module::parameters lists it twice, so an optimizer given that list would step it twice; this one (what
  /// `model->parameters()` calls on a LlamaForCausalLM) lists it once. named_parameters() keeps both names.
  std::vector<at::Tensor> parameters(bool recurse = true) const;

  LlamaConfig config;
  LlamaModel model = nullptr;
  lorafuse::nn::LinearSlot lm_head;
};
TORCH_MODULE(LlamaForCausalLM);

using LlamaImpl = LlamaForCausalLMImpl;
using Llama = LlamaForCausalLM;

}  // namespace lorafuse::models
