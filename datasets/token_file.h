#pragma once
// Pre-tokenized token files (.u32 / .bin): little-endian uint32 token ids, in one of two layouts.
//
//   With header (what write_token_file produces, 24 bytes):
//     bytes 0..7    magic "OSCARTOK"
//     bytes 8..11   u32 format version = 1
//     bytes 12..15  u32 reserved = 0
//     bytes 16..23  u64 number of tokens N
//     then N x u32 token ids; the file size must be exactly 24 + 4 N.
//   Raw (no header): the whole file is u32 token ids; its size must be a multiple of 4. This is what
//     `numpy.array(ids, dtype="<u4").tofile(path)` writes.
//
// A file is read as "with header" iff it starts with the magic. A raw file cannot collide in practice: its first
// two ids would have to be 0x5243534F and 0x4B4F5441.
// The ids are a verbatim stream: the packer inserts no BOS/separator into them (they carry their own).
#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

namespace oscar::data {

inline constexpr char kTokenFileMagic[8] = {'O', 'S', 'C', 'A', 'R', 'T', 'O', 'K'};
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr size_t kTokenFileHeaderBytes = 24;

// Throws oscar::Error naming the file when it is missing, truncated, has an unknown version, or holds an id that
// does not fit in int32.
std::vector<int32_t> read_token_file(const std::filesystem::path& path);

// Writes the header layout atomically. Negative ids are an error.
void write_token_file(const std::filesystem::path& path, std::span<const int32_t> ids);

}  // namespace oscar::data
