// The safetensors format (https://github.com/huggingface/safetensors): read with every rule of the format
// enforced, and written atomically. Used for PEFT-format adapter files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse::io {

/// Tensors in file order (by byte offset) and the string-to-string __metadata__.
struct Safetensors {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
};

/// Where a tensor lies in a safetensors file: bytes [begin, end) of the data section.
struct SafetensorsEntry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

/// The largest JSON header accepted (the reference implementation's bound).
constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

/// Parses a whole safetensors file held in memory; the tensors are CPU copies. Throws c10::ValueError
/// naming the rule that the bytes break: the 8-byte little-endian header length, the header bound, the
/// header inside the file, UTF-8 JSON of the right shape (an object of tensor entries {dtype, shape,
/// data_offsets} and an optional __metadata__ of strings), known dtypes, shape × dtype size (overflow-
/// checked) equal to each byte range, byte ranges contiguous from 0 without gaps or overlaps, no
/// trailing bytes, no duplicate names. `what` names the source in messages (e.g. the file path).
Safetensors parse_safetensors(const uint8_t* data, size_t size, const std::string& what = "safetensors data");

/// Reads and parses the file at `path` (ValueError if it cannot be read).
Safetensors read_safetensors(const std::string& path);

/// A safetensors file on disk, read lazily: the header is read and checked when it opens (every rule of
/// parse_safetensors, the data section's length taken from the file's size), a tensor's bytes only when asked for,
/// so a model's checkpoint is loaded one tensor at a time.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  /// The tensors, in file order (by byte offset).
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The entry named `name`, or nullptr.
  const SafetensorsEntry* find(const std::string& name) const;
  /// A CPU tensor holding the bytes of `name` (ValueError if the file has no such tensor).
  at::Tensor read(const std::string& name) const;

 private:
  void read_at(uint8_t* out, uint64_t bytes, uint64_t offset) const;

  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// The bytes of a safetensors file holding `tensors` (in that order; names must be unique and not
/// "__metadata__"; any device, contiguous copies are written) and `metadata`.
std::string serialize_safetensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

/// Writes `contents` to `path` atomically: a temporary file in the same folder, flushed to disk, then
/// renamed over `path`, and the folder flushed. A crash leaves either the old file or the new one.
void write_file_atomically(const std::string& path, const std::string& contents);

/// serialize_safetensors + write_file_atomically.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace lorafuse::io
