#include "datasets/token_file.h"

#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>

#include "formats/atomic_file.h"
#include "formats/error.h"

namespace oscar::data {

static_assert(std::endian::native == std::endian::little, "token files are little-endian; add byte swapping");

std::vector<int32_t> read_token_file(const std::filesystem::path& path) {
  const std::string where = path.string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(where, "token file not found");
  const uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) throw Error(where, "cannot stat: " + ec.message());
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(where, "cannot open for reading");

  uint64_t first = 0;
  uint64_t count = 0;
  char magic[8] = {};
  if (size >= sizeof(magic)) in.read(magic, sizeof(magic));
  if (size >= sizeof(magic) && std::memcmp(magic, kTokenFileMagic, sizeof(magic)) == 0) {
    if (size < kTokenFileHeaderBytes) throw Error(where, "truncated token file header");
    uint32_t version = 0, reserved = 0;
    in.read(reinterpret_cast<char*>(&version), 4);
    in.read(reinterpret_cast<char*>(&reserved), 4);
    in.read(reinterpret_cast<char*>(&count), 8);
    if (version != kTokenFileVersion)
      throw Error(where, "unsupported token file version " + std::to_string(version) + " (expected " +
                             std::to_string(kTokenFileVersion) + ")");
    if (count > (size - kTokenFileHeaderBytes) / 4 || kTokenFileHeaderBytes + 4 * count != size)
      throw Error(where, "header says " + std::to_string(count) + " tokens but the file holds " +
                             std::to_string(size - kTokenFileHeaderBytes) + " data bytes");
    first = kTokenFileHeaderBytes;
  } else {
    if (size % 4 != 0)
      throw Error(where, "raw token file size " + std::to_string(size) + " is not a multiple of 4 bytes");
    count = size / 4;
  }
  std::vector<uint32_t> raw(count);
  in.seekg(static_cast<std::streamoff>(first));
  in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(count * 4));
  if (!in) throw Error(where, "read failed");
  std::vector<int32_t> ids(count);
  for (uint64_t i = 0; i < count; ++i) {
    if (raw[i] > static_cast<uint32_t>(std::numeric_limits<int32_t>::max()))
      throw Error(where, "token " + std::to_string(i) + " has id " + std::to_string(raw[i]) + ", above int32");
    ids[i] = static_cast<int32_t>(raw[i]);
  }
  return ids;
}

void write_token_file(const std::filesystem::path& path, std::span<const int32_t> ids) {
  std::string bytes(kTokenFileHeaderBytes + 4 * ids.size(), '\0');
  std::memcpy(bytes.data(), kTokenFileMagic, 8);
  const uint32_t version = kTokenFileVersion;
  const uint64_t count = ids.size();
  std::memcpy(bytes.data() + 8, &version, 4);
  std::memcpy(bytes.data() + 16, &count, 8);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) throw Error(path.string(), "token " + std::to_string(i) + " has negative id");
    const auto id = static_cast<uint32_t>(ids[i]);
    std::memcpy(bytes.data() + kTokenFileHeaderBytes + 4 * i, &id, 4);
  }
  fmt::write_file_atomic(path, bytes);
}

}  // namespace oscar::data
