// libFuzzer target for lorafuse::io::parse_safetensors (built and run by fuzz/run.sh).
//
// A bug is anything but a clean result: the parser may only accept the input or reject it with a c10::Error;
// any other exception, a crash or a sanitizer report is a finding. An accepted input must also hold what the
// format promises, checked here (abort() on a mismatch, so libFuzzer saves the input):
//   - the tensors' bytes, in the order returned, are exactly the data section of the input;
//   - serialize_safetensors of the result parses again to the same names, dtypes, shapes, bytes and
//     metadata, and serializing that gives the same file again (the writer is deterministic).
// LORAFUSE_FUZZ_PRINT_ERRORS=1 prints each rejection's message (run.sh checks the regression files with it).
#include <c10/util/Exception.h>
#include <lorafuse/io/safetensors.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using lorafuse::io::Safetensors;

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "safetensors_fuzzer: %s\n", why.c_str());
  std::fflush(stderr);
  std::abort();
}

bool print_errors() {
  static const bool on = [] {
    const char* v = std::getenv("LORAFUSE_FUZZ_PRINT_ERRORS");
    return v != nullptr && std::strcmp(v, "0") != 0;
  }();
  return on;
}

// The bytes of a parsed tensor: the parser hands out contiguous CPU tensors, which is checked too.
std::string bytes_of(const std::string& name, const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.is_contiguous()) {
    fail("tensor \"" + name + "\" is not a defined, contiguous CPU tensor");
  }
  const size_t n = static_cast<size_t>(t.numel()) * t.element_size();
  return n == 0 ? std::string() : std::string(static_cast<const char*>(t.const_data_ptr()), n);
}

void check_same(const Safetensors& a, const Safetensors& b) {
  if (a.metadata != b.metadata) fail("round trip changed __metadata__");
  if (a.tensors.size() != b.tensors.size()) fail("round trip changed the number of tensors");
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const auto& [name, t] = a.tensors[i];
    const auto& [name2, t2] = b.tensors[i];
    if (name != name2)
      fail("round trip changed tensor " + std::to_string(i) + " from \"" + name + "\" to \"" + name2 + "\"");
    if (t.scalar_type() != t2.scalar_type()) fail("round trip changed the dtype of \"" + name + "\"");
    if (t.sizes() != t2.sizes()) fail("round trip changed the shape of \"" + name + "\"");
    if (bytes_of(name, t) != bytes_of(name2, t2)) fail("round trip changed the bytes of \"" + name + "\"");
  }
}

Safetensors parse_or_fail(const std::string& bytes, const char* what) {
  try {
    return lorafuse::io::parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), what);
  } catch (const c10::Error& e) {
    fail(std::string("the parser rejects what the writer wrote: ") + e.what_without_backtrace());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Safetensors parsed;
  try {
    parsed = lorafuse::io::parse_safetensors(data, size, "fuzz input");
  } catch (const c10::Error& e) {
    if (print_errors()) std::fprintf(stderr, "rejected: %s\n", e.what_without_backtrace());
    return 0;  // a clean rejection; kept in the corpus, since error paths are coverage too
  }

  // Accepted: the header length is in range, and the tensors in file order cover the data section exactly.
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  std::string data_section;
  for (const auto& [name, t] : parsed.tensors) data_section += bytes_of(name, t);
  if (data_section.size() != size - 8 - header_len ||
      std::memcmp(data_section.data(), data + 8 + header_len, data_section.size()) != 0) {
    fail("the tensors' bytes are not the input's data section");
  }

  std::string written;
  try {
    written = lorafuse::io::serialize_safetensors(parsed.tensors, parsed.metadata);
  } catch (const c10::Error& e) {
    fail(std::string("the writer rejects what the parser accepted: ") + e.what_without_backtrace());
  }
  const Safetensors again = parse_or_fail(written, "re-serialized input");
  check_same(parsed, again);
  if (lorafuse::io::serialize_safetensors(again.tensors, again.metadata) != written) {
    fail("serializing the re-parsed tensors gives different bytes");
  }
  return 0;
}
