// The reference Llama (<lorafuse/models/llama.h>): Hugging Face's module paths and shapes, forward against an
// independent float64 reference with explicit rotary and attention loops, causality, meta-device skeletons
// of 7B and 70B (parameter counts by formula, by summing and by hand), clone, serialization, linear slots and
// bad configs / inputs. [cpu] cases always run; the [cuda] case skips without a GPU.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/serialize.h>

#include <lorafuse/models/llama.h>
#include <lorafuse/nn/linear.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::models::LlamaConfig;
using lorafuse::models::LlamaDecoderLayerImpl;
using lorafuse::models::LlamaForCausalLM;
using lorafuse::models::LlamaForCausalLMImpl;
using lorafuse::models::LlamaModel;
using lorafuse_test::contains;

static_assert(std::is_same_v<lorafuse::models::Llama, LlamaForCausalLM>);
static_assert(std::is_same_v<lorafuse::models::LlamaImpl, LlamaForCausalLMImpl>);

namespace {

// hidden 32, 4 query heads of 8, 2 key/value heads (GQA), 2 layers; rope_theta small so that every rotary
// frequency turns noticeably over a few positions.
LlamaConfig tiny_config(at::ScalarType dtype = at::kFloat) {
  return LlamaConfig()
      .vocab_size(50)
      .hidden_size(32)
      .intermediate_size(48)
      .num_hidden_layers(2)
      .num_attention_heads(4)
      .num_key_value_heads(2)
      .rope_theta(500.0)
      .rms_norm_eps(1e-5)
      .tensor_options(at::TensorOptions().dtype(dtype));
}

std::map<std::string, at::Tensor> params_of(const torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value();
  return out;
}

int64_t count_parameters(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

// Gives every weight O(1)-scale random values (norm weights around 1) so that attention is far from
// uniform and a wrong wiring shows.
void randomize(torch::nn::Module& m, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& p : m.named_parameters()) {
    const bool is_norm = contains(p.key(), "norm");
    at::Tensor v = at::normal(0.0, 1.0, p.value().sizes(), gen, at::TensorOptions().dtype(at::kDouble));
    v = is_norm ? 1.0 + 0.2 * v : v * (contains(p.key(), "embed") ? 1.0 : 0.35);
    p.value().copy_(v);
  }
}

// Copies every parameter of `from` into the same-named parameter of `to` (converting dtype/device).
void copy_parameters(const torch::nn::Module& from, torch::nn::Module& to) {
  at::NoGradGuard no_grad;
  const auto src = params_of(from);
  for (auto& p : to.named_parameters()) p.value().copy_(src.at(p.key()));
}

at::Tensor ids_tensor(const std::vector<int64_t>& ids, int64_t batch) {
  return at::tensor(ids, at::kLong).view({batch, -1});
}

// ---- An independent float64 Llama: projections as matmuls, RMSNorm, rotary and causal GQA attention as
// explicit loops over scalars, read from the parameters by their Hugging Face names.

at::Tensor ref_rms(const at::Tensor& x, const at::Tensor& w, double eps) {  // x [B, T, H]
  return x / (x.pow(2).mean(-1, true) + eps).sqrt() * w;
}

// Rotates each pair (i, i + D/2) of every head vector at position t by t / theta^(2i/D).
// x [B, T, heads * D] -> [B, T, heads, D]
at::Tensor ref_rope(const at::Tensor& x, int64_t heads, int64_t d, double theta) {
  const int64_t b = x.size(0), t = x.size(1);
  at::Tensor in = x.reshape({b, t, heads, d}).contiguous();
  at::Tensor out = at::empty_like(in);
  auto xi = in.accessor<double, 4>();
  auto xo = out.accessor<double, 4>();
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t pos = 0; pos < t; ++pos) {
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < d / 2; ++i) {
          const double angle = static_cast<double>(pos) * std::pow(theta, -2.0 * static_cast<double>(i) / d);
          const double a = xi[bi][pos][h][i], c = xi[bi][pos][h][i + d / 2];
          xo[bi][pos][h][i] = a * std::cos(angle) - c * std::sin(angle);
          xo[bi][pos][h][i + d / 2] = c * std::cos(angle) + a * std::sin(angle);
        }
      }
    }
  }
  return out;
}

