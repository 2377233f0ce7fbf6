#include "formats/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include <openssl/evp.h>

#include "formats/error.h"

namespace oscar::fmt {

namespace fs = std::filesystem;

namespace {

std::string errno_text(int err) { return std::strerror(err); }

fs::path directory_of(const fs::path& target) {
  fs::path dir = target.parent_path();
  return dir.empty() ? fs::path(".") : dir;
}

void fsync_path(const fs::path& path, int flags, const std::string& where) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) throw Error(where, "cannot open " + path.string() + " to fsync: " + errno_text(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some filesystems cannot fsync a directory (EINVAL); the rename itself has still happened.
  if (rc != 0 && !(err == EINVAL && (flags & O_DIRECTORY)))
    throw Error(where, "fsync of " + path.string() + " failed: " + errno_text(err));
}

struct DigestCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};
using DigestCtx = std::unique_ptr<EVP_MD_CTX, DigestCtxDeleter>;

DigestCtx sha256_begin(const std::string& where) {
  DigestCtx ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw Error(where, "cannot initialise OpenSSL sha256");
  return ctx;
}

void sha256_update(EVP_MD_CTX* ctx, const void* data, size_t n, const std::string& where) {
  if (EVP_DigestUpdate(ctx, data, n) != 1) throw Error(where, "OpenSSL sha256 update failed");
}

std::string sha256_finish(EVP_MD_CTX* ctx, const std::string& where) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx, digest.data(), &len) != 1) throw Error(where, "OpenSSL sha256 final failed");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    hex += kHex[digest[i] >> 4];
    hex += kHex[digest[i] & 0xf];
  }
  return hex;
}

}  // namespace

AtomicFile::AtomicFile(fs::path target) : target_(std::move(target)) {
  const std::string where = target_.string();
  if (target_.filename().empty()) throw Error(where, "target has no file name");
  const fs::path dir = directory_of(target_);
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(where, "directory " + dir.string() + " does not exist or is not a directory");
  // The temp file lives in the target's directory so that rename() is atomic (same filesystem), and is hidden
  // (leading dot) so globs over the directory never pick up a half-written output.
  std::string temp_name = ".";
  temp_name += target_.filename().string();
  temp_name += ".tmp.XXXXXX";
  const std::string templ = (dir / temp_name).string();
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  fd_ = ::mkstemp(buf.data());
  if (fd_ < 0) throw Error(where, "cannot create a temporary file in " + dir.string() + ": " + errno_text(errno));
  temp_ = fs::path(buf.data());
  // mkstemp creates 0600; outputs are meant to be shared like any file written with open(2) under umask 022.
  ::fchmod(fd_, 0644);
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
}

void AtomicFile::write(std::span<const std::byte> bytes) {
  if (committed_) throw Error(target_.string(), "write after commit");
  if (fd_ < 0) throw Error(target_.string(), "write after the stream was closed");
  const std::byte* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(target_.string(), "write to " + temp_.string() + " failed: " + errno_text(errno));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

void AtomicFile::write(std::string_view text) { write(std::as_bytes(std::span(text.data(), text.size()))); }

void AtomicFile::commit() {
  const std::string where = target_.string();
  if (committed_) throw Error(where, "commit called twice");
  if (fd_ >= 0) {
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) throw Error(where, "close of " + temp_.string() + " failed: " + errno_text(errno));
  }
  // Reopen by name rather than fsync our descriptor: a library writing through temp_path() (HDF5) may have
  // replaced the file we created.
  fsync_path(temp_, O_RDONLY, where);
  if (::rename(temp_.c_str(), target_.c_str()) != 0)
    throw Error(where, "rename from " + temp_.string() + " failed: " + errno_text(errno));
  committed_ = true;
  // Without this the rename itself may be lost on a crash even though the data blocks are on disk.
  fsync_path(directory_of(target_), O_RDONLY | O_DIRECTORY, where);
}

void write_file_atomic(const fs::path& target, std::string_view contents) {
  AtomicFile file(target);
  file.write(contents);
  file.commit();
}

std::string sha256_hex(std::span<const std::byte> bytes) {
  DigestCtx ctx = sha256_begin("sha256");
  sha256_update(ctx.get(), bytes.data(), bytes.size(), "sha256");
  return sha256_finish(ctx.get(), "sha256");
}

std::string sha256_file(const fs::path& path) {
  const std::string where = path.string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(where, "cannot open for sha256: " + errno_text(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  DigestCtx ctx = sha256_begin(where);
  // Stream in fixed chunks: checkpoints are larger than we want to hold in memory twice.
  std::vector<unsigned char> chunk(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, chunk.data(), chunk.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(where, "read failed during sha256: " + errno_text(errno));
    }
    if (n == 0) break;
    sha256_update(ctx.get(), chunk.data(), static_cast<size_t>(n), where);
  }
  return sha256_finish(ctx.get(), where);
}

}  // namespace oscar::fmt
