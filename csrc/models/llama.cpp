// The reference Llama decoder: rotary embeddings and the modules of <lorafuse/models/llama.h> (its configuration:
// llama_config.cpp).
#include <lorafuse/models/llama.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/nn/options/embedding.h>
#include <torch/nn/options/linear.h>

#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_layer.h>

#include <nlohmann/json.hpp>
#include <unordered_set>
#include <utility>

#include "csrc/config/json.h"

namespace lorafuse::models {

namespace {

// The dtype rotary angles and RMSNorm statistics are computed in: float32 as Hugging Face does, but float64
// for a float64 model so that it can serve as a tight reference.
c10::ScalarType compute_dtype(c10::ScalarType dtype) { return dtype == c10::kDouble ? c10::kDouble : c10::kFloat; }

// N(0, std) as Hugging Face initialises embeddings; a meta tensor has no values to fill.
void init_normal(const at::Tensor& weight, double std) {
  if (weight.is_meta()) return;
  at::NoGradGuard no_grad;
  weight.normal_(0.0, std);
}

// An Embedding with `options` that holds `table` [vocab, hidden] as its weight. torch::nn::Embedding's constructor
// would allocate and initialise a table on the CPU; a 1 x 1 one costs nothing, so a meta skeleton stays free.
torch::nn::Embedding embedding_with(const at::Tensor& table, const torch::nn::EmbeddingOptions& options) {
  torch::nn::Embedding embedding(torch::nn::EmbeddingOptions(1, 1));
  lorafuse::nn::replace_parameter(*embedding, "weight", table);
  embedding->weight = table;
  embedding->options = options;
  return embedding;
}

// A deep copy of `t` (moved to `device` when given), as Cloneable copies parameters.
at::Tensor copy_of(const at::Tensor& t, const std::optional<c10::Device>& device) {
  return device && t.device() != *device ? t.to(*device) : t.clone();
}

// [B, KV, T, D] -> [B, KV * groups, T, D]: every key/value head serves `groups` consecutive query heads.
at::Tensor repeat_kv(const at::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const auto b = x.size(0), kv = x.size(1), t = x.size(2), d = x.size(3);
  return x.unsqueeze(2).expand({b, kv, groups, t, d}).reshape({b, kv * groups, t, d});
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Rotary embedding

std::pair<at::Tensor, at::Tensor> llama_rotary_cos_sin(const at::Tensor& position_ids, int64_t head_dim, double theta,
                                                       c10::ScalarType dtype) {
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim % 2 == 0, "llama_rotary_cos_sin: head_dim must be even and > 0; found ",
                    head_dim);
  TORCH_CHECK_TYPE(!c10::isFloatingType(position_ids.scalar_type()) && !c10::isComplexType(position_ids.scalar_type()),
                   "llama_rotary_cos_sin: position_ids must have an integer dtype; found ", position_ids.scalar_type());
  const auto opts = position_ids.options().dtype(compute_dtype(dtype));
  // inv_freq[i] = 1 / theta^(2i / head_dim), i < head_dim / 2
  const at::Tensor exponent = at::arange(0, head_dim, 2, opts.dtype(at::kLong)).to(opts) / head_dim;
  const at::Tensor inv_freq = 1.0 / at::pow(theta, exponent);               // [D/2]
  const at::Tensor freqs = position_ids.to(opts).unsqueeze(-1) * inv_freq;  // [B, T, D/2]
  const at::Tensor angles = at::cat({freqs, freqs}, -1);                    // [B, T, D]
  return {angles.cos().to(dtype), angles.sin().to(dtype)};
}

at::Tensor llama_apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);  // rotate_half(x)
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);                            // cos, sin broadcast over heads
}

// ---------------------------------------------------------------------------------------------------------
// LlamaRMSNorm

LlamaRMSNormImpl::LlamaRMSNormImpl(LlamaRMSNormOptions options_) : options(std::move(options_)) {
  TORCH_CHECK_VALUE(options.hidden_size() > 0, "LlamaRMSNorm: hidden_size must be > 0; found ", options.hidden_size());
  TORCH_CHECK_VALUE(options.eps() >= 0.0, "LlamaRMSNorm: eps must be >= 0; found ", options.eps());
  reset();
}

