#include "formats/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "formats/atomic_file.h"
#include "formats/error.h"

namespace oscar::fmt {

namespace fs = std::filesystem;
using nlohmann::json;

static_assert(std::endian::native == std::endian::little,
              "safetensors is little-endian and tensors are viewed in place without byte swapping");

namespace {

constexpr const char* kMetadataKey = "__metadata__";

std::string tensor_where(const fs::path& file, const std::string& name) {
  return file.string() + ": tensor " + name;
}

// nlohmann::json keeps the last of two equal keys without a word. A duplicate tensor name is exactly the kind of
// header a hostile or corrupted file uses to make two readers disagree, so the parser callback tracks the keys of
// every open object and refuses a repeat.
json parse_json_rejecting_duplicates(std::string_view text, const std::string& where, const char* what) {
  std::vector<std::set<std::string>> open_objects;
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!open_objects.empty() && !open_objects.back().insert(key).second)
          throw Error(where, std::string(what) + " has duplicate key '" + key + "'");
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& e) {
    throw Error(where, std::string(what) + " is not valid JSON: " + e.what());
  }
}

uint64_t json_u64(const json& v, const std::string& where, const std::string& field) {
  if (!v.is_number_unsigned()) {
    if (v.is_number_integer()) throw Error(where, field + " is negative (" + v.dump() + ")");
    throw Error(where, field + " must be a non-negative integer, got " + v.dump());
  }
  return v.get<uint64_t>();
}

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string(), "cannot open: " + std::string(std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(path.string(), "read failed");
  return ss.str();
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  const std::string where = path.string();
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(where, "cannot open: " + std::string(std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw Error(where, "cannot stat: " + std::string(std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(where, "not a regular file");
  }
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    throw Error(where, "file is " + std::to_string(file_size) +
                           " bytes, too short for the 8-byte header length of a safetensors file");
  }
  // Read-only private mapping: tensors are borrowed in place (zero copy) and pages are faulted in on demand.
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) throw Error(where, "mmap failed: " + std::string(std::strerror(map_err)));
  file->map_ = map;
  file->map_size_ = file_size;
  const auto* base = static_cast<const std::byte*>(map);

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);
  if (header_len > kMaxSafetensorsHeader)
    throw Error(where, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                           std::to_string(kMaxSafetensorsHeader) + " bytes");
  if (header_len > file_size - 8)
    throw Error(where, "header length " + std::to_string(header_len) + " exceeds the file size (" +
                           std::to_string(file_size) + " bytes)");
  const uint64_t data_size = file_size - 8 - header_len;
  const std::byte* data = base + 8 + header_len;

  const std::string_view header_text(reinterpret_cast<const char*>(base + 8), header_len);
  const json header = parse_json_rejecting_duplicates(header_text, where, "header");
  if (!header.is_object()) throw Error(where, "header JSON is not an object");

  struct Range {
    uint64_t begin, end;
    size_t tensor;
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (entry.is_null()) continue;
      if (!entry.is_object()) throw Error(where, "__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          throw Error(where, "__metadata__ value of '" + key + "' is not a string (" + value.dump() + ")");
        file->metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string twhere = tensor_where(path, name);
    if (!entry.is_object()) throw Error(twhere, "header entry is not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) throw Error(twhere, std::string("header entry is missing '") + field + "'");

    TensorView view;
    view.name = name;
    view.file = path;
    if (!entry["dtype"].is_string()) throw Error(twhere, "dtype is not a string");
    view.dtype = parse_dtype(entry["dtype"].get<std::string>(), twhere);

    const json& shape = entry["shape"];
    if (!shape.is_array()) throw Error(twhere, "shape is not an array");
    uint64_t numel = 1;
    bool overflow = false;
    for (size_t i = 0; i < shape.size(); ++i) {
      uint64_t d = json_u64(shape[i], twhere, "shape[" + std::to_string(i) + "]");
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw Error(twhere, "shape[" + std::to_string(i) + "] = " + std::to_string(d) + " is too large");
      view.shape.push_back(static_cast<int64_t>(d));
      overflow = overflow || __builtin_mul_overflow(numel, d, &numel);
    }
    uint64_t nbytes = 0;
    if (overflow || numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(view.dtype)), &nbytes))
      throw Error(twhere, "shape " + shape.dump() + " overflows the element count");

    const json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2) throw Error(twhere, "data_offsets is not a [begin, end] pair");
    const uint64_t begin = json_u64(offsets[0], twhere, "data_offsets[0]");
    const uint64_t end = json_u64(offsets[1], twhere, "data_offsets[1]");
    if (begin > end)
      throw Error(twhere, "data_offsets begin " + std::to_string(begin) + " > end " + std::to_string(end));
    if (end > data_size)
      throw Error(twhere, "data_offsets end " + std::to_string(end) + " is out of the data section (" +
                              std::to_string(data_size) + " bytes)");
    if (end - begin != nbytes)
      throw Error(twhere, "data_offsets span " + std::to_string(end - begin) + " bytes but shape " + shape.dump() +
                              " of " + std::string(dtype_name(view.dtype)) + " needs " + std::to_string(nbytes));
    view.data = data + begin;
    view.nbytes = static_cast<size_t>(nbytes);
    ranges.push_back({begin, end, file->tensors_.size()});
    file->tensors_.push_back(std::move(view));
  }

  // The format requires the data section to be tiled exactly: no byte shared by two tensors (aliasing writes
  // through a zero-copy view), no unowned bytes (hidden payload), nothing after the last tensor.
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t covered = 0;
  for (const Range& r : ranges) {
    const std::string& name = file->tensors_[r.tensor].name;
    if (r.begin < covered)
      throw Error(tensor_where(path, name), "data_offsets [" + std::to_string(r.begin) + ", " +
                                                std::to_string(r.end) + ") overlap the previous tensor (ends at " +
                                                std::to_string(covered) + ")");
    if (r.begin > covered)
      throw Error(tensor_where(path, name), "gap in the data section: bytes [" + std::to_string(covered) + ", " +
                                                std::to_string(r.begin) + ") belong to no tensor");
    covered = r.end;
  }
  if (covered != data_size)
    throw Error(where, "gap in the data section: bytes [" + std::to_string(covered) + ", " +
                           std::to_string(data_size) + ") after the last tensor belong to no tensor");

  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// ---------------------------------------------------------------------------------------------------------------

