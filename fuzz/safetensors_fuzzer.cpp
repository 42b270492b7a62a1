// libFuzzer target for lorafuse::io::parse_safetensors and, on what it accepts, lorafuse::io::read_nf4_tensors (the
// NF4 weights of a Hugging Face 4-bit checkpoint; built and run by fuzz/run.sh).
//
// A bug is anything but a clean result: the parser may only accept the input or reject it with a c10::Error;
// any other exception, a crash or a sanitizer report is a finding. An accepted input must also hold what the
// format promises, checked here (abort() on a mismatch, so libFuzzer saves the input):
//   - the tensors' bytes, in the order returned, are exactly the data section of the input;
//   - serialize_safetensors of the result parses again to the same names, dtypes, shapes, bytes and
//     metadata, and serializing that gives the same file again (the writer is deterministic).
// Each tensor named "<w>.quant_state.bitsandbytes__nf4" of an accepted input is read as an NF4 weight: accepted or
// rejected with a c10::Error likewise; an accepted one, written again by nf4_checkpoint_tensors, must read back to the
// same bytes, statistics and quant_state, and its packed bytes and statistics be the input's.
// LORAFUSE_FUZZ_PRINT_ERRORS=1 prints each rejection's message (run.sh checks the regression files with it).
#include <c10/util/Exception.h>
#include <lorafuse/io/nf4_tensors.h>
#include <lorafuse/io/safetensors.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
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

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && bytes_of("nf4", a) == bytes_of("nf4", b);
}

// The NF4 weights of an accepted input (see the top of the file).
void check_nf4(const Safetensors& parsed) {
  std::map<std::string, at::Tensor> by_name(parsed.tensors.begin(), parsed.tensors.end());
  const auto get = [&](const std::map<std::string, at::Tensor>& tensors) {
    return [&tensors](const std::string& n) {
      const auto it = tensors.find(n);
      return it == tensors.end() ? at::Tensor() : it->second;
    };
  };
  for (const auto& [name, unused] : parsed.tensors) {
    const auto weight = lorafuse::io::nf4_weight_of_state(name);
    if (!weight) continue;
    lorafuse::io::Nf4Tensor t;
    try {
      t = lorafuse::io::read_nf4_tensors(*weight, get(by_name), "fuzz input");
    } catch (const c10::Error& e) {
      if (print_errors()) std::fprintf(stderr, "rejected: %s\n", e.what_without_backtrace());
      continue;
    }
    const auto& w = t.weight;
    if (!same_bytes(w.packed.reshape(-1), by_name.at(*weight).contiguous().reshape(-1).view(at::kByte)) ||
        !same_bytes(w.absmax, by_name.at(*weight + ".absmax").contiguous().reshape(-1)) ||
        (t.nested() && !same_bytes(w.nested_absmax, by_name.at(*weight + ".nested_absmax").contiguous().reshape(-1)))) {
      fail("the NF4 weight \"" + *weight + "\" read is not the input's bytes");
    }
    std::vector<std::pair<std::string, at::Tensor>> written;
    try {
      written = lorafuse::io::nf4_checkpoint_tensors(*weight, t);
    } catch (const c10::Error& e) {
      fail(std::string("the NF4 writer rejects what the reader accepted: ") + e.what_without_backtrace());
    }
    const std::map<std::string, at::Tensor> again_tensors(written.begin(), written.end());
    lorafuse::io::Nf4Tensor again;
    try {
      again = lorafuse::io::read_nf4_tensors(*weight, get(again_tensors), "re-written NF4 weight");
    } catch (const c10::Error& e) {
      fail(std::string("the NF4 reader rejects what the writer wrote: ") + e.what_without_backtrace());
    }
    if (again.blocksize != t.blocksize || again.shape != t.shape || again.dtype != t.dtype ||
        !same_bytes(again.weight.packed, w.packed) || !same_bytes(again.weight.absmax, w.absmax) ||
        !same_bytes(again.weight.nested_absmax, w.nested_absmax) || !same_bytes(again.weight.offset, w.offset)) {
      fail("the NF4 weight \"" + *weight + "\" changed in a write and read");
    }
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
  check_nf4(parsed);
  return 0;
}