void LlamaRMSNormImpl::reset() {
  // at::ones on the meta device only records the shape.
  weight = register_parameter("weight", at::ones({options.hidden_size()}, options.tensor_options()));
}

void LlamaRMSNormImpl::reset_parameters() {
  if (weight.is_meta()) return;
  at::NoGradGuard no_grad;
  weight.fill_(1.0);
}

std::shared_ptr<torch::nn::Module> LlamaRMSNormImpl::clone(const std::optional<c10::Device>& device) const {
  auto copy = Cloneable::clone(device);
  lorafuse::nn::copy_requires_grad(*this, *copy);
  return copy;
}

void LlamaRMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::models::LlamaRMSNorm(" << options.hidden_size() << ", eps=" << options.eps() << ")";
}

at::Tensor LlamaRMSNormImpl::forward(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == options.hidden_size(),
                    "LlamaRMSNorm: x must have shape [..., hidden_size] with hidden_size = ", options.hidden_size(),
                    "; found shape ", x.sizes());
  const at::Tensor xf = x.to(compute_dtype(x.scalar_type()));  // [..., H]
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + options.eps());
  return weight * normed.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------
// LlamaAttention

LlamaAttentionImpl::LlamaAttentionImpl(LlamaConfig config_) : config(std::move(config_)) {
  config.validate();
  reset();
}

void LlamaAttentionImpl::reset() {
  const int64_t h = config.hidden_size();
  const int64_t q_dim = config.num_attention_heads() * config.head_dim();
  const int64_t kv_dim = config.num_key_value_heads() * config.head_dim();
  const auto& opts = config.tensor_options();
  q_proj.reset(*this, "q_proj", torch::nn::LinearOptions(h, q_dim).bias(false), opts);
  k_proj.reset(*this, "k_proj", torch::nn::LinearOptions(h, kv_dim).bias(false), opts);
  v_proj.reset(*this, "v_proj", torch::nn::LinearOptions(h, kv_dim).bias(false), opts);
  o_proj.reset(*this, "o_proj", torch::nn::LinearOptions(q_dim, h).bias(false), opts);
}

std::shared_ptr<torch::nn::Module> LlamaAttentionImpl::clone(const std::optional<c10::Device>& device) const {
  auto copy = Cloneable::clone(device);
  lorafuse::nn::copy_requires_grad(*this, *copy);
  return copy;
}

void LlamaAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::models::LlamaAttention(hidden_size=" << config.hidden_size()
         << ", num_attention_heads=" << config.num_attention_heads()
         << ", num_key_value_heads=" << config.num_key_value_heads() << ", head_dim=" << config.head_dim()
         << ", rope_theta=" << config.rope_theta() << ")";
}

lorafuse::nn::LinearSlot* LlamaAttentionImpl::linear_slot(const std::string& name) {
  if (name == "q_proj") return &q_proj;
  if (name == "k_proj") return &k_proj;
  if (name == "v_proj") return &v_proj;
  if (name == "o_proj") return &o_proj;
  return nullptr;
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) == config.hidden_size(),
                    "LlamaAttention: x must have shape [B, T, hidden_size] with hidden_size = ", config.hidden_size(),
                    "; found shape ", x.sizes());
  const int64_t b = x.size(0), t = x.size(1);
  const int64_t heads = config.num_attention_heads(), kv_heads = config.num_key_value_heads();
  const int64_t d = config.head_dim();
  TORCH_CHECK_VALUE(cos.dim() == 3 && (cos.size(0) == b || cos.size(0) == 1) && cos.size(1) == t && cos.size(2) == d &&
                        cos.sizes() == sin.sizes(),
                    "LlamaAttention: cos and sin must have shape [B or 1, T, head_dim] = [", b, " or 1, ", t, ", ", d,
                    "]; found cos ", cos.sizes(), ", sin ", sin.sizes());

  at::Tensor q = q_proj(x).reshape({b, t, heads, d}).transpose(1, 2);     // [B, H, T, D]
  at::Tensor k = k_proj(x).reshape({b, t, kv_heads, d}).transpose(1, 2);  // [B, KV, T, D]
  at::Tensor v = v_proj(x).reshape({b, t, kv_heads, d}).transpose(1, 2);  // [B, KV, T, D]
  q = llama_apply_rotary(q, cos, sin);
  k = llama_apply_rotary(k, cos, sin);
  k = repeat_kv(k, heads / kv_heads);  // [B, H, T, D]
  v = repeat_kv(v, heads / kv_heads);  // [B, H, T, D]
  // Scale 1/sqrt(D). Every SDPA backend accumulates the softmax in float32 for float16/bfloat16 (the math
  // fallback upcasts), which is what Hugging Face's eager attention does explicitly.
  const at::Tensor attn = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                           /*is_causal=*/true);  // [B, H, T, D]
  return o_proj(attn.transpose(1, 2).reshape({b, t, heads * d}));                // [B, T, hidden]
}