TensorStore TensorStore::open(const fs::path& path) {
  TensorStore store;
  store.root_ = path;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path.string(), "no such file or directory");

  auto add_file = [&](std::shared_ptr<SafetensorsFile> file) {
    for (const TensorView& t : file->tensors()) {
      auto [it, inserted] = store.by_name_.emplace(t.name, &t);
      if (!inserted)
        throw Error(tensor_where(store.root_, t.name),
                    "present in two shards: " + it->second->file.string() + " and " + t.file.string());
    }
    store.files_.push_back(std::move(file));
  };

  if (!fs::is_directory(path, ec)) {
    add_file(SafetensorsFile::open(path));
    return store;
  }
  // Same precedence as transformers: a single model.safetensors wins over an index.
  const fs::path single = path / "model.safetensors";
  const fs::path index_path = path / "model.safetensors.index.json";
  if (fs::exists(single, ec)) {
    add_file(SafetensorsFile::open(single));
    return store;
  }
  if (!fs::exists(index_path, ec))
    throw Error(path.string(), "neither model.safetensors nor model.safetensors.index.json found");

  const std::string iwhere = index_path.string();
  const json index = parse_json_rejecting_duplicates(read_text_file(index_path), iwhere, "index");
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    throw Error(iwhere, "missing 'weight_map' object");
  const json& weight_map = index["weight_map"];

  std::map<std::string, std::string> shard_of;  // tensor -> shard file name
  std::set<std::string> shard_names;
  for (const auto& [name, shard] : weight_map.items()) {
    if (!shard.is_string()) throw Error(iwhere, "weight_map entry '" + name + "' is not a string");
    const std::string shard_name = shard.get<std::string>();
    // Shards are siblings of the index; a path component would let an index point anywhere on disk.
    const fs::path shard_path(shard_name);
    if (shard_name.empty() || shard_path.has_parent_path() || shard_path.is_absolute() || shard_name == "." ||
        shard_name == "..")
      throw Error(iwhere, "weight_map entry '" + name + "' names shard '" + shard_name +
                              "', which is not a file name in the index's directory");
    shard_of[name] = shard_name;
    shard_names.insert(shard_name);
  }
  if (shard_of.empty()) throw Error(iwhere, "weight_map is empty");

  std::map<std::string, const SafetensorsFile*> shard_files;
  for (const std::string& shard_name : shard_names) {
    const fs::path shard_path = path / shard_name;
    if (!fs::exists(shard_path, ec))
      throw Error(shard_path.string(), "shard listed in " + iwhere + " does not exist");
    auto file = SafetensorsFile::open(shard_path);
    shard_files[shard_name] = file.get();
    add_file(std::move(file));
  }
  for (const auto& [name, shard_name] : shard_of) {
    const SafetensorsFile* file = shard_files.at(shard_name);
    if (!file->find(name))
      throw Error(tensor_where(file->path(), name), "listed in " + iwhere + " but absent from the shard");
  }
  return store;
}

bool TensorStore::contains(const std::string& name) const { return by_name_.count(name) != 0; }

const TensorView& TensorStore::get(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) throw Error(root_.string() + ": tensor " + name, "not found");
  return *it->second;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& [name, view] : by_name_) out.push_back(name);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

