#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <lorafuse/io/safetensors.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace lorafuse::io {
namespace {

using json = nlohmann::json;

constexpr int kMaxJsonDepth = 64;

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};

// safetensors dtype names and the torch dtypes they map to.
constexpr DtypeInfo kDtypes[] = {{"F64", at::kDouble},
                                 {"F32", at::kFloat},
                                 {"F16", at::kHalf},
                                 {"BF16", at::kBFloat16},
                                 {"I64", at::kLong},
                                 {"I32", at::kInt},
                                 {"I16", at::kShort},
                                 {"I8", at::kChar},
                                 {"U8", at::kByte},
                                 {"BOOL", at::kBool},
                                 {"U16", at::kUInt16},
                                 {"U32", at::kUInt32},
                                 {"U64", at::kUInt64},
                                 {"F8_E4M3", at::kFloat8_e4m3fn},
                                 {"F8_E5M2", at::kFloat8_e5m2}};

std::string known_dtypes() {
  std::string out;
  for (const auto& d : kDtypes) out += (out.empty() ? "" : ", ") + std::string(d.name);
  return out;
}

const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const char* dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (type == d.type) return d.name;
  }
  TORCH_CHECK_TYPE(false, "safetensors: no safetensors dtype for ", type);
  return nullptr;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t to_u64(const json& v, const std::string& where) {
  TORCH_CHECK_VALUE(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0), where,
                    ": expected a non-negative integer, found ", v.dump());
  return v.get<uint64_t>();
}

struct Header {
  uint64_t header_len = 0;
  std::vector<SafetensorsEntry> entries;  // by byte offset
  std::map<std::string, std::string> metadata;
};