// ---------------------------------------------------------------------------------------------------------
// LlamaMLP

LlamaMLPImpl::LlamaMLPImpl(LlamaConfig config_) : config(std::move(config_)) {
  config.validate();
  reset();
}

void LlamaMLPImpl::reset() {
  const int64_t h = config.hidden_size(), i = config.intermediate_size();
  const auto& opts = config.tensor_options();
  gate_proj.reset(*this, "gate_proj", torch::nn::LinearOptions(h, i).bias(false), opts);
  up_proj.reset(*this, "up_proj", torch::nn::LinearOptions(h, i).bias(false), opts);
  down_proj.reset(*this, "down_proj", torch::nn::LinearOptions(i, h).bias(false), opts);
}

std::shared_ptr<torch::nn::Module> LlamaMLPImpl::clone(const std::optional<c10::Device>& device) const {
  auto copy = Cloneable::clone(device);
  lorafuse::nn::copy_requires_grad(*this, *copy);
  return copy;
}

void LlamaMLPImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::models::LlamaMLP(hidden_size=" << config.hidden_size()
         << ", intermediate_size=" << config.intermediate_size() << ")";
}

lorafuse::nn::LinearSlot* LlamaMLPImpl::linear_slot(const std::string& name) {
  if (name == "gate_proj") return &gate_proj;
  if (name == "up_proj") return &up_proj;
  if (name == "down_proj") return &down_proj;
  return nullptr;
}

at::Tensor LlamaMLPImpl::forward(const at::Tensor& x) {
  return down_proj(at::silu(gate_proj(x)) * up_proj(x));  // [..., I] -> [..., hidden]
}

// ---------------------------------------------------------------------------------------------------------
// LlamaDecoderLayer

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(LlamaConfig config_) : config(std::move(config_)) {
  config.validate();
  reset();
}

void LlamaDecoderLayerImpl::reset() {
  const auto norm_options =
      LlamaRMSNormOptions(config.hidden_size()).eps(config.rms_norm_eps()).tensor_options(config.tensor_options());
  self_attn = register_module("self_attn", LlamaAttention(config));
  mlp = register_module("mlp", LlamaMLP(config));
  input_layernorm = register_module("input_layernorm", LlamaRMSNorm(norm_options));
  post_attention_layernorm = register_module("post_attention_layernorm", LlamaRMSNorm(norm_options));
}

std::shared_ptr<torch::nn::Module> LlamaDecoderLayerImpl::clone(const std::optional<c10::Device>& device) const {
  auto copy = Cloneable::clone(device);
  lorafuse::nn::copy_requires_grad(*this, *copy);
  return copy;
}

void LlamaDecoderLayerImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::models::LlamaDecoderLayer";
}

at::Tensor LlamaDecoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor h = x + self_attn->forward(input_layernorm->forward(x), cos, sin);  // [B, T, hidden]
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

// ---------------------------------------------------------------------------------------------------------
// LlamaModel

LlamaModelImpl::LlamaModelImpl(LlamaConfig config_) : config(std::move(config_)) {
  config.validate();
  reset();
}

