#pragma once
// Every output OSCAR writes (bundles, dumps, exports, reports) goes through AtomicFile: bytes go to a temp file
// in the destination directory, commit() fsyncs and renames it over the target, and a destructor without commit
// (an exception, a kill) leaves the target untouched and removes the temp file.
#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace oscar::fmt {

class AtomicFile {
 public:
  // Throws oscar::Error naming `target` if its directory does not exist or is not writable.
  explicit AtomicFile(std::filesystem::path target);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(std::span<const std::byte> bytes);
  void write(std::string_view text);
  // The temporary path being written; for libraries (HDF5) that need a file name rather than a stream:
  // write there with the library, then call commit().
  const std::filesystem::path& temp_path() const { return temp_; }
  // Closes our stream if open, fsyncs, renames over the target, fsyncs the directory.
  void commit();

 private:
  std::filesystem::path target_;
  std::filesystem::path temp_;
  int fd_ = -1;
  bool committed_ = false;
};

void write_file_atomic(const std::filesystem::path& target, std::string_view contents);

// sha256 of a file's bytes / of a buffer, as lowercase hex.
std::string sha256_file(const std::filesystem::path& path);
std::string sha256_hex(std::span<const std::byte> bytes);

}  // namespace oscar::fmt