// The header of a safetensors file of `size` bytes whose first `available` bytes are at `data` (at least the 8-byte
// length and the header it gives, else a ValueError): every rule of the format checked against the file's size.
Header parse_header(const uint8_t* data, size_t available, uint64_t size, const std::string& what) {
  TORCH_CHECK_VALUE(size >= 8 && available >= 8, what, ": ", size, " bytes, shorter than the 8-byte header length");
  const uint64_t header_len = read_le64(data);
  TORCH_CHECK_VALUE(header_len <= kMaxSafetensorsHeader, what, ": header length ", header_len, " exceeds the limit of ",
                    kMaxSafetensorsHeader, " bytes");
  TORCH_CHECK_VALUE(header_len <= size - 8, what, ": header of ", header_len, " bytes runs past the end of the file (",
                    size, " bytes)");
  TORCH_CHECK_VALUE(header_len <= available - 8, what, ": the header could not be read whole");
  const char* text = reinterpret_cast<const char*>(data + 8);
  // nlohmann keeps the last of duplicate keys silently: the callback sees every top-level key first.
  std::set<std::string> seen;
  json header;
  try {
    header = json::parse(text, text + header_len, [&](int depth, json::parse_event_t event, json& parsed) {
      // A well-formed header nests 3 levels deep; deep nesting would exhaust the stack in dump()/destruction.
      TORCH_CHECK_VALUE(depth <= kMaxJsonDepth, what, ": the header nests JSON deeper than ", kMaxJsonDepth, " levels");
      if (event == json::parse_event_t::key && depth == 1) {
        const auto key = parsed.get<std::string>();
        TORCH_CHECK_VALUE(seen.insert(key).second, what, ": duplicate tensor name \"", key, "\" in the header");
      }
      return true;
    });
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": the header is not valid UTF-8 JSON (", e.what(), ")");
  }
  TORCH_CHECK_VALUE(header.is_object(), what, ": the header must be a JSON object, found ", header.type_name());

  Header out;
  out.header_len = header_len;
  std::vector<SafetensorsEntry>& entries = out.entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      TORCH_CHECK_VALUE(value.is_object(), what, ": __metadata__ must be an object of strings, found ",
                        value.type_name());
      for (const auto& [k, v] : value.items()) {
        TORCH_CHECK_VALUE(v.is_string(), what, ": __metadata__[\"", k, "\"] must be a string, found ", v.type_name());
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = what + ": tensor \"" + name + "\"";
    TORCH_CHECK_VALUE(value.is_object(), where, ": expected {dtype, shape, data_offsets}, found ", value.type_name());
    for (const auto& [field, unused] : value.items()) {
      TORCH_CHECK_VALUE(field == "dtype" || field == "shape" || field == "data_offsets", where, ": unknown field \"",
                        field, "\" (expected dtype, shape, data_offsets)");
    }
    TORCH_CHECK_VALUE(value.contains("dtype") && value.contains("shape") && value.contains("data_offsets"), where,
                      ": expected the fields dtype, shape and data_offsets, found ", value.dump());
    const auto& dtype = value["dtype"];
    TORCH_CHECK_VALUE(dtype.is_string(), where, ": dtype must be a string, found ", dtype.dump());
    const DtypeInfo* info = dtype_by_name(dtype.get<std::string>());
    TORCH_CHECK_VALUE(info != nullptr, where, ": unknown dtype \"", dtype.get<std::string>(),
                      "\" (known: ", known_dtypes(), ")");
    const auto& shape = value["shape"];
    TORCH_CHECK_VALUE(shape.is_array(), where, ": shape must be an array, found ", shape.dump());
    const auto& offsets = value["data_offsets"];
    TORCH_CHECK_VALUE(offsets.is_array() && offsets.size() == 2, where, ": data_offsets must be [begin, end], found ",
                      offsets.dump());
    SafetensorsEntry e{
        name, info->type, {}, to_u64(offsets[0], where + " data_offsets"), to_u64(offsets[1], where + " data_offsets")};
    TORCH_CHECK_VALUE(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin");
    // numel × itemsize, overflow-checked
    uint64_t bytes = c10::elementSize(info->type);
    uint64_t span = 1;  // product of the non-zero dimensions: strides must fit in int64 even when numel is 0
    for (const auto& d : shape) {
      const uint64_t dim = to_u64(d, where + " shape");
      TORCH_CHECK_VALUE(dim <= static_cast<uint64_t>(INT64_MAX), where, ": dimension ", dim, " is too large");
      TORCH_CHECK_VALUE(dim == 0 || bytes <= UINT64_MAX / dim, where, ": shape ", shape.dump(),
                        " overflows 64 bits in bytes");
      bytes *= dim;
      TORCH_CHECK_VALUE(dim == 0 || span <= static_cast<uint64_t>(INT64_MAX) / dim, where, ": shape ", shape.dump(),
                        " is too large (its strides overflow 64 bits)");
      span *= dim == 0 ? 1 : dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    TORCH_CHECK_VALUE(bytes == e.end - e.begin, where, ": shape ", shape.dump(), " of ", info->name, " is ", bytes,
                      " bytes, but data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin);
    entries.push_back(std::move(e));
  }
  // Byte ranges: contiguous from 0, no gaps, no overlaps, no trailing bytes.
  std::sort(entries.begin(), entries.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const uint64_t data_size = size - 8 - header_len;
  uint64_t expected = 0;
  for (const auto& e : entries) {
    TORCH_CHECK_VALUE(e.begin == expected, what, ": tensor \"", e.name, "\" starts at byte ", e.begin, " of the data",
                      e.begin < expected ? " (it overlaps the tensor before it" : " (a gap after the tensor before it",
                      ", which ends at ", expected, ")");
    expected = e.end;
  }
  TORCH_CHECK_VALUE(expected <= data_size, what, ": the tensors need ", expected, " bytes of data but the file has ",
                    data_size, " (truncated?)");
  TORCH_CHECK_VALUE(expected == data_size, what, ": ", data_size - expected,
                    " trailing bytes after the last tensor's data");
  return out;
}

}  // namespace

Safetensors parse_safetensors(const uint8_t* data, size_t size, const std::string& what) {
  Header header = parse_header(data, size, size, what);
  Safetensors out;
  out.metadata = std::move(header.metadata);
  const uint8_t* base = data + 8 + header.header_len;
  for (auto& e : header.entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), base + e.begin, e.end - e.begin);
    out.tensors.emplace_back(std::move(e.name), std::move(t));
  }
  return out;
}

