// Hugging Face checkpoint folders (<lorafuse/io/checkpoint.h>): bitsandbytes' NF4 tensors written and read back,
// every rule of the reader, sharded folders, and the lazily read safetensors file under it.
#include <ATen/ATen.h>
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/ops/nf4.h>

#include <fstream>
#include <map>
#include <string>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::io::CheckpointReader;
using lorafuse::io::Nf4Tensor;
using lorafuse_test::require_error_parts;
using lorafuse_test::TempDir;

namespace {

using Tensors = std::map<std::string, at::Tensor>;

Nf4Tensor quantized(bool nested, int64_t rows = 8, int64_t cols = 48, int64_t blocksize = 64) {
  at::manual_seed(3);
  const auto q = lorafuse::quantize_nf4(at::randn({rows, cols}), blocksize, nested);
  return {{q.packed, q.absmax, q.nested_absmax, q.offset}, blocksize, {rows, cols}, at::kFloat};
}

Tensors tensors_of(const std::string& name, const Nf4Tensor& t) {
  const auto list = lorafuse::io::nf4_checkpoint_tensors(name, t);
  return Tensors(list.begin(), list.end());
}

Nf4Tensor read(const Tensors& tensors, const std::string& name = "w") {
  return lorafuse::io::read_nf4_tensors(
      name,
      [&](const std::string& n) {
        const auto it = tensors.find(n);
        return it == tensors.end() ? at::Tensor() : it->second;
      },
      "test");
}

at::Tensor json_bytes(const std::string& text) {
  auto t = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
  std::memcpy(t.data_ptr(), text.data(), text.size());
  return t;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

void require_same(const Nf4Tensor& a, const Nf4Tensor& b) {
  REQUIRE(a.blocksize == b.blocksize);
  REQUIRE(a.shape == b.shape);
  REQUIRE(a.dtype == b.dtype);
  REQUIRE(at::equal(a.weight.packed, b.weight.packed));
  REQUIRE(at::equal(a.weight.absmax, b.weight.absmax));
  REQUIRE(at::equal(a.weight.nested_absmax, b.weight.nested_absmax));
  REQUIRE(at::equal(a.weight.offset, b.weight.offset));
}

}  // namespace

TEST_CASE("nf4 checkpoint tensors: transformers' names and dtypes, read back to the same bytes", "[cpu][io][nf4]") {
  for (const bool nested : {true, false}) {
    const Nf4Tensor t = quantized(nested);
    const Tensors files = tensors_of("w", t);
    REQUIRE(files.size() == (nested ? 6u : 4u));
    REQUIRE(files.at("w").scalar_type() == at::kByte);
    REQUIRE(files.at("w").sizes() == at::IntArrayRef({8 * 48 / 2, 1}));
    REQUIRE(files.at("w.absmax").scalar_type() == (nested ? at::kByte : at::kFloat));
    REQUIRE(at::equal(files.at("w.quant_map"), lorafuse::nf4_code_map()));
    if (nested) REQUIRE(at::equal(files.at("w.nested_quant_map"), lorafuse::dynamic_code_map()));
    const auto state = files.at("w.quant_state.bitsandbytes__nf4");
    const std::string text(static_cast<const char*>(state.const_data_ptr()), state.numel());
    REQUIRE(text.find("\"quant_type\":\"nf4\"") != std::string::npos);
    REQUIRE(text.find("\"shape\":[8,48]") != std::string::npos);
    REQUIRE((text.find("nested_offset") != std::string::npos) == nested);
    require_same(read(files), t);
  }
}

TEST_CASE("nf4 checkpoint: packed bytes stored in another dtype (quant_storage) are read as bytes", "[cpu][io][nf4]") {
  const Nf4Tensor t = quantized(true);
  Tensors files = tensors_of("w", t);
  files["w"] = files.at("w").reshape({-1}).view(at::kBFloat16).reshape({-1, 1});
  require_same(read(files), t);
}

TEST_CASE("nf4 checkpoint: every rule of the reader, named", "[cpu][io][nf4][errors]") {
  const Tensors good = tensors_of("w", quantized(true));
  const auto with = [&](const std::string& name, const at::Tensor& value) {
    Tensors t = good;
    if (value.defined()) {
      t[name] = value;
    } else {
      t.erase(name);
    }
    return t;
  };
  const std::string state = "w.quant_state.bitsandbytes__nf4";
  const std::string json_ok =
      R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,48],"nested_blocksize":256,)"
      R"("nested_dtype":"float32","nested_offset":0.5})";
  REQUIRE_NOTHROW(read(with(state, json_bytes(json_ok))));
  const auto state_error = [&](const std::string& json, const std::vector<std::string>& parts) {
    require_error_parts<c10::ValueError>([&] { read(with(state, json_bytes(json))); }, parts);
  };
  require_error_parts<c10::ValueError>([&] { read(with(state, at::Tensor())); },
                                       {"test: \"w\"", "no \"w.quant_state.bitsandbytes__nf4\""});
  require_error_parts<c10::ValueError>([&] { read(with(state, at::zeros({3}, at::kFloat))); }, {"expected uint8 [n]"});
  state_error("{\"quant_type\":", {"quant_state", "not valid JSON"});
  state_error("[1]", {"quant_state: expected a JSON object, found array"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,48],"extra":1})",
              {"unknown field \"extra\""});
  state_error(R"({"quant_type":"nf4","dtype":"float32","shape":[8,48]})", {"the field \"blocksize\" is missing"});
  state_error(R"({"quant_type":"fp4","blocksize":64,"dtype":"float32","shape":[8,48]})",
              {"quant_type", "NF4 kernels only", "\"fp4\""});
  state_error(R"({"quant_type":"nf4","blocksize":100,"dtype":"float32","shape":[8,48]})",
              {"blocksize: expected 32, 64", "found 100"});
  state_error(R"({"quant_type":"nf4","blocksize":"64","dtype":"float32","shape":[8,48]})",
              {"blocksize: expected an integer"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"int8","shape":[8,48]})",
              {"dtype: expected \"float32\", \"bfloat16\" or \"float16\", found \"int8\""});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,-48]})",
              {"shape: expected positive sizes"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[4294967296,4294967296]})",
              {"too large"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,48],"nested_blocksize":256})",
              {"go together", "found 1 of them"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,50],"nested_blocksize":256,)"
              R"("nested_dtype":"float32","nested_offset":0.5})",
              {"\"w\" holds 192 bytes", "packs into 200 bytes"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,48],"nested_blocksize":128,)"
              R"("nested_dtype":"float32","nested_offset":0.5})",
              {"nested_blocksize: expected 256"});
  state_error(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[8,48],"nested_blocksize":256,)"
              R"("nested_dtype":"float32","nested_offset":1e300})",
              {"nested_offset: expected a finite float32"});
  // the block statistics no longer match the shape (blocksize 32: 12 blocks, the file has 6)
  state_error(R"({"quant_type":"nf4","blocksize":32,"dtype":"float32","shape":[8,48],"nested_blocksize":256,)"
              R"("nested_dtype":"float32","nested_offset":0.5})",
              {"\"w.absmax\" has shape [6] (6 elements); expected 12"});
  require_error_parts<c10::ValueError>([&] { read(with("w.absmax", good.at("w.absmax").to(at::kFloat))); },
                                       {"\"w.absmax\" is Float; expected Byte"});
  require_error_parts<c10::ValueError>([&] { read(with("w.nested_absmax", at::Tensor())); },
                                       {"no \"w.nested_absmax\""});
  require_error_parts<c10::ValueError>([&] { read(with("w.nested_absmax", at::full({1}, std::nan(""), at::kFloat))); },
                                       {"\"w.nested_absmax\" holds negative, NaN or infinite"});
  auto code = good.at("w.quant_map").clone();
  code[3] = 0.25f;
  require_error_parts<c10::ValueError>([&] { read(with("w.quant_map", code)); },
                                       {"\"w.quant_map\"[3] is 0.25", "NF4's code", "would load as other values"});
  auto dynamic = good.at("w.nested_quant_map").clone();
  dynamic[0] = 0.0f;
  require_error_parts<c10::ValueError>([&] { read(with("w.nested_quant_map", dynamic)); },
                                       {"\"w.nested_quant_map\"[0]", "dynamic code"});
  const Tensors plain = tensors_of("w", quantized(false));
  Tensors stray = plain;
  stray["w.nested_absmax"] = good.at("w.nested_absmax");
  require_error_parts<c10::ValueError>([&] { read(stray); }, {"has \"w.nested_absmax\" but the quant_state has no"});
  Tensors negative = plain;
  negative["w.absmax"] = -plain.at("w.absmax");
  require_error_parts<c10::ValueError>([&] { read(negative); }, {"\"w.absmax\" holds negative"});
}

