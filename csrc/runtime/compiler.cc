// NVRTC compilation and the on-disk CUBIN cache; see compiler.h.
#include "runtime/compiler.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "runtime/cuda_api.h"
#include "runtime/files.h"
#include "runtime/kernel_sources.h"

namespace tf_fastattn {
namespace gpu {
namespace {

// NVRTC has no C++ standard headers without a toolkit include directory; the
// kernels need only the fixed-width integers, declared as glibc does on LP64
// (long for 64 bits) so the host and the device agree on argument layouts.
constexpr const char* kCstdint = R"(#pragma once
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
namespace std {
using ::int8_t; using ::int16_t; using ::int32_t; using ::int64_t;
using ::uint8_t; using ::uint16_t; using ::uint32_t; using ::uint64_t;
}
)";

// Bump when the cache file layout or the compile recipe changes.
constexpr const char* kCacheFormat = "TFACUBIN1";

uint64_t fnv1a(const std::string& s, uint64_t h) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// The cache holds code that runs in this process, so it is created private
// (0700) and trusted only where nobody else could have written it.
Status make_dirs(const std::string& path) {
  std::string failed;
  if (!files::make_dirs(path, 0700, &failed)) {
    return Status::Unavailable("cannot create directory " + failed + ": " + std::strerror(errno));
  }
  return Status::OK();
}

// OK when `path` (the cache directory, following links, or an entry, not
// following them) is owned by this process's user and writable by no one
// else; otherwise says why.
Status check_trusted(const std::string& path, bool directory) {
  struct stat st;
  if ((directory ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st)) != 0) {
    return Status::Unavailable(std::string("cannot stat it: ") + std::strerror(errno));
  }
  if (directory ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
    return Status::Unavailable(directory ? "it is not a directory" : "it is not a regular file");
  }
  if (st.st_uid != ::geteuid()) {
    return Status::Unavailable("it is owned by uid " + std::to_string(st.st_uid) + ", not by this user (uid " +
                               std::to_string(::geteuid()) + ")");
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return Status::Unavailable(std::string("it is writable by its group or by others (mode ") + mode + ")");
  }
  return Status::OK();
}

// One warning per path and reason on stderr: the kernels still compile (in
// memory), but the user should know that the cache is not used.
void warn_cache_once(const std::string& path, const std::string& why) {
  static std::mutex mu;
  static std::set<std::string>* warned = new std::set<std::string>();
  std::lock_guard<std::mutex> lock(mu);
  if (!warned->insert(path + '\0' + why).second) return;
  std::fprintf(stderr, "tf_fastattn: warning: not using the kernel cache %s: %s; the GPU kernels are compiled in "
               "memory (set TF_FASTATTN_CACHE_DIR to a directory of your own)\n", path.c_str(), why.c_str());
}

void put_u64(std::string* out, uint64_t v) { out->append(reinterpret_cast<const char*>(&v), 8); }
bool get_u64(const std::string& in, size_t* pos, uint64_t* v) {
  if (*pos + 8 > in.size()) return false;
  std::memcpy(v, in.data() + *pos, 8);
  *pos += 8;
  return true;
}

// Entry layout: magic, image size, log size, is_ptx, checksum, image, log.
std::string encode_entry(const CompiledVariant& c) {
  std::string out = kCacheFormat;
  put_u64(&out, c.image.size());
  put_u64(&out, c.log.size());
  put_u64(&out, c.is_ptx ? 1 : 0);
  put_u64(&out, fnv1a(c.log, fnv1a(c.image, 0xcbf29ce484222325ull)));
  out += c.image;
  out += c.log;
  return out;
}

// False for anything truncated or corrupt: the caller recompiles.
bool decode_entry(const std::string& in, CompiledVariant* c) {
  const size_t magic = std::strlen(kCacheFormat);
  if (in.compare(0, magic, kCacheFormat) != 0) return false;
  size_t pos = magic;
  uint64_t image_size, log_size, is_ptx, checksum;
  if (!get_u64(in, &pos, &image_size) || !get_u64(in, &pos, &log_size) || !get_u64(in, &pos, &is_ptx) ||
      !get_u64(in, &pos, &checksum)) {
    return false;
  }
  if (image_size == 0 || pos + image_size + log_size != in.size()) return false;
  c->image = in.substr(pos, image_size);
  c->log = in.substr(pos + image_size, log_size);
  c->is_ptx = is_ptx != 0;
  return fnv1a(c->log, fnv1a(c->image, 0xcbf29ce484222325ull)) == checksum;
}

// Write to a unique temporary name in the same directory, then rename: other
// processes see either no file or a complete one. Concurrent writers of the
// same entry each rename a complete file; the last one wins.
void write_atomically(const std::string& path, const std::string& data) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." +
                          std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id())) + "." +
                          std::to_string(counter++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {  // read-only cache: compile in memory every time
    warn_cache_once(path.substr(0, path.rfind('/')), std::string("cannot write to it: ") + std::strerror(errno));
    return;
  }
  const bool written = files::write_all(fd, data.data(), data.size());
  const bool ok = ::close(fd) == 0 && written;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) ::unlink(tmp.c_str());
}