Safetensors read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK_VALUE(in.good(), path, ": cannot open for reading (", std::strerror(errno), ")");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  const std::string bytes = buffer.str();
  return parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK_VALUE(fd_ >= 0, path, ": cannot open for reading (", std::strerror(errno), ")");
  try {
    struct stat st;
    TORCH_CHECK_VALUE(::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode), path, ": not a regular file");
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    std::vector<uint8_t> head(std::min<uint64_t>(size, 8));
    read_at(head.data(), head.size(), 0);
    if (head.size() == 8) {  // the header itself, bounded by the limit and the file (parse_header says which)
      const uint64_t header_len = read_le64(head.data());
      if (header_len <= kMaxSafetensorsHeader && header_len <= size - 8) {
        head.resize(8 + header_len);
        read_at(head.data() + 8, header_len, 8);
      }
    }
    Header header = parse_header(head.data(), head.size(), size, path);
    data_start_ = 8 + header.header_len;
    entries_ = std::move(header.entries);
    metadata_ = std::move(header.metadata);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { ::close(fd_); }

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

at::Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsEntry* e = find(name);
  TORCH_CHECK_VALUE(e != nullptr, path_, ": no tensor named \"", name, "\"");
  const uint64_t bytes = e->end - e->begin;
  at::Tensor t = at::empty(e->shape, at::TensorOptions().dtype(e->dtype));
  read_at(static_cast<uint8_t*>(t.data_ptr()), bytes, data_start_ + e->begin);
  return t;
}

void SafetensorsFile::read_at(uint8_t* out, uint64_t bytes, uint64_t offset) const {
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(fd_, out + done, bytes - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    TORCH_CHECK_VALUE(n > 0, path_, ": reading ", bytes, " bytes at offset ", offset, " failed (",
                      n == 0 ? "the file is shorter than when it was opened" : std::strerror(errno), ")");
    done += static_cast<uint64_t>(n);
  }
}

std::string serialize_safetensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK_VALUE(name != "__metadata__", "safetensors: a tensor may not be named __metadata__");
    TORCH_CHECK_VALUE(!header.contains(name), "safetensors: duplicate tensor name \"", name, "\"");
    TORCH_CHECK_VALUE(tensor.defined(), "safetensors: tensor \"", name, "\" is undefined");
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = t.numel() * t.element_size();
    header[name] = {
        {"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // pad to 8 bytes, as the reference writer does
  std::string out(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += text;
  out.reserve(out.size() + offset);
  for (const auto& t : contiguous) out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return out;
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  const auto slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string tmp = path + ".tmp-XXXXXX";
  std::vector<char> name(tmp.begin(), tmp.end());
  name.push_back('\0');
  const int fd = ::mkstemp(name.data());
  TORCH_CHECK_VALUE(fd >= 0, path, ": cannot create a temporary file in ", dir, " (", std::strerror(errno), ")");
  tmp = name.data();
  auto fail = [&](const char* step) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    TORCH_CHECK_VALUE(false, path, ": ", step, " failed (", std::strerror(err), "); nothing was replaced");
  };
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + written, contents.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("writing");
    }
    written += static_cast<size_t>(n);
  }
  if (::fchmod(fd, 0644) != 0) fail("setting permissions");
  if (::fsync(fd) != 0) fail("flushing to disk");
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    TORCH_CHECK_VALUE(false, path, ": closing the temporary file failed (", std::strerror(errno), ")");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    TORCH_CHECK_VALUE(false, path, ": renaming the temporary file failed (", std::strerror(err), ")");
  }
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd >= 0) {  // the rename itself reaches the disk
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_file_atomically(path, serialize_safetensors(tensors, metadata));
}

}  // namespace lorafuse::io