// q [B, T, H, D], k and v [B, T, KV, D] -> [B, T, H * D]; query head h reads key/value head h / (H / KV).
at::Tensor ref_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t b = q.size(0), t = q.size(1), heads = q.size(2), d = q.size(3), kv = k.size(2);
  at::Tensor out = at::zeros({b, t, heads, d}, at::kDouble);
  auto qa = q.accessor<double, 4>();
  auto ka = k.accessor<double, 4>();
  auto va = v.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / (heads / kv);
      for (int64_t i = 0; i < t; ++i) {
        std::vector<double> score(i + 1);
        double max_score = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {  // causal: keys 0..i only
          double s = 0.0;
          for (int64_t e = 0; e < d; ++e) s += qa[bi][i][h][e] * ka[bi][j][g][e];
          score[j] = s / std::sqrt(static_cast<double>(d));
          max_score = std::max(max_score, score[j]);
        }
        double total = 0.0;
        for (auto& s : score) total += (s = std::exp(s - max_score));
        for (int64_t j = 0; j <= i; ++j) {
          for (int64_t e = 0; e < d; ++e) oa[bi][i][h][e] += score[j] / total * va[bi][j][g][e];
        }
      }
    }
  }
  return out.view({b, t, heads * d});
}

at::Tensor reference_logits(const std::map<std::string, at::Tensor>& params, const LlamaConfig& c,
                            const at::Tensor& ids) {  // ids [B, T] -> [B, T, vocab]
  auto w = [&](const std::string& name) { return params.at(name).detach().to(at::kDouble); };
  auto linear = [&](const at::Tensor& x, const std::string& name) { return x.matmul(w(name).t()); };
  const int64_t b = ids.size(0), t = ids.size(1), d = c.hidden_size() / c.num_attention_heads();
  at::Tensor x = w("model.embed_tokens.weight").index_select(0, ids.reshape(-1)).view({b, t, c.hidden_size()});
  for (int64_t l = 0; l < c.num_hidden_layers(); ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    const at::Tensor a = ref_rms(x, w(pre + "input_layernorm.weight"), c.rms_norm_eps());
    const at::Tensor q =
        ref_rope(linear(a, pre + "self_attn.q_proj.weight"), c.num_attention_heads(), d, c.rope_theta());
    const at::Tensor k =
        ref_rope(linear(a, pre + "self_attn.k_proj.weight"), c.num_key_value_heads(), d, c.rope_theta());
    const at::Tensor v = linear(a, pre + "self_attn.v_proj.weight").reshape({b, t, c.num_key_value_heads(), d});
    x = x + linear(ref_attention(q, k, v), pre + "self_attn.o_proj.weight");
    const at::Tensor m = ref_rms(x, w(pre + "post_attention_layernorm.weight"), c.rms_norm_eps());
    const at::Tensor gate = linear(m, pre + "mlp.gate_proj.weight");
    const at::Tensor silu = gate / (1.0 + (-gate).exp());
    x = x + linear(silu * linear(m, pre + "mlp.up_proj.weight"), pre + "mlp.down_proj.weight");
  }
  return linear(ref_rms(x, w("model.norm.weight"), c.rms_norm_eps()), "lm_head.weight");
}

using lorafuse_test::TempDir;

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

}  // namespace