TEST_CASE("SafetensorsFile reads the header when it opens and each tensor when asked", "[cpu][io]") {
  TempDir dir;
  const std::string path = dir.path + "/t.safetensors";
  const auto a = at::arange(6, at::kFloat).reshape({2, 3});
  const auto b = at::arange(4, at::kShort);
  lorafuse::io::write_safetensors(path, {{"a", a}, {"b", b}}, {{"format", "pt"}});
  lorafuse::io::SafetensorsFile file(path);
  REQUIRE(file.entries().size() == 2);
  REQUIRE(file.entries()[1].name == "b");
  REQUIRE(file.metadata().at("format") == "pt");
  REQUIRE(at::equal(file.read("a"), a));
  REQUIRE(at::equal(file.read("b"), b));
  require_error_parts<c10::ValueError>([&] { file.read("c"); }, {"no tensor named \"c\""});
  // the same rules as parse_safetensors: a truncated file is refused when it opens
  std::string bytes = lorafuse::io::serialize_safetensors({{"a", a}});
  write_text(path, bytes.substr(0, bytes.size() - 4));
  require_error_parts<c10::ValueError>([&] { lorafuse::io::SafetensorsFile f(path); }, {"truncated?"});
  write_text(path, "abc");
  require_error_parts<c10::ValueError>([&] { lorafuse::io::SafetensorsFile f(path); },
                                       {"shorter than the 8-byte header length"});
}