void LlamaModelImpl::reset() {
  at::Tensor table = at::empty({config.vocab_size(), config.hidden_size()}, config.tensor_options());
  table.set_requires_grad(true);
  embed_tokens = register_module(
      "embed_tokens", embedding_with(table, torch::nn::EmbeddingOptions(config.vocab_size(), config.hidden_size())));
  embed_slot_.rebind(embed_tokens.ptr());
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_hidden_layers(); ++i) layers->push_back(LlamaDecoderLayer(config));
  norm = register_module("norm", LlamaRMSNorm(LlamaRMSNormOptions(config.hidden_size())
                                                  .eps(config.rms_norm_eps())
                                                  .tensor_options(config.tensor_options())));
  init_normal(embed_tokens->weight, config.initializer_range());
}

void LlamaModelImpl::reset_parameters() {
  init_normal(embed_tokens->weight, config.initializer_range());
  for (const auto& layer : *layers) {
    if (auto* l = layer->as<LlamaDecoderLayerImpl>()) {
      l->input_layernorm->reset_parameters();
      l->post_attention_layernorm->reset_parameters();
    }
  }
  norm->reset_parameters();
}

std::shared_ptr<torch::nn::Module> LlamaModelImpl::clone(const std::optional<c10::Device>& device) const {
  at::NoGradGuard no_grad;
  // The copy starts with this model's config and children; each child is replaced by its deep copy (in
  // registration order, which replace_module keeps).
  auto copy = std::make_shared<LlamaModelImpl>(*this);
  for (const auto& child : named_children()) {
    if (child.key() == "embed_tokens" && lorafuse::nn::as_lora_layer(child.value().get()) == nullptr) {
      copy->replace_module("embed_tokens",
                           embedding_with(copy_of(embed_tokens->weight, device), embed_tokens->options));
    } else {  // a LoRA layer on embed_tokens clones itself (its base included)
      copy->replace_module(child.key(), child.value()->clone(device));
    }
  }
  const auto children = copy->named_children();
  const auto embed = children["embed_tokens"];
  const auto* lora = lorafuse::nn::as_lora_layer(embed.get());
  copy->embed_tokens = torch::nn::Embedding(
      std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(lora != nullptr ? lora->base_module() : embed));
  copy->embed_slot_.rebind(embed);
  copy->layers = torch::nn::ModuleList(std::dynamic_pointer_cast<torch::nn::ModuleListImpl>(children["layers"]));
  copy->norm = LlamaRMSNorm(std::dynamic_pointer_cast<LlamaRMSNormImpl>(children["norm"]));
  lorafuse::nn::copy_requires_grad(*this, *copy);  // a frozen base stays frozen in the copy
  return copy;
}

lorafuse::nn::LinearSlot* LlamaModelImpl::linear_slot(const std::string& name) {
  return name == "embed_tokens" ? &embed_slot_ : nullptr;
}

void LlamaModelImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::models::LlamaModel(vocab_size=" << config.vocab_size()
         << ", hidden_size=" << config.hidden_size() << ", num_hidden_layers=" << config.num_hidden_layers()
         << ", rms_norm_eps=" << config.rms_norm_eps() << ")";
}

at::Tensor LlamaModelImpl::forward(const at::Tensor& input_ids) {
  TORCH_CHECK_VALUE(input_ids.defined(), "LlamaModel: input_ids must be a defined tensor [B, T]");
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "LlamaModel: input_ids must be 2-D [B, T]; found shape ", input_ids.sizes());
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
                   "LlamaModel: input_ids must have dtype int64 (or int32); found ", input_ids.scalar_type());
  const at::Tensor& table = embed_tokens->weight;
  TORCH_CHECK_VALUE(input_ids.device() == table.device(), "LlamaModel: input_ids must be on the weights' device ",
                    table.device(), "; found ", input_ids.device());

  const int64_t t = input_ids.size(1);
  at::Tensor h = embed_slot_(input_ids);                                                          // [B, T, hidden]
  const at::Tensor positions = at::arange(t, input_ids.options().dtype(at::kLong)).unsqueeze(0);  // [1, T]
  const auto [cos, sin] =
      llama_rotary_cos_sin(positions, config.head_dim(), config.rope_theta(), h.scalar_type());  // [1, T, D]
  for (const auto& layer : *layers) {
    auto* decoder = layer->as<LlamaDecoderLayerImpl>();
    TORCH_CHECK(decoder != nullptr, "LlamaModel: layers may hold only LlamaDecoderLayer modules; found ",
                layer->name());
    h = decoder->forward(h, cos, sin);
  }
  return norm->forward(h);
}