TEST_CASE("LlamaForCausalLM has the module paths and shapes of Hugging Face", "[cpu][models]") {
  const LlamaConfig c = tiny_config();
  LlamaForCausalLM model(c);
  const int64_t h = 32, kv_dim = 2 * 8, i = 48, v = 50;
  std::map<std::string, std::vector<int64_t>> expected = {
      {"model.embed_tokens.weight", {v, h}},
      {"model.norm.weight", {h}},
      {"lm_head.weight", {v, h}},
  };
  for (int l = 0; l < 2; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    expected[pre + "self_attn.q_proj.weight"] = {h, h};
    expected[pre + "self_attn.k_proj.weight"] = {kv_dim, h};
    expected[pre + "self_attn.v_proj.weight"] = {kv_dim, h};
    expected[pre + "self_attn.o_proj.weight"] = {h, h};
    expected[pre + "mlp.gate_proj.weight"] = {i, h};
    expected[pre + "mlp.up_proj.weight"] = {i, h};
    expected[pre + "mlp.down_proj.weight"] = {h, i};
    expected[pre + "input_layernorm.weight"] = {h};
    expected[pre + "post_attention_layernorm.weight"] = {h};
  }
  const auto params = params_of(*model);
  std::set<std::string> names, expected_names;
  for (const auto& [name, t] : params) names.insert(name);
  for (const auto& [name, shape] : expected) expected_names.insert(name);
  CHECK(names == expected_names);
  for (const auto& [name, shape] : expected) {
    INFO("parameter " << name);
    REQUIRE(params.count(name) == 1);
    CHECK(params.at(name).sizes() == at::IntArrayRef(shape));
    CHECK(params.at(name).scalar_type() == at::kFloat);
    CHECK(params.at(name).requires_grad());
  }
  CHECK(model->named_buffers().is_empty());  // no inv_freq or mask buffers: nothing beyond HF's state dict
  CHECK(count_parameters(*model) == c.num_parameters());

  // Initialisation: norms are ones, the embedding is N(0, 0.02) as Hugging Face does.
  CHECK(at::equal(params.at("model.norm.weight"), at::ones({h})));
  const double std = params.at("model.embed_tokens.weight").std().item<double>();
  CHECK(std == Approx(0.02).epsilon(0.15));
}

TEST_CASE("every linear layer of LlamaForCausalLM sits in a LinearSlot bound to the registered child",
          "[cpu][models]") {
  LlamaForCausalLM model(tiny_config());
  auto check_slots = [](lorafuse::nn::LinearSlotOwner& owner, torch::nn::Module& module,
                        const std::vector<std::string>& names) {
    const auto children = module.named_children();
    for (const auto& name : names) {
      INFO("slot " << name);
      lorafuse::nn::LinearSlot* slot = owner.linear_slot(name);
      REQUIRE(slot != nullptr);
      CHECK(slot->module() == children[name]);
    }
    CHECK(owner.linear_slot("no_such_layer") == nullptr);
  };
  check_slots(*model, *model, {"lm_head"});
  CHECK(model->linear_slot("model") == nullptr);
  for (size_t l = 0; l < model->model->layers->size(); ++l) {
    auto& layer = model->model->layers->at<LlamaDecoderLayerImpl>(l);
    check_slots(*layer.self_attn, *layer.self_attn, {"q_proj", "k_proj", "v_proj", "o_proj"});
    check_slots(*layer.mlp, *layer.mlp, {"gate_proj", "up_proj", "down_proj"});
  }
}

TEST_CASE("Llama forward gives logits of shape B x T x vocab in the weights' dtype", "[cpu][models]") {
  const at::Tensor ids = ids_tensor({1, 7, 3, 49, 0, 12, 5, 5, 8, 2}, 2);  // [2, 5]
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    INFO("dtype " << dtype);
    LlamaForCausalLM model(tiny_config(dtype));
    const at::Tensor logits = model(ids);
    CHECK(logits.sizes() == at::IntArrayRef({2, 5, 50}));
    CHECK(logits.scalar_type() == dtype);
    CHECK(at::isfinite(logits).all().item<bool>());
    const at::Tensor hidden = model->model(ids);
    CHECK(hidden.sizes() == at::IntArrayRef({2, 5, 32}));
    CHECK(hidden.scalar_type() == dtype);
  }
  SECTION("int32 ids give the same logits as int64 ids") {
    LlamaForCausalLM model(tiny_config());
    CHECK(at::equal(model(ids), model(ids.to(at::kInt))));
  }
  SECTION("one token, and a batch of zero sequences") {
    LlamaForCausalLM model(tiny_config());
    CHECK(model(ids_tensor({4}, 1)).sizes() == at::IntArrayRef({1, 1, 50}));
    CHECK(model(at::zeros({0, 3}, at::kLong)).sizes() == at::IntArrayRef({0, 3, 50}));
  }
}