const EmbeddedSource* find_source(const std::string& name) {
  size_t n = 0;
  const EmbeddedSource* all = embedded_sources(&n);
  for (size_t i = 0; i < n; ++i) {
    if (name == all[i].name) return &all[i];
  }
  return nullptr;
}

Status run_nvrtc(const Nvrtc& nv, const KernelVariant& v, const std::string& source,
                 const std::vector<std::string>& options, CompiledVariant* out) {
  std::vector<const char*> header_names = {"cstdint"}, header_texts = {kCstdint};
  size_t n = 0;
  const EmbeddedSource* all = embedded_sources(&n);
  for (size_t i = 0; i < n; ++i) {
    if (ends_with(all[i].name, ".cu")) continue;
    header_names.push_back(all[i].name);
    header_texts.push_back(all[i].text);
  }
  nvrtcProgram prog = nullptr;
  int r = nv.nvrtcCreateProgram(&prog, source.c_str(), v.source.c_str(), static_cast<int>(header_names.size()),
                                header_texts.data(), header_names.data());
  if (r != 0) return Status::Internal(std::string("nvrtcCreateProgram failed: ") + nv.nvrtcGetErrorString(r));
  std::vector<const char*> opts;
  for (const std::string& o : options) opts.push_back(o.c_str());
  r = nv.nvrtcCompileProgram(prog, static_cast<int>(opts.size()), opts.data());
  size_t log_size = 0;
  nv.nvrtcGetProgramLogSize(prog, &log_size);
  std::string log(log_size, '\0');
  if (log_size) nv.nvrtcGetProgramLog(prog, &log[0]);
  while (!log.empty() && log.back() == '\0') log.pop_back();
  out->log = log;
  if (r != 0) {
    nv.nvrtcDestroyProgram(&prog);
    return Status::Internal("NVRTC " + std::to_string(nv.major) + "." + std::to_string(nv.minor) +
                           " failed to compile " + v.name() + " for " + out->target + ":\n" + log);
  }
  size_t size = 0;
  if (out->is_ptx) {
    nv.nvrtcGetPTXSize(prog, &size);
    out->image.assign(size, '\0');
    nv.nvrtcGetPTX(prog, &out->image[0]);
  } else {
    nv.nvrtcGetCUBINSize(prog, &size);
    out->image.assign(size, '\0');
    nv.nvrtcGetCUBIN(prog, &out->image[0]);
  }
  nv.nvrtcDestroyProgram(&prog);
  return Status::OK();
}

}  // namespace

std::string KernelVariant::name() const {
  std::string s = source + "[";
  for (size_t i = 0; i < defines.size(); ++i) s += (i ? "," : "") + defines[i];
  return s + "]";
}

std::string cache_dir() {
  if (const char* d = std::getenv("TF_FASTATTN_CACHE_DIR")) {
    if (*d) return d;
  }
  if (const char* x = std::getenv("XDG_CACHE_HOME")) {
    if (*x) return std::string(x) + "/tf_fastattn/kernels";
  }
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : "/tmp") + "/.cache/tf_fastattn/kernels";
}

