// File helpers of the runtime's kernel cache (compiler.cc), shared with the
// CUDA emulator (csrc/emulation/emulator.cc, which does not link the core).
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <fstream>
#include <sstream>
#include <string>

namespace tf_fastattn {
namespace files {

// The whole file; false when it cannot be opened.
inline bool read_file(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

// Creates `path` and its missing parents with `mode`. False on the first
// directory that cannot be created (named in *failed; errno says why).
inline bool make_dirs(const std::string& path, mode_t mode, std::string* failed) {
  std::string cur;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    if (::mkdir(cur.c_str(), mode) != 0 && errno != EEXIST) {
      *failed = cur;
      return false;
    }
  }
  return true;
}

// Writes all `size` bytes to `fd`; false when a write fails first.
inline bool write_all(int fd, const char* data, size_t size) {
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace files
}  // namespace tf_fastattn