// ---------------------------------------------------------------------------------------------------------
// LlamaForCausalLM

LlamaForCausalLMImpl::LlamaForCausalLMImpl(LlamaConfig config_) : config(std::move(config_)) {
  config.validate();
  reset();
}

namespace {

// The registry of a module's own parameters (Module::parameters_, protected): through a pointer to member taken in a
// class derived from Module, which the language allows on any Module.
struct ParameterRegistry : torch::nn::Module {
  static torch::OrderedDict<std::string, at::Tensor>& of(torch::nn::Module& m) {
    return m.*(&ParameterRegistry::parameters_);
  }
};

// lm_head (a Linear, or the base Linear of a LoRA layer on it) computes with `weight`, the same tensor registered
// under its name too: what Hugging Face's tie_weights does.
void tie_lm_head(torch::nn::Module& lm_head, const at::Tensor& weight) {
  torch::nn::LinearImpl* linear = lm_head.as<torch::nn::LinearImpl>();
  if (linear == nullptr) {
    const auto base = lm_head.named_children().find("base_layer");
    linear = base != nullptr ? (*base)->as<torch::nn::LinearImpl>() : nullptr;
  }
  TORCH_CHECK(linear != nullptr, "LlamaForCausalLM: tie_word_embeddings: lm_head is a ", lm_head.name(),
              ", not a Linear layer (or a LoRA layer over one) whose weight can be embed_tokens'");
  TORCH_CHECK(linear->weight.sizes() == weight.sizes(), "LlamaForCausalLM: tie_word_embeddings: lm_head's weight is ",
              linear->weight.sizes(), ", embed_tokens' ", weight.sizes());
  ParameterRegistry::of(*linear)["weight"] = weight;
  linear->weight = weight;
}

}  // namespace

void LlamaForCausalLMImpl::reset() {
  model = register_module("model", LlamaModel(config));
  lm_head.reset(*this, "lm_head", torch::nn::LinearOptions(config.hidden_size(), config.vocab_size()).bias(false),
                config.tensor_options());
  if (config.tie_word_embeddings()) tie_lm_head(*lm_head.module(), model->embed_tokens->weight);
}

std::shared_ptr<torch::nn::Module> LlamaForCausalLMImpl::clone(const std::optional<c10::Device>& device) const {
  lorafuse::nn::check_cloneable(*this, "LlamaForCausalLM::clone");
  at::NoGradGuard no_grad;
  auto copy = std::make_shared<LlamaForCausalLMImpl>(*this);  // config; the children are replaced below
  for (const auto& child : named_children()) copy->replace_module(child.key(), child.value()->clone(device));
  const auto children = copy->named_children();
  copy->model = LlamaModel(std::dynamic_pointer_cast<LlamaModelImpl>(children["model"]));
  copy->lm_head.rebind(children["lm_head"]);  // the slot must call the copy's head, not this one's
  // the children were copied apart: the copy's head takes the copy's embedding, tied as here
  if (config.tie_word_embeddings()) tie_lm_head(*children["lm_head"], copy->model->embed_tokens->weight);
  lorafuse::nn::copy_requires_grad(*this, *copy);
  return copy;
}

void LlamaForCausalLMImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::models::LlamaForCausalLM(vocab_size=" << config.vocab_size()
         << ", hidden_size=" << config.hidden_size() << ", num_hidden_layers=" << config.num_hidden_layers() << ")";
}

lorafuse::nn::LinearSlot* LlamaForCausalLMImpl::linear_slot(const std::string& name) {
  return name == "lm_head" ? &lm_head : nullptr;
}

std::vector<at::Tensor> LlamaForCausalLMImpl::parameters(bool recurse) const {
  std::vector<at::Tensor> once;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (auto& p : torch::nn::Module::parameters(recurse)) {
    if (seen.insert(p.unsafeGetTensorImpl()).second) once.push_back(std::move(p));
  }
  return once;
}

at::Tensor LlamaForCausalLMImpl::forward(const at::Tensor& input_ids) {
  return lm_head(model->forward(input_ids));  // [B, T, vocab]
}

}  // namespace lorafuse::models