std::vector<KernelResources> parse_ptxas_log(const std::string& log) {
  std::vector<KernelResources> out;
  std::istringstream in(log);
  std::string line;
  while (std::getline(in, line)) {
    size_t p;
    if ((p = line.find("Compiling entry function '")) != std::string::npos) {
      const size_t b = p + std::strlen("Compiling entry function '");
      KernelResources k;
      k.function = line.substr(b, line.find('\'', b) - b);
      out.push_back(k);
    } else if (out.empty()) {
      continue;
    } else if (line.find("bytes stack frame") != std::string::npos) {
      std::sscanf(line.c_str() + line.find('.') + 1, " %d bytes stack frame, %d bytes spill stores, %d bytes spill loads",
                  &out.back().stack_bytes, &out.back().spill_store_bytes, &out.back().spill_load_bytes);
    } else if ((p = line.find("Used ")) != std::string::npos) {
      std::sscanf(line.c_str() + p, "Used %d registers", &out.back().registers);
      const size_t smem = line.find(" bytes smem");
      if (smem != std::string::npos) {
        size_t b = line.rfind(' ', smem - 1);
        out.back().static_smem_bytes = std::atoi(line.c_str() + b + 1);
      }
    }
  }
  return out;
}

Status compile_variant(const KernelVariant& v, int arch, bool use_cache, CompiledVariant* out) {
  const EmbeddedSource* src = find_source(v.source);
  if (!src) return Status::Internal("no embedded kernel source named " + v.source);
  const Nvrtc* nv = nullptr;
  TFA_RETURN_IF_ERROR(nvrtc_for_arch(arch, &nv));
  *out = CompiledVariant();
  out->nvrtc_path = nv->path;
  out->nvrtc_version = nv->version();
  // A GPU newer than this NVRTC: PTX for the newest architecture it knows.
  out->is_ptx = !nv->supports(arch);
  const int target_arch = out->is_ptx ? nv->archs.back() : arch;
  out->target = (out->is_ptx ? "compute_" : "sm_") + std::to_string(target_arch);

  // -default-device: the headers shared with the host (argument structs,
  // tile traits) have unannotated constexpr functions.
  std::vector<std::string> options = {"--gpu-architecture=" + out->target, "-std=c++17", "-default-device"};
  if (!out->is_ptx) options.push_back("--ptxas-options=-v");  // resource report in the log
  for (const std::string& d : v.defines) options.push_back("-D" + d);

  std::string key_text = std::string(kCacheFormat) + '\0' + src->text + '\0';
  size_t n = 0;
  const EmbeddedSource* all = embedded_sources(&n);
  for (size_t i = 0; i < n; ++i) key_text += std::string(all[i].name) + '\0' + all[i].text + '\0';
  for (const std::string& o : options) key_text += o + '\0';
  key_text += std::to_string(nv->version());
  const std::string key = hex(fnv1a(key_text, 0xcbf29ce484222325ull)) + hex(fnv1a(key_text, 0x84222325cbf29ce4ull));

  if (use_cache) {
    const std::string dir = cache_dir();
    Status usable = make_dirs(dir);
    if (usable.ok()) usable = check_trusted(dir, true);
    if (usable.ok()) {
      out->cache_file = dir + "/" + out->target + "-" + key + ".bin";
    } else {
      warn_cache_once(dir, usable.message());
    }
  }
  std::string cached;
  bool trusted_entry = false;
  if (!out->cache_file.empty() && ::access(out->cache_file.c_str(), F_OK) == 0) {
    const Status t = check_trusted(out->cache_file, false);
    trusted_entry = t.ok();
    if (!trusted_entry) warn_cache_once(out->cache_file, t.message());  // recompiled, and replaced below
  }
  if (trusted_entry && files::read_file(out->cache_file, &cached)) {
    CompiledVariant hit = *out;
    if (decode_entry(cached, &hit)) {
      hit.from_cache = true;
      hit.resources = parse_ptxas_log(hit.log);
      *out = hit;
      return Status::OK();
    }
  }
  TFA_RETURN_IF_ERROR(run_nvrtc(*nv, v, src->text, options, out));
  out->resources = parse_ptxas_log(out->log);
  if (!out->cache_file.empty()) write_atomically(out->cache_file, encode_entry(*out));
  return Status::OK();
}

}  // namespace gpu
}  // namespace tf_fastattn
