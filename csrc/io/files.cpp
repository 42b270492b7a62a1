// Files written so that a crash never leaves them half-written (see <lorafuse/io/files.h>).
#include <c10/util/Exception.h>
#include <dirent.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <fcntl.h>
#include <lorafuse/io/files.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>

namespace lorafuse::io {
namespace {

[[noreturn]] void fail_io(const std::string& what, const std::string& step, int err) {
  C10_THROW_ERROR(ValueError, what + ": " + step + " failed (" + std::strerror(err) + ")");
}

void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

void write_all(const std::string& path, const std::string& contents, const std::string& what) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) fail_io(what, "creating " + path, errno);
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + written, contents.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      fail_io(what, "writing " + path, err);
    }
    written += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    fail_io(what, "flushing " + path, err);
  }
  if (::close(fd) != 0) fail_io(what, "closing " + path, errno);
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
  }
  return names;
}

mode_t current_umask() {
  const mode_t mask = ::umask(0);
  ::umask(mask);
  return mask;
}

}  // namespace

std::string read_text(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK_VALUE(in.good(), what, ": cannot be read (", std::strerror(errno), ")");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string list_some(const std::vector<std::string>& names, size_t limit) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < limit; ++i) out += (i ? ", \"" : "\"") + names[i] + "\"";
  if (names.size() > limit) out += " and " + std::to_string(names.size() - limit) + " more";
  return out;
}

void release_freed_memory() {
#if defined(__GLIBC__)
  ::malloc_trim(0);
#endif
}

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

void replace_folder_atomically(const std::string& what, const std::string& dir_in,
                               const std::vector<std::pair<std::string, std::string>>& files,
                               const std::vector<std::string>& drop) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  TORCH_CHECK_VALUE(!dir.empty(), what, ": dir is empty; expected a folder path");
  struct stat st;
  if (::lstat(dir.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {  // save into the folder the link points to
    char resolved[PATH_MAX];
    TORCH_CHECK_VALUE(::realpath(dir.c_str(), resolved) != nullptr, what, ": \"", dir,
                      "\" is a symbolic link that cannot be resolved (", std::strerror(errno), ")");
    dir = resolved;
  }
  const auto slash = dir.rfind('/');
  const std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : dir.substr(0, slash));
  const bool exists = ::stat(dir.c_str(), &st) == 0;
  TORCH_CHECK_VALUE(!exists || S_ISDIR(st.st_mode), what, ": \"", dir, "\" exists and is not a folder");
  const mode_t mode = exists ? (st.st_mode & 07777) : (0777 & ~current_umask());
  std::vector<std::string> others;  // the user's files in dir, kept
  if (exists) {
    std::vector<std::string> subfolders;
    for (const auto& name : entries(dir)) {
      if (std::any_of(files.begin(), files.end(), [&](const auto& f) { return f.first == name; })) continue;
      if (std::find(drop.begin(), drop.end(), name) != drop.end()) continue;
      struct stat est;
      if (::lstat((dir + "/" + name).c_str(), &est) != 0) continue;
      (S_ISDIR(est.st_mode) ? subfolders : others).push_back(name);
    }
    TORCH_CHECK_VALUE(subfolders.empty(), what, ": \"", dir, "\" holds subfolders (", list_some(subfolders),
                      "); the folder is replaced as a whole, atomically, and lorafuse does not move folders "
                      "it did not write. Save into a folder without subfolders");
  }
  struct stat pst;
  TORCH_CHECK_VALUE(::stat(parent.c_str(), &pst) == 0 && S_ISDIR(pst.st_mode), what, ": the parent folder \"", parent,
                    "\" of \"", dir, "\" does not exist");

  std::string staging = dir + ".saving-XXXXXX";
  std::vector<char> buf(staging.begin(), staging.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) fail_io(what + ": " + dir, "creating a folder beside it", errno);
  staging = buf.data();
  try {
    if (::chmod(staging.c_str(), mode) != 0) fail_io(what + ": " + dir, "setting the new folder's mode", errno);
    for (const auto& [name, contents] : files) write_all(staging + "/" + name, contents, what + ": " + dir);
    for (const auto& name : others) {
      if (::link((dir + "/" + name).c_str(), (staging + "/" + name).c_str()) != 0) {
        fail_io(what + ": " + dir, "keeping \"" + name + "\" (a hard link into the new folder)", errno);
      }
    }
    fsync_path(staging, O_RDONLY | O_DIRECTORY);
    if (!exists) {
      if (::rename(staging.c_str(), dir.c_str()) != 0) fail_io(what + ": " + dir, "renaming into place", errno);
    } else {
      // One atomic step: the new folder and the old one trade names; the old one is then removed.
      std::string old = staging;
      if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
        // A file system without RENAME_EXCHANGE: the old folder steps aside under a temporary name first
        // (a crash between the two renames leaves it whole there, as <dir>.old-XXXXXX).
        if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) {
          fail_io(what + ": " + dir, "swapping the new folder into place", errno);
        }
        std::string aside = dir + ".old-XXXXXX";
        std::vector<char> abuf(aside.begin(), aside.end());
        abuf.push_back('\0');
        if (::mkdtemp(abuf.data()) == nullptr) fail_io(what + ": " + dir, "making room beside it", errno);
        old = abuf.data();
        if (::rename(dir.c_str(), old.c_str()) != 0) {
          const int err = errno;
          ::rmdir(old.c_str());
          fail_io(what + ": " + dir, "moving the old folder aside", err);
        }
        if (::rename(staging.c_str(), dir.c_str()) != 0) {
          const int err = errno;
          ::rename(old.c_str(), dir.c_str());
          fail_io(what + ": " + dir, "renaming the new folder into place", err);
        }
      }
      // The old folder holds only the old adapter files and links to files the new one also links.
      for (const auto& name : entries(old)) ::unlink((old + "/" + name).c_str());
      ::rmdir(old.c_str());
    }
    fsync_path(parent, O_RDONLY | O_DIRECTORY);
  } catch (...) {
    struct stat sst;
    if (::stat(staging.c_str(), &sst) == 0) {
      for (const auto& name : entries(staging)) ::unlink((staging + "/" + name).c_str());
      ::rmdir(staging.c_str());
    }
    throw;
  }
}

}  // namespace lorafuse::io
