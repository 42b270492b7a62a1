// The C++ rules of LoraConfig, adapter options and QuantConfig for the Python front (validation and target
// selection), so that C++ and Python select the same layers; quantizing and the checkpoint format (load/save).
#include "csrc/python/convert.h"

#include <lorafuse/config/default_targets.h>
#include <lorafuse/config/quant_config.h>
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/files.h>
#include <lorafuse/quant/checkpoint.h>
#include <lorafuse/quant/quantize_model.h>

namespace lorafuse::python {

namespace {

QuantConfig quant_config(const std::string& quant_type, int64_t blocksize, bool double_quant,
                         std::optional<at::ScalarType> compute_dtype, const std::vector<std::string>& skip) {
  return QuantConfig()
      .quant_type(quant_type)
      .blocksize(blocksize)
      .double_quant(double_quant)
      .compute_dtype(compute_dtype)
      .modules_to_not_convert(skip);
}

using QuantFields = std::tuple<std::string, int64_t, bool, std::optional<at::ScalarType>, std::vector<std::string>>;

QuantConfig quant_config(const QuantFields& f) {
  return quant_config(std::get<0>(f), std::get<1>(f), std::get<2>(f), std::get<3>(f), std::get<4>(f));
}

QuantFields fields_of(const QuantConfig& c) {
  return {c.quant_type(), c.blocksize(), c.double_quant(), c.compute_dtype(), c.modules_to_not_convert()};
}

py::tuple nf4_tuple(const io::Nf4Tensor& t) {
  return py::make_tuple(t.weight.packed, t.weight.absmax, t.weight.nested_absmax, t.weight.offset, t.blocksize, t.shape,
                        t.dtype, t.format, t.stat_dtype);
}

// A C++ Linear4bit as Python's lorafuse.nn.Linear4bit is built from it: (in_features, out_features, compute_dtype,
// blocksize, double_quant, (bits, stat_bits, stat_blocksize, stat_dtype), packed, absmax, nested_absmax, offset,
// bias or None).
py::tuple linear4bit_parts(const nn::Linear4bitImpl& l) {
  const auto& o = l.options;
  return py::make_tuple(o.in_features(), o.out_features(), o.compute_dtype(), o.blocksize(), o.double_quant(),
                        py::make_tuple(o.bits(), o.stat_bits(), o.stat_blocksize(), o.stat_dtype()), l.packed, l.absmax,
                        l.nested_absmax, l.offset, l.bias.defined() ? py::cast(l.bias) : py::object(py::none()));
}

using LayerFields = std::tuple<std::string, int64_t, int64_t, bool, std::optional<QuantFields>>;
using StateFields = std::tuple<std::vector<std::string>, std::vector<int64_t>, bool>;

void bind_checkpoint(py::module& m) {
  m.def(
      "_linear4bit_from_weight",
      [](const at::Tensor& weight, const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> compute_dtype,
         int64_t blocksize, bool double_quant, int64_t bits, int64_t stat_bits, int64_t stat_blocksize,
         at::ScalarType stat_dtype) {
        return linear4bit_parts(*translating([&] {
          TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected [out_features, in_features], found ", weight.sizes());
          return nn::Linear4bitImpl::from_weight(weight, bias.value_or(at::Tensor()),
                                                 nn::Linear4bitOptions(weight.size(1), weight.size(0))
                                                     .bias(bias.has_value() && bias->defined())
                                                     .compute_dtype(compute_dtype.value_or(weight.scalar_type()))
                                                     .blocksize(blocksize)
                                                     .double_quant(double_quant)
                                                     .bits(bits)
                                                     .stat_bits(stat_bits)
                                                     .stat_blocksize(stat_blocksize)
                                                     .stat_dtype(stat_dtype));
        }));
      },
      py::arg("weight"), py::arg("bias"), py::arg("compute_dtype"), py::arg("blocksize"), py::arg("double_quant"),
      py::arg("bits"), py::arg("stat_bits"), py::arg("stat_blocksize"), py::arg("stat_dtype"),
      "lorafuse::nn::Linear4bitImpl::from_weight: the parts of the layer (Python's Linear4bit is built from them).");
  m.def(
      "_plan_checkpoint_load",
      [](const io::CheckpointReader& reader, const std::vector<LayerFields>& layers,
         const std::vector<StateFields>& state, const std::map<std::string, std::string>& modules,
         const std::optional<QuantFields>& quantize, bool strict) {
        std::vector<CheckpointLayer> described;
        for (const auto& [path, in, out, has_bias, nf4] : layers) {
          described.push_back(
              {path, in, out, has_bias, nf4 ? std::optional<QuantConfig>(quant_config(*nf4)) : std::nullopt});
        }
        std::vector<CheckpointState> described_state;
        for (const auto& [names, shape, is_meta] : state) described_state.push_back({names, shape, is_meta});
        auto options = LoadCheckpointOptions().strict(strict);
        if (quantize) options.quantize(quant_config(*quantize));
        const CheckpointLoadPlan plan =
            translating([&] { return plan_checkpoint_load(reader, described, described_state, modules, options); });
        py::list planned;
        for (const auto& [index, layer] : plan.layers) planned.append(py::make_tuple(index, linear4bit_parts(*layer)));
        return py::make_tuple(planned, plan.assignments);
      },
      py::arg("reader"), py::arg("layers"), py::arg("state"), py::arg("modules"), py::arg("quantize"),
      py::arg("strict"),
      "lorafuse::plan_checkpoint_load: layers [(path, in, out, has_bias, the 4-bit layer's QuantConfig fields or "
      "None)], state [(names, shape, is_meta)], modules {path: type name} -> ([(layer index, Linear4bit parts)], "
      "[(checkpoint name, state index)]).");

  py::class_<io::CheckpointReader>(m, "_CheckpointReader",
                                   "A Hugging Face checkpoint folder read lazily (lorafuse::io::CheckpointReader).")
      .def(py::init([](const std::string& dir) {
             return translating([&] { return std::make_unique<io::CheckpointReader>(dir); });
           }),
           py::arg("dir"))
      .def_property_readonly("config_json", &io::CheckpointReader::config_json)
      .def_property_readonly("quant_config",
                             [](const io::CheckpointReader& r) -> std::optional<QuantFields> {
                               if (!r.quant_config()) return std::nullopt;
                               return fields_of(*r.quant_config());
                             })
      .def("names", &io::CheckpointReader::names)
      .def("__contains__", &io::CheckpointReader::contains)
      .def("entry",
           [](const io::CheckpointReader& r, const std::string& name) {
             const auto& e = translating([&]() -> const io::SafetensorsEntry& { return r.entry(name); });
             return py::make_tuple(e.dtype, e.shape);
           })
      .def("read", [](const io::CheckpointReader& r,
                      const std::string& name) { return translating([&] { return r.read(name); }); })
      .def("nf4_weights", &io::CheckpointReader::nf4_weights)
      .def(
          "read_nf4",
          [](const io::CheckpointReader& r, const std::string& name) {
            return nf4_tuple(translating([&] { return r.read_nf4(name); }));
          },
          "(packed, absmax, nested_absmax, offset, blocksize, shape, dtype), every rule checked.")
      .def("nf4_tensor_names", &io::CheckpointReader::nf4_tensor_names);
  m.def(
      "_nf4_checkpoint_tensors",
      [](const std::string& name, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nested,
         const at::Tensor& offset, int64_t blocksize, const std::vector<int64_t>& shape, at::ScalarType dtype,
         const std::vector<int64_t>& format, at::ScalarType stat_dtype) {
        return translating([&] {
          return io::nf4_checkpoint_tensors(
              name, {{packed, absmax, nested, offset}, blocksize, shape, dtype, format, stat_dtype});
        });
      },
      py::arg("name"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("offset"),
      py::arg("blocksize"), py::arg("shape"), py::arg("dtype"), py::arg("format") = std::vector<int64_t>{},
      py::arg("stat_dtype") = at::kFloat,
      "The checkpoint tensors [(name, tensor)] of one quantized weight: bitsandbytes' NF4 as transformers + "
      "bitsandbytes store it (format empty or NF4's), another format in lorafuse's layout.");
  m.def("_release_freed_memory", &io::release_freed_memory,
        "Gives memory the C allocator holds freed back to the system (lorafuse::io::release_freed_memory).");
  m.def(
      "_write_checkpoint",
      [](const std::string& dir, const std::string& config_json,
         const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::vector<std::string>& dense) {
        translating([&] { io::write_checkpoint(dir, config_json, tensors, dense); });
      },
      py::arg("dir"), py::arg("config_json"), py::arg("tensors"), py::arg("dense_modules") = std::vector<std::string>{},
      "Writes a checkpoint folder atomically: config.json (its quantization_config derived from the NF4 tensors) and "
      "model.safetensors.");
  m.def(
      "_cpp_load_checkpoint",
      [](torch::nn::Module& module, const std::string& dir, const std::optional<QuantFields>& quantize, bool strict) {
        auto options = LoadCheckpointOptions().strict(strict);
        if (quantize) options.quantize(quant_config(*quantize));
        return translating([&] { return load_checkpoint(module, dir, options); });
      },
      py::arg("module"), py::arg("dir"), py::arg("quantize"), py::arg("strict"),
      "lorafuse::load_checkpoint on a bound C++ module; the paths of the layers now in 4 bits.");
  m.def(
      "_cpp_save_checkpoint",
      [](torch::nn::Module& module, const std::string& dir, const std::string& config_json) {
        translating([&] { save_checkpoint(module, dir, config_json); });
      },
      py::arg("module"), py::arg("dir"), py::arg("config_json"), "lorafuse::save_checkpoint on a bound C++ module.");
}

}  // namespace

void bind_config(py::module& m) {
  bind_checkpoint(m);
  m.def(
      "_validate_quant_config",
      [](const std::string& quant_type, int64_t blocksize, bool double_quant, std::optional<at::ScalarType> dtype,
         const std::vector<std::string>& skip) {
        return translating([&] {
          const auto config = quant_config(quant_type, blocksize, double_quant, dtype, skip);
          config.validate();
          return config.bits();
        });
      },
      py::arg("quant_type"), py::arg("blocksize"), py::arg("double_quant"), py::arg("compute_dtype"),
      py::arg("modules_to_not_convert"),
      "Raises ValueError / TypeError unless the lorafuse.QuantConfig fields are valid; returns its bits "
      "(QuantConfig::bits).");
  m.def(
      "_quant_keeps_dense",
      [](const std::string& path, const std::vector<std::string>& skip) {
        return QuantConfig().modules_to_not_convert(skip).keeps_dense(path);
      },
      py::arg("path"), py::arg("modules_to_not_convert"),
      "Whether quantize_model leaves the layer at `path` dense (QuantConfig::keeps_dense).");
  m.def(
      "_cpp_quantize_model",
      [](torch::nn::Module& module, const std::string& quant_type, int64_t blocksize, bool double_quant,
         std::optional<at::ScalarType> dtype, const std::vector<std::string>& skip) {
        return translating(
            [&] { return quantize_model(module, quant_config(quant_type, blocksize, double_quant, dtype, skip)); });
      },
      py::arg("module"), py::arg("quant_type"), py::arg("blocksize"), py::arg("double_quant"), py::arg("compute_dtype"),
      py::arg("modules_to_not_convert"), "lorafuse::quantize_model on a bound C++ module; the paths quantized.");
  m.def(
      "_validate_lora_config", [](const std::string& config) { translating([&] { config_from(config).validate(); }); },
      "Raises ValueError / TypeError unless the lorafuse.LoraConfig fields (a dict) are valid.");
  m.def(
      "_validate_adapter",
      [](const std::string& name, int64_t r, double lora_alpha, double lora_dropout) {
        translating([&] {
          nn::check_adapter_name(name);
          nn::LoraAdapterOptions(r).lora_alpha(lora_alpha).lora_dropout(lora_dropout).validate();
        });
      },
      py::arg("name"), py::arg("r"), py::arg("lora_alpha"), py::arg("lora_dropout"),
      "Raises ValueError unless an adapter with this name and these options can be made (the C++ rules).");
  m.def(
      "_select_targets",
      [](const ModuleTuples& modules, const std::string& config, const std::string& model_type,
         const std::string& output_layer) {
        auto infos = infos_from(modules);
        for (auto& info : infos) info.is_output_layer = !output_layer.empty() && info.path == output_layer;
        std::vector<std::string> warnings;
        const auto parsed = translating([&] { return config_from(config); });
        const auto chosen = translating([&] { return select_targets(infos, parsed, model_type, &warnings); });
        std::vector<size_t> lora;
        for (const auto& c : chosen) lora.push_back(c.index);
        const auto saved = translating([&] { return select_saved_modules(infos, parsed, true, &warnings, lora); });
        py::list out, saved_out;
        for (const auto& c : chosen) out.append(py::make_tuple(c.index, nn::adapter_options_json(c.adapter)));
        for (const size_t i : saved)
          saved_out.append(py::make_tuple(i, nn::adapter_options_json(parsed.adapter_for(infos[i].path))));
        return py::make_tuple(out, saved_out, warnings);
      },
      py::arg("modules"), py::arg("config"), py::arg("model_type") = "", py::arg("output_layer") = "",
      "([(index, adapter options)], [(index, adapter options) of each module that modules_to_save trains whole], "
      "warnings) for the "
      "modules (path, type name, is_linear, in, out, is_embedding, is_lora_layer, is_saved_module) of a model of type "
      "model_type whose output layer is at path output_layer: the selection rules of C++ inject_lora.");
  m.def(
      "_default_target_modules",
      [](const std::string& model_type) -> py::object {
        const auto targets = default_target_modules(model_type);
        if (!targets) return py::none();
        if (targets->is_regex()) return py::str(targets->regex());
        return py::cast(targets->names());
      },
      py::arg("model_type"), "lorafuse::default_target_modules: a list of names, a regular expression or None.");
}

}  // namespace lorafuse::python