TEST_CASE("Llama matches an independent reference with explicit rotary and causal GQA attention", "[cpu][models]") {
  const LlamaConfig c = tiny_config(at::kDouble);
  LlamaForCausalLM model(c);
  randomize(*model, 7);
  const at::Tensor ids = ids_tensor({3, 14, 15, 9, 2, 6, 49, 35, 8, 9, 7, 9, 3, 23, 0, 28}, 2);  // [2, 8]
  const at::Tensor ref = reference_logits(params_of(*model), c, ids);
  const double scale = ref.abs().max().item<double>();
  REQUIRE(scale > 1.0);  // the logits are far from zero: the comparison below means something

  SECTION("float64, tight") {
    const at::Tensor logits = model(ids);
    CHECK(max_abs_diff(logits, ref) <= 1e-10 * scale);
  }
  SECTION("float32 with the same weights") {
    LlamaForCausalLM model32(tiny_config(at::kFloat));
    copy_parameters(*model, *model32);
    CHECK(max_abs_diff(model32(ids), ref) <= 1e-4 * scale);
  }
  SECTION("bfloat16 with the same weights, loosely") {
    LlamaForCausalLM model16(tiny_config(at::kBFloat16));
    copy_parameters(*model, *model16);
    CHECK(max_abs_diff(model16(ids), ref) <= 0.1 * scale);
  }
  SECTION("the reference is sensitive to what it checks") {
    // Without rotary (theta huge: every angle ~ 0 except the first pair) the logits differ clearly, so the
    // tight comparison above does test the rotary embedding.
    LlamaConfig no_rope = c;
    no_rope.rope_theta(1e30);
    CHECK(max_abs_diff(reference_logits(params_of(*model), no_rope, ids), ref) > 1e-3 * scale);
  }
}

TEST_CASE("LlamaRMSNorm normalises in float32 and casts back before the weight, as Hugging Face", "[cpu][models]") {
  lorafuse::models::LlamaRMSNorm norm(
      lorafuse::models::LlamaRMSNormOptions(16).eps(1e-5).tensor_options(at::TensorOptions().dtype(at::kBFloat16)));
  {
    at::NoGradGuard no_grad;
    norm->weight.copy_(at::linspace(0.5, 2.0, 16));
  }
  const at::Tensor x = (at::randn({3, 5, 16}) * 30.0).to(at::kBFloat16);
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor expected = norm->weight * (xf / (xf.pow(2).mean(-1, true) + 1e-5).sqrt()).to(at::kBFloat16);
  const at::Tensor y = norm(x);
  CHECK(y.scalar_type() == at::kBFloat16);
  // Only rsqrt vs 1/sqrt rounding in float32 may differ, which can flip one bfloat16 rounding.
  CHECK(at::allclose(y.to(at::kFloat), expected.to(at::kFloat), /*rtol=*/1e-2, /*atol=*/1e-6));
  CHECK_THROWS_AS(norm(at::zeros({3, 15}, at::kBFloat16)), c10::ValueError);
}

TEST_CASE("Llama is causal", "[cpu][models]") {
  LlamaForCausalLM model(tiny_config(at::kDouble));
  randomize(*model, 3);
  const at::Tensor ids = ids_tensor({5, 17, 2, 33, 8, 41, 0, 19}, 1);  // [1, 8]
  const at::Tensor logits = model(ids);
  for (int64_t t = 0; t + 1 < 8; ++t) {
    INFO("changing token " << t + 1);
    at::Tensor changed = ids.clone();
    changed[0][t + 1] = (changed[0][t + 1].item<int64_t>() + 1) % 50;
    const at::Tensor other = model(changed);
    CHECK(max_abs_diff(other.slice(1, 0, t + 1), logits.slice(1, 0, t + 1)) <= 1e-12);
    CHECK(max_abs_diff(other.slice(1, t + 1), logits.slice(1, t + 1)) > 1e-6);
  }
  at::Tensor changed = ids.clone();
  changed[0][0] = 6;
  const at::Tensor other = model(changed);
  for (int64_t t = 1; t < 8; ++t) {
    INFO("position " << t << " after changing token 0");
    CHECK(max_abs_diff(other.select(1, t), logits.select(1, t)) > 1e-6);
  }
}