TEST_CASE("CheckpointReader: one file or shards listed by the index, config.json's quantization_config",
          "[cpu][io][nf4]") {
  TempDir dir;
  Nf4Tensor t = quantized(true);
  t.dtype = at::kBFloat16;  // the compute dtype write_checkpoint puts into quantization_config
  auto tensors = lorafuse::io::nf4_checkpoint_tensors("layer.weight", t);
  tensors.emplace_back("norm.weight", at::ones({4}));
  lorafuse::io::write_checkpoint(
      dir.path,
      R"({"model_type":"x","quantization_config":{"quant_method":"bitsandbytes","load_in_4bit":true,)"
      R"("bnb_4bit_quant_type":"nf4","bnb_4bit_use_double_quant":true,"bnb_4bit_compute_dtype":"bfloat16",)"
      R"("llm_int8_skip_modules":["lm_head"]}})",
      tensors);
  {
    CheckpointReader reader(dir.path);
    REQUIRE(reader.names().size() == 7);
    REQUIRE(reader.nf4_weights() == std::vector<std::string>{"layer.weight"});
    REQUIRE(reader.nf4_tensor_names("layer.weight").size() == 6);
    require_same(reader.read_nf4("layer.weight"), t);
    REQUIRE(reader.quant_config().has_value());
    REQUIRE(reader.quant_config()->compute_dtype() == at::kBFloat16);
    REQUIRE(reader.quant_config()->double_quant());
    REQUIRE(reader.entry("norm.weight").shape == std::vector<int64_t>{4});
  }
  // the same tensors in two shards and an index, as transformers writes a large model
  TempDir sharded;
  std::vector<std::pair<std::string, at::Tensor>> first(tensors.begin(), tensors.begin() + 3),
      second(tensors.begin() + 3, tensors.end());
  lorafuse::io::write_safetensors(sharded.path + "/model-00001-of-00002.safetensors", first);
  lorafuse::io::write_safetensors(sharded.path + "/model-00002-of-00002.safetensors", second);
  std::string index = R"({"metadata":{},"weight_map":{)";
  for (size_t i = 0; i < tensors.size(); ++i) {
    index += (i ? "," : "") + std::string("\"") + tensors[i].first + "\":\"model-0000" + (i < 3 ? "1" : "2") +
             "-of-00002.safetensors\"";
  }
  write_text(sharded.path + "/model.safetensors.index.json", index + "}}");
  {
    CheckpointReader reader(sharded.path);
    REQUIRE(reader.names().size() == 7);
    require_same(reader.read_nf4("layer.weight"), t);
    REQUIRE(!reader.quant_config().has_value());
    REQUIRE(reader.config_json().empty());
  }
  // saving over a sharded folder drops the old index and shards, keeps other files
  write_text(sharded.path + "/tokenizer.json", "{}");
  lorafuse::io::write_checkpoint(sharded.path, "{}", {{"norm.weight", at::ones({4})}});
  {
    CheckpointReader reader(sharded.path);
    REQUIRE(reader.names() == std::vector<std::string>{"norm.weight"});
    REQUIRE(lorafuse::io::SafetensorsFile(sharded.path + "/model.safetensors").entries().size() == 1);
    std::ifstream tok(sharded.path + "/tokenizer.json");
    REQUIRE(tok.good());
    std::ifstream shard(sharded.path + "/model-00001-of-00002.safetensors");
    REQUIRE(!shard.good());
  }
}

