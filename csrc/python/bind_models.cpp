// lorafuse.models: the reference Llama and its config.
#include "csrc/python/convert.h"

#include <lorafuse/models/llama.h>

namespace lorafuse::python {

void bind_models(py::module& m) {
  using models::LlamaConfig;
  py::class_<LlamaConfig>(m, "LlamaConfig")
      .def(py::init([](int64_t vocab_size, int64_t hidden_size, int64_t intermediate_size, int64_t num_hidden_layers,
                       int64_t num_attention_heads, int64_t num_key_value_heads, int64_t max_position_embeddings,
                       double rope_theta, double rms_norm_eps, double initializer_range, bool tie_word_embeddings,
                       std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
             auto options = c10::TensorOptions().dtype(dtype.value_or(at::kFloat)).device(device.value_or(at::kCPU));
             LlamaConfig c;
             c.vocab_size(vocab_size)
                 .hidden_size(hidden_size)
                 .intermediate_size(intermediate_size)
                 .num_hidden_layers(num_hidden_layers)
                 .num_attention_heads(num_attention_heads)
                 .num_key_value_heads(num_key_value_heads)
                 .max_position_embeddings(max_position_embeddings)
                 .rope_theta(rope_theta)
                 .rms_norm_eps(rms_norm_eps)
                 .initializer_range(initializer_range)
                 .tie_word_embeddings(tie_word_embeddings)
                 .tensor_options(options);
             translating([&] { c.validate(); });
             return c;
           }),
           py::arg("vocab_size") = 128, py::arg("hidden_size") = 64, py::arg("intermediate_size") = 176,
           py::arg("num_hidden_layers") = 2, py::arg("num_attention_heads") = 4, py::arg("num_key_value_heads") = 2,
           py::arg("max_position_embeddings") = 2048, py::arg("rope_theta") = 10000.0, py::arg("rms_norm_eps") = 1e-6,
           py::arg("initializer_range") = 0.02, py::arg("tie_word_embeddings") = false, py::arg("dtype") = py::none(),
           py::arg("device") = py::none())
      .def_property_readonly("vocab_size", [](const LlamaConfig& c) { return c.vocab_size(); })
      .def_property_readonly("hidden_size", [](const LlamaConfig& c) { return c.hidden_size(); })
      .def_property_readonly("num_hidden_layers", [](const LlamaConfig& c) { return c.num_hidden_layers(); })
      .def_property_readonly("tie_word_embeddings", [](const LlamaConfig& c) { return c.tie_word_embeddings(); })
      .def("num_parameters", &LlamaConfig::num_parameters)
      .def(
          "to_hf_json", [](const LlamaConfig& c) { return translating([&] { return c.to_hf_json(); }); },
          "The config.json transformers writes for a LlamaForCausalLM of this shape.")
      .def_static(
          "from_hf_json",
          [](const std::string& text, std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
            auto c = translating([&] { return LlamaConfig::from_hf_json(text); });
            c.tensor_options(c10::TensorOptions().dtype(dtype.value_or(at::kFloat)).device(device.value_or(at::kCPU)));
            translating([&] { c.validate(); });
            return c;
          },
          py::arg("json_text"), py::arg("dtype") = py::none(), py::arg("device") = py::none(),
          "The shape a Hugging Face config.json of a LlamaForCausalLM gives (what this Llama does not compute is "
          "refused by name).");
  torch::python::bind_module<models::LlamaForCausalLMImpl>(m, "Llama")
      .def(py::init([](const LlamaConfig& c) {
             return translating([&] { return std::make_shared<models::LlamaForCausalLMImpl>(c); });
           }),
           py::arg("config"))
      .def_property_readonly("config", [](const models::LlamaForCausalLMImpl& l) { return l.config; })
      // every parameter once (a tied weight is registered under two names): before torch's binding of
      // Module::parameters, which lists it twice, so that an optimizer steps it once
      .def(
          "parameters", [](const models::LlamaForCausalLMImpl& l, bool recurse) { return l.parameters(recurse); },
          py::arg("recurse") = true, py::prepend());
}

}  // namespace lorafuse::python