TEST_CASE("meta-device skeletons of Llama 2 7B and Llama 3 70B build instantly", "[cpu][models]") {
  struct Case {
    const char* name;
    LlamaConfig config;
    int64_t by_hand;
  };
  // Llama 2 7B: embed 32000·4096 = 131,072,000; per layer attention 4·4096² = 67,108,864, MLP
  // 3·4096·11008 = 135,266,304, norms 2·4096 = 8,192, so 202,383,360 · 32 = 6,476,267,520; final norm 4,096;
  // lm_head 131,072,000. Total 131,072,000 + 6,476,267,520 + 4,096 + 131,072,000 = 6,738,415,616.
  // Llama 3 70B (head_dim 128, k/v width 8·128 = 1024): embed 128256·8192 = 1,050,673,152; per layer
  // q, o 2·8192² = 134,217,728, k, v 2·8192·1024 = 16,777,216, MLP 3·8192·28672 = 704,643,072, norms 16,384,
  // so 855,654,400 · 80 = 68,452,352,000; final norm 8,192; lm_head 1,050,673,152.
  // Total 2·1,050,673,152 + 68,452,352,000 + 8,192 = 70,553,706,496.
  const Case cases[] = {
      {"llama2_7b", LlamaConfig::llama2_7b(), 6738415616LL},
      {"llama3_70b", LlamaConfig::llama3_70b(), 70553706496LL},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const auto start = std::chrono::steady_clock::now();
    LlamaForCausalLM model(
        LlamaConfig(c.config).tensor_options(at::TensorOptions().device(at::kMeta).dtype(at::kBFloat16)));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CHECK(seconds < 5.0);
    for (const auto& p : model->named_parameters()) {
      INFO("parameter " << p.key());
      CHECK(p.value().is_meta());
      CHECK(p.value().scalar_type() == at::kBFloat16);
    }
    CHECK(c.config.num_parameters() == c.by_hand);
    CHECK(count_parameters(*model) == c.by_hand);
    CHECK(model->named_parameters().size() == static_cast<size_t>(3 + 9 * c.config.num_hidden_layers()));
  }
  CHECK(LlamaConfig::llama3_70b().rope_theta() == 500000.0);
  CHECK(LlamaConfig::llama3_70b().rms_norm_eps() == 1e-5);
  CHECK(LlamaConfig::llama2_7b().rope_theta() == 10000.0);
}

TEST_CASE("Llama clone is a deep copy that forwards the same", "[cpu][models]") {
  LlamaForCausalLM model(tiny_config());
  randomize(*model, 11);
  // A LoRA model freezes its base: the copy must train exactly what the original trains.
  for (auto& p : model->named_parameters()) {
    if (!contains(p.key(), "layers.1.")) p.value().set_requires_grad(false);
  }
  auto copy = LlamaForCausalLM(std::dynamic_pointer_cast<LlamaForCausalLMImpl>(model->clone()));
  REQUIRE(copy.ptr() != nullptr);
  const auto a = params_of(*model);
  const auto b = params_of(*copy);
  REQUIRE(a.size() == b.size());
  for (const auto& [name, t] : a) {
    INFO("parameter " << name);
    REQUIRE(b.count(name) == 1);
    CHECK(b.at(name).data_ptr() != t.data_ptr());
    CHECK(at::equal(b.at(name), t));
    CHECK(b.at(name).requires_grad() == t.requires_grad());
  }
  const at::Tensor ids = ids_tensor({1, 2, 3, 4, 5, 6}, 2);
  const at::Tensor before = model(ids);
  CHECK(at::equal(copy(ids), before));

  // Changing a weight of the copy changes the copy's output (its slots call its own layers) and leaves the
  // original alone.
  for (const char* name : {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                           "lm_head.weight", "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"}) {
    INFO("changing " << name);
    const at::Tensor copy_before = copy(ids);
    {
      at::NoGradGuard no_grad;
      b.at(name).add_(0.5);
    }
    CHECK_FALSE(at::equal(a.at(name), b.at(name)));
    CHECK(at::equal(model(ids), before));
    CHECK(max_abs_diff(copy(ids), copy_before) > 1e-4);
  }
}