TEST_CASE("CheckpointReader: broken folders are refused with the reason", "[cpu][io][errors]") {
  TempDir dir;
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); },
                                       {"has neither model.safetensors nor model.safetensors.index.json"});
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path + "/absent"); }, {"is not a folder"});
  lorafuse::io::write_safetensors(dir.path + "/a.safetensors", {{"x", at::ones({2})}, {"y", at::ones({2})}});
  const auto index = [&](const std::string& map) {
    write_text(dir.path + "/model.safetensors.index.json", R"({"weight_map":)" + map + "}");
  };
  index(R"({"x":"a.safetensors"})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); },
                                       {"the shards hold 1 tensor(s) that the index does not list"});
  index(R"({"x":"a.safetensors","y":"a.safetensors","z":"a.safetensors"})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); },
                                       {"\"z\" is listed in a.safetensors, which does not hold it"});
  index(R"({"x":"../a.safetensors"})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); },
                                       {"is not a file name in the checkpoint's folder"});
  index(R"({"x":"b.safetensors"})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); }, {"b.safetensors", "cannot open"});
  index(R"([1])");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); },
                                       {"expected an object with a \"weight_map\""});
  index(R"({"x":"a.safetensors","y":"a.safetensors"})");
  write_text(dir.path + "/config.json", R"({"quantization_config":{"quant_method":"gptq"}})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); },
                                       {"config.json: quantization_config: quant_method", "found gptq"});
  write_text(dir.path + "/config.json",
             R"({"quantization_config":{"quant_method":"bitsandbytes","load_in_8bit":true}})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); }, {"8-bit (LLM.int8) checkpoints"});
  write_text(
      dir.path + "/config.json",
      R"({"quantization_config":{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_quant_type":"fp4"}})");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); }, {"bnb_4bit_quant_type", "\"fp4\""});
  write_text(dir.path + "/config.json", "[]");
  require_error_parts<c10::ValueError>([&] { CheckpointReader r(dir.path); }, {"expected a JSON object"});
  write_text(dir.path + "/config.json", "{}");
  REQUIRE_NOTHROW(CheckpointReader(dir.path));
  require_error_parts<c10::ValueError>([&] { lorafuse::io::write_checkpoint(dir.path, "[1]", {}); },
                                       {"save_checkpoint: config_json: expected a JSON object"});
}
