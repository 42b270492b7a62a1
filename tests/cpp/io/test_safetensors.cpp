// The safetensors reader/writer: round trips of every dtype, atomic writes, and one case per rule of the
// format that a file can break, each checking the message.
#include <ATen/ATen.h>
#include <lorafuse/io/safetensors.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::io::parse_safetensors;
using lorafuse::io::serialize_safetensors;
using lorafuse_test::require_error_parts;

namespace {

// A file from a header string and a data size: the 8-byte length, the header, `data` zero bytes.
std::string file_of(const std::string& header, size_t data = 0) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data, '\0');
}

void parse(const std::string& bytes) {
  parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test.safetensors");
}

void require_bad(const std::string& bytes, const std::vector<std::string>& parts) {
  require_error_parts<c10::ValueError>([&] { parse(bytes); }, parts);
}

std::string temp_dir() {
  std::string pattern = "/tmp/lorafuse_st_XXXXXX";
  REQUIRE(::mkdtemp(pattern.data()) != nullptr);
  return pattern;
}

}  // namespace

TEST_CASE("safetensors round trip of every dtype, with metadata", "[cpu][io]") {
  at::manual_seed(0);
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f32", at::randn({3, 4})},
      {"f64", at::randn({2}, at::kDouble)},
      {"f16", at::randn({5}).to(at::kHalf)},
      {"bf16", at::randn({2, 2}).to(at::kBFloat16)},
      {"i64", at::arange(6, at::kLong).reshape({2, 3})},
      {"i32", at::arange(3, at::kInt)},
      {"i16", at::arange(3, at::kShort)},
      {"i8", at::arange(-2, 2, at::kChar)},
      {"u8", at::arange(4, at::kByte)},
      {"bool", at::tensor({1, 0, 1}).to(at::kBool)},
      {"u16", at::arange(3).to(at::kUInt16)},
      {"u32", at::arange(3).to(at::kUInt32)},
      {"u64", at::arange(3).to(at::kUInt64)},
      {"f8_e4m3", at::randn({4}).to(at::kFloat8_e4m3fn)},
      {"f8_e5m2", at::randn({4}).to(at::kFloat8_e5m2)},
      {"scalar", at::scalar_tensor(7.5)},
      {"empty", at::empty({0, 3})},
      {"noncontiguous", at::randn({4, 3}).t()},
  };
  const auto bytes = serialize_safetensors(tensors, {{"format", "pt"}});
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  CHECK(header_len % 8 == 0);  // header padded to 8 bytes, so the data starts aligned
  const auto back = parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  CHECK(back.metadata == std::map<std::string, std::string>{{"format", "pt"}});
  REQUIRE(back.tensors.size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    INFO(tensors[i].first);
    CHECK(back.tensors[i].first == tensors[i].first);  // file order = written order
    CHECK(back.tensors[i].second.scalar_type() == tensors[i].second.scalar_type());
    // compared as float64 (float8 and the wide unsigned types have few kernels), bytes included
    CHECK(at::equal(back.tensors[i].second.to(at::kDouble), tensors[i].second.to(at::kDouble)));
  }
}

TEST_CASE("write_safetensors is atomic and replaces the file whole", "[cpu][io]") {
  const auto dir = temp_dir();
  const auto path = dir + "/adapter_model.safetensors";
  lorafuse::io::write_safetensors(path, {{"a", at::ones({2})}});
  lorafuse::io::write_safetensors(path, {{"b", at::zeros({3})}});
  const auto back = lorafuse::io::read_safetensors(path);
  REQUIRE(back.tensors.size() == 1);
  CHECK(back.tensors[0].first == "b");
  // no temporary file is left behind
  CHECK(std::system(("test $(ls -A " + dir + " | wc -l) -eq 1").c_str()) == 0);
  // a failed write (a folder that does not exist) names the path and changes nothing
  require_error_parts<c10::ValueError>([&] { lorafuse::io::write_safetensors(dir + "/no/such/x", {}); },
                                       {"no/such/x", "temporary file"});
  std::remove(path.c_str());
  ::rmdir(dir.c_str());
}

TEST_CASE("safetensors files that break a rule are rejected with the rule named", "[cpu][io][errors]") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  parse(file_of(ok, 8));  // the valid file the cases below break
  require_bad("1234567", {"7 bytes", "8-byte header length"});
  {
    std::string huge(8, '\0');
    huge[7] = 0x7f;  // about 9e18
    require_bad(huge, {"header length", "exceeds the limit"});
  }
  require_bad(file_of(ok, 8).substr(0, 20), {"header of", "runs past the end"});
  require_bad(file_of("{\"a\": [1,", 0), {"not valid UTF-8 JSON"});
  require_bad(file_of("{\"\xff\xfe\": 1}", 0), {"not valid UTF-8 JSON"});
  require_bad(file_of("[1, 2]", 0), {"must be a JSON object", "array"});
  require_bad(
      file_of(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
          16),
      {"duplicate tensor name \"a\""});
  require_bad(file_of(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8),
              {"tensor \"a\"", "unknown dtype \"Q4\""});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
              {"tensor \"a\"", "12 bytes", "hold 8"});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), {"shape", "non-negative"});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
              {"overflows 64 bits"});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), {"end before they begin"});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), {"starts at byte 4", "gap"});
  require_bad(
      file_of(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
          12),
      {"starts at byte 4", "overlaps"});
  require_bad(file_of(ok, 12), {"4 trailing bytes"});
  require_bad(file_of(ok, 4), {"need 8 bytes", "has 4", "truncated"});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[2]}})", 8), {"dtype, shape and data_offsets"});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8), {"unknown field \"x\""});
  require_bad(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
              {"data_offsets must be [begin, end]"});
  require_bad(file_of(R"({"__metadata__":{"k":1}})", 0), {"__metadata__[\"k\"] must be a string"});
  require_bad(file_of(R"({"__metadata__":[1]})", 0), {"__metadata__ must be an object"});
  require_error_parts<c10::ValueError>([] { lorafuse::io::read_safetensors("/nonexistent/x.safetensors"); },
                                       {"/nonexistent/x.safetensors", "cannot open"});
}