TEST_CASE("tie_word_embeddings: lm_head computes with embed_tokens' weight, one tensor under both names, clones too",
          "[cpu][models]") {
  const LlamaConfig config = tiny_config().tie_word_embeddings(true);
  LlamaForCausalLM model(config);
  randomize(*model, 13);
  const auto params = model->named_parameters();
  const at::Tensor& embed = params["model.embed_tokens.weight"];
  CHECK(params["lm_head.weight"].unsafeGetTensorImpl() == embed.unsafeGetTensorImpl());
  std::set<const c10::TensorImpl*> seen;
  int64_t distinct = 0;
  for (const auto& p : params) {
    if (seen.insert(p.value().unsafeGetTensorImpl()).second) distinct += p.value().numel();
  }
  CHECK(distinct == config.num_parameters());
  CHECK(model->parameters().size() == seen.size());  // an optimizer given parameters() steps the tied weight once
  CHECK(model->named_parameters().size() == seen.size() + 1);  // both names stay
  CHECK(config.num_parameters() == tiny_config().num_parameters() - 50 * 32);
  const at::Tensor ids = ids_tensor({1, 2, 3, 4, 5, 6}, 2);
  const at::Tensor logits = model(ids);
  CHECK(at::allclose(logits, at::matmul(model->model->forward(ids), embed.t()), 1e-5, 1e-6));
  {  // one tensor: changing the embedding changes the head
    at::NoGradGuard no_grad;
    embed.mul_(1.5);
  }
  CHECK_FALSE(at::allclose(model(ids), logits));
  auto copy = LlamaForCausalLM(std::dynamic_pointer_cast<LlamaForCausalLMImpl>(model->clone()));
  const auto copied = copy->named_parameters();
  CHECK(copied["lm_head.weight"].unsafeGetTensorImpl() == copied["model.embed_tokens.weight"].unsafeGetTensorImpl());
  CHECK(copied["lm_head.weight"].data_ptr() != embed.data_ptr());
  CHECK(at::equal(copy(ids), model(ids)));
  CHECK(LlamaConfig::from_hf_json(config.to_hf_json()).tie_word_embeddings());
  CHECK_FALSE(LlamaConfig::from_hf_json(tiny_config().to_hf_json()).tie_word_embeddings());
}

TEST_CASE("Llama survives a torch::save and torch::load round trip", "[cpu][models]") {
  LlamaForCausalLM saved(tiny_config());
  randomize(*saved, 5);
  LlamaForCausalLM loaded(tiny_config());  // different initial values
  const at::Tensor ids = ids_tensor({9, 8, 7, 6, 5}, 1);
  REQUIRE_FALSE(at::equal(saved(ids), loaded(ids)));

  const TempDir dir;
  const std::string file = dir.path + "/llama.pt";
  torch::save(saved, file);
  torch::load(loaded, file);
  REQUIRE(std::remove(file.c_str()) == 0);

  CHECK(at::equal(saved(ids), loaded(ids)));
  const auto a = params_of(*saved);
  for (const auto& [name, t] : params_of(*loaded)) {
    INFO("parameter " << name);
    CHECK(at::equal(t, a.at(name)));
  }
}

