#pragma once
// safetensors: memory-mapped, zero-copy reading of single-file and sharded checkpoints, strict validation of
// hostile headers, conversion to fp32/bf16, and an atomic writer for dumps and exports.
//
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]}, ...,
// "__metadata__": {str: str}}, then the data section; offsets are relative to the data section.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "formats/dtype.h"

namespace oscar::fmt {

// A borrowed view of one tensor inside a mapped file. Valid while the owning SafetensorsFile lives.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;
  std::filesystem::path file;  // which file holds it (for error messages)

  int64_t numel() const;
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
};

// Upper bound on the JSON header; the reference implementation uses 100 MB as well.
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

// One mmapped .safetensors file. Construction validates everything (header length inside the file and within
// kMaxSafetensorsHeader, JSON well-formed, known dtypes, offsets inside the data section, sorted without overlap,
// byte size == numel * dtype size, no duplicate names) and throws oscar::Error naming the file and the problem.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find(const std::string& name) const;  // nullptr when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint: a single file, or a directory with model.safetensors or
// model.safetensors.index.json (shards). A missing shard, a tensor listed in the index but absent from its shard,
// or a name present in two shards is an error naming the files.
class TensorStore {
 public:
  // `path` is a directory (model.safetensors or model.safetensors.index.json inside) or a .safetensors file.
  static TensorStore open(const std::filesystem::path& path);

  bool contains(const std::string& name) const;
  // Throws oscar::Error("<dir>: tensor <name>", "not found") when absent.
  const TensorView& get(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  const std::filesystem::path& root() const { return root_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::filesystem::path root_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

// Converts any float tensor (F64/F32/F16/BF16) to fp32. `out.size()` must equal t.numel().
void to_f32(const TensorView& t, std::span<float> out);
std::vector<float> to_f32(const TensorView& t);
// Converts a contiguous range of elements [first, first + out.size()) — used to stream rows of large weights.
void to_f32_range(const TensorView& t, int64_t first, std::span<float> out);
// Converts any float tensor to bf16 bits (round-to-nearest-even from wider types).
std::vector<uint16_t> to_bf16(const TensorView& t);

// A tensor to write: bytes are borrowed and must stay alive during the write.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
};
TensorToWrite f32_tensor(std::string name, std::vector<int64_t> shape, std::span<const float> values);

// Writes a .safetensors file atomically (temp file in the same directory, fsync, rename): readers never see
// a partial file. Tensors are stored in sorted name order, header padded to 8 bytes.
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace oscar::fmt
