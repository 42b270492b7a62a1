// The reference Llama's configuration (<lorafuse/models/llama.h>): presets, checks, Hugging Face's config.json both
// ways, the parameter count.
#include <lorafuse/models/llama.h>

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>
#include <utility>

#include "csrc/config/json.h"

namespace lorafuse::models {

namespace {

// The sizes of a LlamaConfig (Hugging Face's field names), each > 0.
std::vector<std::pair<const char*, int64_t>> size_fields(const LlamaConfig& c) {
  return {{"vocab_size", c.vocab_size()},
          {"hidden_size", c.hidden_size()},
          {"intermediate_size", c.intermediate_size()},
          {"num_hidden_layers", c.num_hidden_layers()},
          {"num_attention_heads", c.num_attention_heads()},
          {"num_key_value_heads", c.num_key_value_heads()},
          {"max_position_embeddings", c.max_position_embeddings()}};
}

}  // namespace

LlamaConfig LlamaConfig::llama2_7b() {
  return LlamaConfig()
      .vocab_size(32000)
      .hidden_size(4096)
      .intermediate_size(11008)
      .num_hidden_layers(32)
      .num_attention_heads(32)
      .num_key_value_heads(32)
      .max_position_embeddings(4096)
      .rope_theta(10000.0)
      .rms_norm_eps(1e-5);  // the checkpoint's config.json, not LlamaConfig's default 1e-6
}

LlamaConfig LlamaConfig::llama3_70b() {
  return LlamaConfig()
      .vocab_size(128256)
      .hidden_size(8192)
      .intermediate_size(28672)
      .num_hidden_layers(80)
      .num_attention_heads(64)
      .num_key_value_heads(8)
      .max_position_embeddings(8192)
      .rope_theta(500000.0)
      .rms_norm_eps(1e-5);
}

void LlamaConfig::validate() const {
  for (const auto& [name, value] : size_fields(*this)) {
    TORCH_CHECK_VALUE(value > 0, "LlamaConfig: ", name, " must be > 0; found ", value);
  }
  TORCH_CHECK_VALUE(hidden_size() % num_attention_heads() == 0,
                    "LlamaConfig: hidden_size must be divisible by num_attention_heads; found hidden_size = ",
                    hidden_size(), ", num_attention_heads = ", num_attention_heads());
  TORCH_CHECK_VALUE(num_attention_heads() % num_key_value_heads() == 0,
                    "LlamaConfig: num_attention_heads must be divisible by num_key_value_heads; found "
                    "num_attention_heads = ",
                    num_attention_heads(), ", num_key_value_heads = ", num_key_value_heads());
  TORCH_CHECK_VALUE(head_dim() % 2 == 0,
                    "LlamaConfig: head_dim = hidden_size / num_attention_heads must be even for the rotary "
                    "embedding; found head_dim = ",
                    head_dim(), " (hidden_size = ", hidden_size(), ", num_attention_heads = ", num_attention_heads(),
                    ")");
  TORCH_CHECK_VALUE(rope_theta() > 0.0, "LlamaConfig: rope_theta must be > 0; found ", rope_theta());
  TORCH_CHECK_VALUE(rms_norm_eps() >= 0.0, "LlamaConfig: rms_norm_eps must be >= 0; found ", rms_norm_eps());
  TORCH_CHECK_VALUE(initializer_range() >= 0.0, "LlamaConfig: initializer_range must be >= 0; found ",
                    initializer_range());
  const auto dtype = c10::typeMetaToScalarType(tensor_options().dtype());
  TORCH_CHECK_TYPE(c10::isFloatingType(dtype),
                   "LlamaConfig: tensor_options must have a floating-point dtype (float32, float16, bfloat16, "
                   "float64); found ",
                   dtype);
  TORCH_CHECK_VALUE(tensor_options().layout() == c10::kStrided,
                    "LlamaConfig: tensor_options must have the strided layout; found ", tensor_options().layout());
}

LlamaConfig LlamaConfig::from_hf_json(const std::string& json_text, const std::string& what) {
  using json = nlohmann::json;
  const json j = lorafuse::detail::parse_json<json>(json_text, what);
  TORCH_CHECK_VALUE(j.is_object(), what, ": expected a JSON object, found ", j.type_name());
  const auto field = [&](const char* key) -> const json& {
    static const json null;
    return j.contains(key) ? j[key] : null;
  };
  TORCH_CHECK_VALUE(field("model_type") == "llama", what, ": model_type: expected \"llama\", found ",
                    field("model_type").dump());
  const auto integer = [&](const char* key) {
    const auto& v = field(key);
    TORCH_CHECK_VALUE(v.is_number_integer(), what, ": ", key, ": expected an integer, found ", v.dump());
    return v.get<int64_t>();
  };
  const auto number = [&](const char* key, double fallback) {
    const auto& v = field(key);
    if (v.is_null()) return fallback;
    TORCH_CHECK_VALUE(v.is_number(), what, ": ", key, ": expected a number, found ", v.dump());
    return v.get<double>();
  };
  const auto refuse_true = [&](const char* key, const char* why) {
    const auto& v = field(key);
    TORCH_CHECK_VALUE(v.is_null() || v == false, what, ": ", key, " = ", v.dump(), ": ", why);
  };
  refuse_true("attention_bias", "the reference Llama's attention has no biases");
  refuse_true("mlp_bias", "the reference Llama's MLP has no biases");
  TORCH_CHECK_VALUE(field("rope_scaling").is_null(), what, ": rope_scaling = ", field("rope_scaling").dump(),
                    ": the reference Llama has the plain rotary embedding only");
  double rope_theta = number("rope_theta", 10000.0);
  if (const auto& rope = field("rope_parameters"); !rope.is_null()) {  // transformers 5
    TORCH_CHECK_VALUE(rope.is_object() && (!rope.contains("rope_type") || rope["rope_type"] == "default"), what,
                      ": rope_parameters = ", rope.dump(),
                      ": the reference Llama has the plain (\"default\") rotary embedding only");
    if (rope.contains("rope_theta")) {
      TORCH_CHECK_VALUE(rope["rope_theta"].is_number(), what, ": rope_parameters.rope_theta: expected a number, found ",
                        rope["rope_theta"].dump());
      rope_theta = rope["rope_theta"].get<double>();
    }
  }
  TORCH_CHECK_VALUE(field("hidden_act").is_null() || field("hidden_act") == "silu", what,
                    ": hidden_act: expected \"silu\", found ", field("hidden_act").dump());
  LlamaConfig c;
  c.vocab_size(integer("vocab_size"))
      .hidden_size(integer("hidden_size"))
      .intermediate_size(integer("intermediate_size"))
      .num_hidden_layers(integer("num_hidden_layers"))
      .num_attention_heads(integer("num_attention_heads"))
      .num_key_value_heads(field("num_key_value_heads").is_null() ? c.num_attention_heads()
                                                                  : integer("num_key_value_heads"))
      .rope_theta(rope_theta)
      .rms_norm_eps(number("rms_norm_eps", 1e-6))
      .initializer_range(number("initializer_range", 0.02));
  if (!field("max_position_embeddings").is_null()) c.max_position_embeddings(integer("max_position_embeddings"));
  if (const auto& tie = field("tie_word_embeddings"); !tie.is_null()) {  // transformers' LlamaConfig default: false
    TORCH_CHECK_VALUE(tie.is_boolean(), what, ": tie_word_embeddings: expected true or false, found ", tie.dump());
    c.tie_word_embeddings(tie.get<bool>());
  }
  c.validate();
  TORCH_CHECK_VALUE(field("head_dim").is_null() || integer("head_dim") == c.head_dim(), what,
                    ": head_dim = ", field("head_dim").dump(),
                    ": the reference Llama's head_dim is hidden_size / "
                    "num_attention_heads = ",
                    c.head_dim());
  return c;
}

std::string LlamaConfig::to_hf_json() const {
  validate();
  const auto dtype = c10::typeMetaToScalarType(tensor_options().dtype());
  const char* dtype_name = dtype == at::kBFloat16 ? "bfloat16"
                           : dtype == at::kHalf   ? "float16"
                           : dtype == at::kDouble ? "float64"
                                                  : "float32";
  nlohmann::ordered_json j = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}};
  for (const auto& [name, value] : size_fields(*this)) j[name] = value;
  j.update(nlohmann::ordered_json{{"head_dim", head_dim()},
                                  {"rope_theta", rope_theta()},
                                  {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", rope_theta()}}},
                                  {"rms_norm_eps", rms_norm_eps()},
                                  {"initializer_range", initializer_range()},
                                  {"hidden_act", "silu"},
                                  {"attention_bias", false},
                                  {"mlp_bias", false},
                                  {"tie_word_embeddings", tie_word_embeddings()},
                                  {"torch_dtype", dtype_name}});
  return j.dump(2);
}

int64_t LlamaConfig::head_dim() const {
  return num_attention_heads() > 0 ? hidden_size() / num_attention_heads() : 0;  // 0: validate() says why
}

int64_t LlamaConfig::num_parameters() const {
  validate();
  const int64_t h = hidden_size();
  const int64_t kv_dim = num_key_value_heads() * head_dim();
  const int64_t attention = 2 * h * h + 2 * h * kv_dim;      // q_proj, o_proj; k_proj, v_proj
  const int64_t mlp = 3 * h * intermediate_size();           // gate_proj, up_proj, down_proj
  const int64_t layer = attention + mlp + 2 * h;             // + input/post_attention layernorms
  return vocab_size() * h + num_hidden_layers() * layer + h  // embed_tokens, layers, norm
         + (tie_word_embeddings() ? 0 : vocab_size() * h);   // lm_head (tied: embed_tokens' weight)
}

}  // namespace lorafuse::models