TEST_CASE("LlamaConfig rejects bad values naming the field", "[cpu][models][errors]") {
  struct Case {
    const char* what;
    std::function<void(LlamaConfig&)> change;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"vocab_size 0", [](LlamaConfig& c) { c.vocab_size(0); }, {"vocab_size", "> 0", "found 0"}},
      {"hidden_size -8", [](LlamaConfig& c) { c.hidden_size(-8); }, {"hidden_size", "found -8"}},
      {"intermediate_size 0", [](LlamaConfig& c) { c.intermediate_size(0); }, {"intermediate_size"}},
      {"num_hidden_layers 0", [](LlamaConfig& c) { c.num_hidden_layers(0); }, {"num_hidden_layers"}},
      {"num_attention_heads 0", [](LlamaConfig& c) { c.num_attention_heads(0); }, {"num_attention_heads"}},
      {"num_key_value_heads 0", [](LlamaConfig& c) { c.num_key_value_heads(0); }, {"num_key_value_heads"}},
      {"max_position_embeddings 0", [](LlamaConfig& c) { c.max_position_embeddings(0); }, {"max_position_embeddings"}},
      {"hidden_size not divisible by the heads",
       [](LlamaConfig& c) { c.hidden_size(30); },
       {"hidden_size must be divisible by num_attention_heads", "hidden_size = 30", "num_attention_heads = 4"}},
      {"heads not divisible by the kv heads",
       [](LlamaConfig& c) { c.num_key_value_heads(3); },
       {"num_attention_heads must be divisible by num_key_value_heads", "num_key_value_heads = 3"}},
      {"odd head_dim", [](LlamaConfig& c) { c.hidden_size(12); }, {"head_dim", "even", "found head_dim = 3"}},
      {"rope_theta 0", [](LlamaConfig& c) { c.rope_theta(0.0); }, {"rope_theta", "> 0"}},
      {"negative rms_norm_eps", [](LlamaConfig& c) { c.rms_norm_eps(-1e-6); }, {"rms_norm_eps", ">= 0"}},
  };
  for (const auto& k : cases) {
    INFO("case " << k.what);
    LlamaConfig c = tiny_config();
    k.change(c);
    for (const std::string& msg : {lorafuse_test::message_of<c10::ValueError>([&] { c.validate(); }),
                                   lorafuse_test::message_of<c10::ValueError>([&] { LlamaForCausalLM model(c); }),
                                   lorafuse_test::message_of<c10::ValueError>([&] { (void)c.num_parameters(); })}) {
      INFO("message: " << msg);
      CHECK(contains(msg, "LlamaConfig"));
      for (const auto& part : k.parts) {
        INFO("expected part: " << part);
        CHECK(contains(msg, part));
      }
    }
  }
  SECTION("an integer dtype is a type error") {
    const LlamaConfig c = tiny_config(at::kLong);
    const std::string msg = lorafuse_test::message_of<c10::TypeError>([&] { c.validate(); });
    CHECK(contains(msg, "tensor_options"));
    CHECK(contains(msg, "Long"));
    CHECK_THROWS_AS(LlamaForCausalLM(c), c10::TypeError);
  }
}

TEST_CASE("Llama rejects bad input_ids naming the argument", "[cpu][models][errors]") {
  LlamaForCausalLM model(tiny_config());
  auto value_error = [&](const at::Tensor& ids, const std::vector<std::string>& parts) {
    const std::string msg = lorafuse_test::message_of<c10::ValueError>([&] { model(ids); });
    INFO("message: " << msg);
    for (const auto& part : parts) {
      INFO("expected part: " << part);
      CHECK(contains(msg, part));
    }
  };
  SECTION("1-D") { value_error(at::zeros({5}, at::kLong), {"input_ids", "2-D [B, T]", "[5]"}); }
  SECTION("3-D") { value_error(at::zeros({1, 2, 3}, at::kLong), {"input_ids", "2-D [B, T]", "[1, 2, 3]"}); }
  SECTION("another device") {
    value_error(at::zeros({1, 3}, at::TensorOptions().dtype(at::kLong).device(at::kMeta)),
                {"input_ids", "device", "cpu", "meta"});
  }
  SECTION("undefined") { value_error(at::Tensor(), {"input_ids"}); }
  SECTION("floating-point ids are a type error") {
    const std::string msg = lorafuse_test::message_of<c10::TypeError>([&] { model(at::zeros({1, 3})); });
    INFO("message: " << msg);
    CHECK(contains(msg, "input_ids"));
    CHECK(contains(msg, "int64"));
    CHECK(contains(msg, "Float"));
  }
}

TEST_CASE("Llama on CUDA matches the CPU model", "[cuda][models]") {
  if (!lorafuse_test::gpu_available()) LORAFUSE_SKIP("no CUDA device");
  LlamaForCausalLM cpu(tiny_config());
  randomize(*cpu, 13);
  const at::Tensor ids = ids_tensor({3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8}, 2);
  const at::Tensor expected = cpu(ids);
  LlamaForCausalLM gpu(tiny_config().tensor_options(at::TensorOptions().device(at::kCUDA)));
  copy_parameters(*cpu, *gpu);
  const at::Tensor logits = gpu(ids.cuda());
  CHECK(logits.is_cuda());
  CHECK(max_abs_diff(logits.cpu(), expected) <= 1e-3 * expected.abs().max().item<double>());
  LlamaForCausalLM gpu16(
      tiny_config(at::kBFloat16).tensor_options(at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA)));
  copy_parameters(*cpu, *gpu16);
  const at::Tensor logits16 = gpu16(ids.cuda());
  CHECK(logits16.scalar_type() == at::kBFloat16);
  CHECK(max_abs_diff(logits16.cpu(), expected) <= 0.1 * expected.abs().max().item<double>());
}
