// Reading and writing the files of a folder (adapter folders, model checkpoints) so that a crash never leaves a
// save half-written.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse::io {

/// The whole file at `path`; a ValueError starting with `what` if it cannot be read.
std::string read_text(const std::string& path, const std::string& what);

/// Whether `path` is a regular file (following links).
bool is_file(const std::string& path);

/// `names` quoted and comma-separated, at most `limit` of them, then "and N more".
std::string list_some(const std::vector<std::string>& names, size_t limit = 5);

/// Gives memory the C allocator holds freed back to the system (glibc's malloc_trim; nothing elsewhere). Loading a
/// model one dense weight at a time leaves freed holes between the small tensors kept; without this the peak memory
/// of quantizing while loading grows with every layer instead of staying near the 4-bit model's size.
void release_freed_memory();

/// Writes `files` (name → contents) as folder `dir` (created if absent): a staging folder beside it gets the files,
/// flushed, and hard links to the other files `dir` holds except those named in `drop` (files the new contents make
/// stale), then takes dir's place in one atomic rename. A crash leaves the old folder or the new one, never a mix.
/// A folder holding subfolders is refused (moving folders lorafuse did not write cannot be made atomic). Errors are
/// ValueErrors starting with `what` (e.g. "save_adapter").
void replace_folder_atomically(const std::string& what, const std::string& dir,
                               const std::vector<std::pair<std::string, std::string>>& files,
                               const std::vector<std::string>& drop = {});

}  // namespace lorafuse::io