namespace {

void require_float(const TensorView& t, const char* to) {
  if (t.dtype != DType::F64 && t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
    throw Error(tensor_where(t.file, t.name),
                "cannot convert dtype " + std::string(dtype_name(t.dtype)) + " to " + to +
                    " (supported: F64, F32, F16, BF16)");
}

template <typename T>
T load_element(const std::byte* p, int64_t i) {
  T v;
  // Offsets inside a safetensors data section carry no alignment guarantee.
  std::memcpy(&v, p + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}

// Correctly rounded double -> bf16. double -> float -> bf16 would round twice: 1 + 2^-8 + 2^-30 first becomes
// the tie 1 + 2^-8 in fp32 and then rounds to even 1.0, although it lies above the tie. Rounding to fp32 *toward
// odd* first keeps the sticky information (fp32 has 16 more mantissa bits than bf16), so the final RNE is exact.
uint16_t f64_to_bf16(double d) {
  if (std::isnan(d)) return f32_to_bf16(static_cast<float>(d));
  float f = static_cast<float>(d);
  if (static_cast<double>(f) != d) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u |= 1u;
    std::memcpy(&f, &u, 4);
  }
  return f32_to_bf16(f);
}

}  // namespace

void to_f32_range(const TensorView& t, int64_t first, std::span<float> out) {
  require_float(t, "F32");
  const auto count = static_cast<int64_t>(out.size());
  if (first < 0 || first > t.numel() || count > t.numel() - first)
    throw Error(tensor_where(t.file, t.name), "element range [" + std::to_string(first) + ", " +
                                                  std::to_string(first + count) + ") is outside the " +
                                                  std::to_string(t.numel()) + " elements");
  switch (t.dtype) {
    case DType::F32:
      // memcpy with the null data() of an empty span is undefined even for 0 bytes (found by fuzz_safetensors).
      if (count > 0) std::memcpy(out.data(), t.data + first * 4, static_cast<size_t>(count) * 4);
      break;
    case DType::F64:
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(load_element<double>(t.data, first + i));
      break;
    case DType::F16:
      for (int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(load_element<uint16_t>(t.data, first + i));
      break;
    case DType::BF16:
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_f32(load_element<uint16_t>(t.data, first + i));
      break;
    default:
      break;  // refused by require_float
  }
}

void to_f32(const TensorView& t, std::span<float> out) {
  if (static_cast<int64_t>(out.size()) != t.numel())
    throw Error(tensor_where(t.file, t.name), "output has " + std::to_string(out.size()) + " elements, tensor has " +
                                                  std::to_string(t.numel()));
  to_f32_range(t, 0, out);
}

std::vector<float> to_f32(const TensorView& t) {
  require_float(t, "F32");
  std::vector<float> out(static_cast<size_t>(t.numel()));
  to_f32_range(t, 0, out);
  return out;
}

std::vector<uint16_t> to_bf16(const TensorView& t) {
  require_float(t, "BF16");
  const int64_t n = t.numel();
  std::vector<uint16_t> out(static_cast<size_t>(n));
  switch (t.dtype) {
    case DType::BF16:
      if (n > 0) std::memcpy(out.data(), t.data, static_cast<size_t>(n) * 2);
      break;
    case DType::F32:
      for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(load_element<float>(t.data, i));
      break;
    case DType::F16:  // every half is exact in fp32, so this rounds once
      for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(f16_to_f32(load_element<uint16_t>(t.data, i)));
      break;
    case DType::F64:
      for (int64_t i = 0; i < n; ++i) out[i] = f64_to_bf16(load_element<double>(t.data, i));
      break;
    default:
      break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

TensorToWrite f32_tensor(std::string name, std::vector<int64_t> shape, std::span<const float> values) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) throw Error("tensor " + name, "negative dimension in shape");
    numel *= d;
  }
  if (numel != static_cast<int64_t>(values.size()))
    throw Error("tensor " + name, "shape has " + std::to_string(numel) + " elements but " +
                                      std::to_string(values.size()) + " values were given");
  return TensorToWrite{std::move(name), DType::F32, std::move(shape), std::as_bytes(values)};
}

void write_safetensors(const fs::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string where = path.string();
  std::vector<const TensorToWrite*> sorted;
  sorted.reserve(tensors.size());
  for (const auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](const auto* a, const auto* b) { return a->name < b->name; });

  json header = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const TensorToWrite& t = *sorted[i];
    const std::string twhere = where + ": tensor " + t.name;
    if (t.name.empty() || t.name == kMetadataKey) throw Error(twhere, "invalid tensor name");
    if (i > 0 && sorted[i - 1]->name == t.name) throw Error(twhere, "duplicate tensor name");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw Error(twhere, "negative dimension in shape");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.dtype) != t.bytes.size())
      throw Error(twhere, "has " + std::to_string(t.bytes.size()) + " bytes, shape and dtype need " +
                              std::to_string(numel * dtype_size(t.dtype)));
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string header_text = header.dump();
  // Padding the header keeps the data section 8-byte aligned in the file, hence in the mmap.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  AtomicFile out(path);
  const uint64_t header_len = header_text.size();
  out.write(std::as_bytes(std::span(&header_len, 1)));
  out.write(header_text);
  for (const auto* t : sorted) out.write(t->bytes);
  out.commit();
}

}  // namespace oscar::fmt
