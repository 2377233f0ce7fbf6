#include "formats/bundle.h"

#include <hdf5.h>
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <tuple>

#include "formats/atomic_file.h"
#include "formats/error.h"
#include "formats/safetensors.h"

namespace oscar::fmt {

namespace fs = std::filesystem;

namespace {

// Owns one HDF5 identifier; the closer matches its kind (file, group, dataset, attribute, space, type, plist).
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now and reports failure (a file close is where HDF5 flushes, so its status matters).
  herr_t close() {
    herr_t rc = 0;
    if (id_ >= 0 && close_) rc = close_(id_);
    id_ = H5I_INVALID_HID;
    return rc;
  }

 private:
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = H5I_INVALID_HID;
  }
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_)(hid_t) = nullptr;
};

// HDF5 prints its error stack to stderr by default; we report through oscar::Error instead.
void silence_hdf5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

Handle check(hid_t id, herr_t (*close)(hid_t), const std::string& where, const std::string& what) {
  if (id < 0) throw Error(where, what);
  return Handle(id, close);
}
void check(herr_t rc, const std::string& where, const std::string& what) {
  if (rc < 0) throw Error(where, what);
}

// Native types equal the little-endian file types on every platform we build for; checksums are over these bytes.
static_assert(std::endian::native == std::endian::little, "bundle checksums assume a little-endian host");

struct DatasetType {
  hid_t file_type;
  hid_t mem_type;
  size_t element_size;
};
template <typename T>
DatasetType dataset_type();
template <>
DatasetType dataset_type<float>() { return {H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 4}; }
template <>
DatasetType dataset_type<double>() { return {H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 8}; }
template <>
DatasetType dataset_type<int32_t>() { return {H5T_STD_I32LE, H5T_NATIVE_INT32, 4}; }

std::string layer_group_name(size_t i) { return ::fmt::format("{:05d}", i); }

// ----------------------------------------------------------------------------------------------- writing

class Writer {
 public:
  explicit Writer(std::string where) : where_(std::move(where)) {
    // Without this every object header carries its creation/modification time and two writes differ.
    gcpl_ = check(H5Pcreate(H5P_GROUP_CREATE), H5Pclose, where_, "H5Pcreate(group) failed");
    check(H5Pset_obj_track_times(gcpl_.get(), false), where_, "H5Pset_obj_track_times failed");
    dcpl_ = check(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, where_, "H5Pcreate(dataset) failed");
    check(H5Pset_obj_track_times(dcpl_.get(), false), where_, "H5Pset_obj_track_times failed");
  }

  Handle create_file(const fs::path& path) {
    Handle fcpl = check(H5Pcreate(H5P_FILE_CREATE), H5Pclose, where_, "H5Pcreate(file) failed");
    check(H5Pset_obj_track_times(fcpl.get(), false), where_, "H5Pset_obj_track_times failed");
    return check(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl.get(), H5P_DEFAULT), H5Fclose, where_,
                 "cannot create HDF5 file " + path.string());
  }

  Handle group(hid_t parent, const std::string& name) {
    return check(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, gcpl_.get(), H5P_DEFAULT), H5Gclose, where_,
                 "cannot create group " + name);
  }

  template <typename T>
  void dataset(hid_t parent, const std::string& name, const std::vector<hsize_t>& dims, std::span<const T> data) {
    const DatasetType t = dataset_type<T>();
    hsize_t n = 1;
    for (hsize_t d : dims) n *= d;
    if (n != data.size()) throw Error(where_ + ": " + name, ::fmt::format("{} values for {} slots", data.size(), n));
    Handle space = check(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose, where_,
                         "H5Screate_simple failed for " + name);
    Handle ds = check(H5Dcreate2(parent, name.c_str(), t.file_type, space.get(), H5P_DEFAULT, dcpl_.get(), H5P_DEFAULT),
                      H5Dclose, where_, "cannot create dataset " + name);
    if (n > 0)
      check(H5Dwrite(ds.get(), t.mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()), where_,
            "cannot write dataset " + name);
    string_attr(ds.get(), "sha256", sha256_hex(std::as_bytes(data)));
  }

  void string_attr(hid_t obj, const std::string& name, const std::string& value) {
    string_array_attr(obj, name, {value}, /*scalar=*/true);
  }

  // Fixed-length, NUL-padded strings: a simple type every HDF5 reader (h5py, h5dump) understands.
  void string_array_attr(hid_t obj, const std::string& name, const std::vector<std::string>& values,
                         bool scalar = false) {
    size_t width = 1;
    for (const auto& v : values) width = std::max(width, v.size());
    Handle type = check(H5Tcopy(H5T_C_S1), H5Tclose, where_, "H5Tcopy failed");
    check(H5Tset_size(type.get(), width), where_, "H5Tset_size failed");
    check(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), where_, "H5Tset_strpad failed");
    const hsize_t n = values.size();
    Handle space = scalar ? check(H5Screate(H5S_SCALAR), H5Sclose, where_, "H5Screate failed")
                          : check(H5Screate_simple(1, &n, nullptr), H5Sclose, where_, "H5Screate_simple failed");
    std::vector<char> buf(std::max<size_t>(1, values.size()) * width, '\0');
    for (size_t i = 0; i < values.size(); ++i) std::memcpy(buf.data() + i * width, values[i].data(), values[i].size());
    Handle attr = check(H5Acreate2(obj, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                        where_, "cannot create attribute " + name);
    check(H5Awrite(attr.get(), type.get(), buf.data()), where_, "cannot write attribute " + name);
  }

  template <typename T>
  void scalar_attr(hid_t obj, const std::string& name, T value) {
    hid_t file_type, mem_type;
    if constexpr (std::is_same_v<T, int64_t>) {
      file_type = H5T_STD_I64LE;
      mem_type = H5T_NATIVE_INT64;
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      file_type = H5T_STD_U64LE;
      mem_type = H5T_NATIVE_UINT64;
    } else if constexpr (std::is_same_v<T, int32_t>) {
      file_type = H5T_STD_I32LE;
      mem_type = H5T_NATIVE_INT32;
    } else if constexpr (std::is_same_v<T, double>) {
      file_type = H5T_IEEE_F64LE;
      mem_type = H5T_NATIVE_DOUBLE;
    } else {
      static_assert(std::is_same_v<T, float>);
      file_type = H5T_IEEE_F32LE;
      mem_type = H5T_NATIVE_FLOAT;
    }
    Handle space = check(H5Screate(H5S_SCALAR), H5Sclose, where_, "H5Screate failed");
    Handle attr = check(H5Acreate2(obj, name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                        where_, "cannot create attribute " + name);
    check(H5Awrite(attr.get(), mem_type, &value), where_, "cannot write attribute " + name);
  }

 private:
  std::string where_;
  Handle gcpl_, dcpl_;
};

void write_tensor_spec(Writer& w, hid_t quant, const std::string& name, const TensorQuantSpec& t) {
  Handle g = w.group(quant, name);
  w.string_attr(g.get(), "storage", std::string(kv_storage_name(t.storage)));
  w.scalar_attr(g.get(), "clip_ratio", t.clip_ratio);
  std::vector<int32_t> seg;
  for (const auto& s : t.segments) seg.insert(seg.end(), {s.begin, s.end, s.bits});
  w.dataset<int32_t>(g.get(), "segments", {t.segments.size(), 3}, seg);
}

void write_all(Writer& w, hid_t file, const Bundle& b) {
  w.scalar_attr(file, "format_major", required_format_major(b));
  w.scalar_attr(file, "format_minor", required_format_minor(b));
  w.string_attr(file, "producer", b.producer);
  // 1.2: only with tables, so a bundle without them keeps the 1.1 bytes.
  if (has_error_feedback(b)) w.scalar_attr(file, "ef_clip_feedback", static_cast<int32_t>(b.ef_clip_feedback ? 1 : 0));
  // 1.3: only with stored key metrics, so a bundle without them keeps the 1.2 bytes.
  if (has_key_metric(b)) {
    w.scalar_attr(file, "ef_damp", b.ef_damp);
    w.scalar_attr(file, "ef_metric_positions", b.ef_metric_positions);
    w.scalar_attr(file, "ef_key_context", b.ef_key_context);
  }

  {
    Handle g = w.group(file, "model");
    const auto& m = b.model;
    w.string_attr(g.get(), "architecture", m.architecture);
    w.scalar_attr(g.get(), "num_layers", m.num_layers);
    w.scalar_attr(g.get(), "num_heads", m.num_heads);
    w.scalar_attr(g.get(), "num_kv_heads", m.num_kv_heads);
    w.scalar_attr(g.get(), "head_dim", m.head_dim);
    w.scalar_attr(g.get(), "hidden_size", m.hidden_size);
    w.scalar_attr(g.get(), "vocab_size", m.vocab_size);
    w.string_attr(g.get(), "config_sha256", m.config_sha256);
    w.string_attr(g.get(), "attention_sha256", m.attention_sha256);
  }
  {
    Handle g = w.group(file, "calibration");
    const auto& c = b.calibration;
    std::vector<std::string> paths, sums, keys, values;
    for (const auto& f : c.data_files) {
      paths.push_back(f.path);
      sums.push_back(f.sha256);
    }
    for (const auto& [k, v] : c.options) {
      keys.push_back(k);
      values.push_back(v);
    }
    w.string_array_attr(g.get(), "data_file_paths", paths);
    w.string_array_attr(g.get(), "data_file_sha256", sums);
    w.scalar_attr(g.get(), "num_sequences", c.num_sequences);
    w.scalar_attr(g.get(), "num_tokens", c.num_tokens);
    w.scalar_attr(g.get(), "seq_len", c.seq_len);
    w.scalar_attr(g.get(), "num_heldout_sequences", c.num_heldout_sequences);
    w.scalar_attr(g.get(), "seed", c.seed);
    w.string_array_attr(g.get(), "option_keys", keys);
    w.string_array_attr(g.get(), "option_values", values);
  }
  {
    Handle g = w.group(file, "quant");
    w.scalar_attr(g.get(), "head_dim", b.quant.head_dim);
    w.scalar_attr(g.get(), "sink_tokens", b.quant.sink_tokens);
    w.scalar_attr(g.get(), "recent_tokens", b.quant.recent_tokens);
    write_tensor_spec(w, g.get(), "k", b.quant.k);
    write_tensor_spec(w, g.get(), "v", b.quant.v);
  }
  {
    Handle g = w.group(file, "layers");
    w.scalar_attr(g.get(), "num_layers", static_cast<int64_t>(b.layers.size()));
    w.scalar_attr(g.get(), "rotation_groups", b.rotation_groups);
    w.string_attr(g.get(), "rotation_composition", b.rotation_composition);
    const hsize_t groups = static_cast<hsize_t>(b.rotation_groups);
    const hsize_t d = static_cast<hsize_t>(b.quant.head_dim);
    for (size_t i = 0; i < b.layers.size(); ++i) {
      const auto& l = b.layers[i];
      Handle lg = w.group(g.get(), layer_group_name(i));
      w.dataset<float>(lg.get(), "k_rotation", {groups, d, d}, l.k_rotation);
      w.dataset<float>(lg.get(), "v_rotation", {groups, d, d}, l.v_rotation);
      w.dataset<double>(lg.get(), "k_eigenvalues", {groups, d}, l.k_eigenvalues);
      w.dataset<double>(lg.get(), "v_eigenvalues", {groups, d}, l.v_eigenvalues);
      const float clips[2] = {l.k_clip_ratio, l.v_clip_ratio};
      w.dataset<float>(lg.get(), "clip_ratios", {2}, clips);
      // 1.1: written only when the layer has its own layout, so a uniform bundle has the 1.0 objects.
      for (const auto& [name, segs] : {std::pair{"k_segments", &l.k_segments}, std::pair{"v_segments", &l.v_segments}}) {
        if (segs->empty()) continue;
        std::vector<int32_t> flat;
        for (const auto& s : *segs) flat.insert(flat.end(), {s.begin, s.end, s.bits});
        w.dataset<int32_t>(lg.get(), name, {segs->size(), 3}, flat);
      }
      // 1.2: error-feedback tables, per tensor and only where present.
      const hsize_t kv = static_cast<hsize_t>(b.model.num_kv_heads);
      if (!l.k_ef_order.empty()) {
        w.dataset<int32_t>(lg.get(), "k_ef_order", {kv, d}, l.k_ef_order);
        w.dataset<float>(lg.get(), "k_ef_weights", {kv, d, d}, l.k_ef_weights);
        if (!l.k_ef_metric.empty()) w.dataset<double>(lg.get(), "k_ef_metric", {kv, d, d}, l.k_ef_metric);
      }
      if (!l.v_ef_order.empty()) {
        w.dataset<int32_t>(lg.get(), "v_ef_order", {kv, d}, l.v_ef_order);
        w.dataset<float>(lg.get(), "v_ef_weights", {kv, d, d}, l.v_ef_weights);
      }
      // 2.0: storage transforms, per tensor and only where present.
      if (!l.k_transform.empty()) {
        w.dataset<float>(lg.get(), "k_transform", {kv, d, d}, l.k_transform);
        w.dataset<float>(lg.get(), "k_transform_inverse", {kv, d, d}, l.k_transform_inverse);
        w.dataset<float>(lg.get(), "k_mean", {kv, d}, l.k_mean);
      }
      if (!l.v_transform.empty()) {
        w.dataset<float>(lg.get(), "v_transform", {kv, d, d}, l.v_transform);
        w.dataset<float>(lg.get(), "v_transform_inverse", {kv, d, d}, l.v_transform_inverse);
      }
    }
  }
  {
    Handle g = w.group(file, "error_report");
    const auto& e = b.errors;
    w.string_array_attr(g.get(), "rows", e.rows);
    w.scalar_attr(g.get(), "num_layers", e.num_layers);
    const std::vector<hsize_t> dims = {e.rows.size(), static_cast<hsize_t>(e.num_layers)};
    w.dataset<double>(g.get(), "k_relative_error", dims, e.k_relative_error);
    w.dataset<double>(g.get(), "v_relative_error", dims, e.v_relative_error);
  }
}

// ----------------------------------------------------------------------------------------------- reading

class Reader {
 public:
  // file_size bounds what a dataset may declare (bundles are uncompressed); the default disables the bound.
  explicit Reader(std::string file, uintmax_t file_size = UINTMAX_MAX)
      : file_(std::move(file)), file_size_(file_size) {}

  [[noreturn]] void fail(const std::string& object, const std::string& what) const {
    throw Error(object.empty() ? file_ : file_ + ":" + object, what);
  }

  Handle group(hid_t parent, const std::string& path, const std::string& name) const {
    if (H5Lexists(parent, name.c_str(), H5P_DEFAULT) <= 0) fail(path, "group " + name + " is missing");
    hid_t id = H5Gopen2(parent, name.c_str(), H5P_DEFAULT);
    if (id < 0) fail(path + "/" + name, "cannot open group");
    return Handle(id, H5Gclose);
  }

  Handle attr(hid_t obj, const std::string& path, const std::string& name) const {
    if (H5Aexists(obj, name.c_str()) <= 0) fail(path, "attribute " + name + " is missing");
    hid_t id = H5Aopen(obj, name.c_str(), H5P_DEFAULT);
    if (id < 0) fail(path, "cannot open attribute " + name);
    return Handle(id, H5Aclose);
  }

  std::vector<std::string> string_array_attr(hid_t obj, const std::string& path, const std::string& name) const {
    Handle a = attr(obj, path, name);
    Handle type = Handle(H5Aget_type(a.get()), H5Tclose);
    if (!type.valid() || H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) > 0)
      fail(path, "attribute " + name + " is not a fixed-length string");
    const size_t width = H5Tget_size(type.get());
    Handle space(H5Aget_space(a.get()), H5Sclose);
    const hssize_t n = H5Sget_simple_extent_npoints(space.get());
    if (n < 0 || width == 0) fail(path, "attribute " + name + " has an invalid shape");
    // The element count and width come from the file: a forged header asked for a 1 GiB buffer (fuzz_bundle,
    // fuzz/regressions/bundle/). Our string attributes are paths, names and options: kilobytes.
    constexpr size_t kMaxStringAttrBytes = size_t{16} << 20;
    if (width > kMaxStringAttrBytes || static_cast<size_t>(n) > kMaxStringAttrBytes / width)
      fail(path, ::fmt::format("attribute {} is implausibly large ({} strings of {} bytes)", name, n, width));
    std::vector<char> buf(std::max<size_t>(1, static_cast<size_t>(n)) * width, '\0');
    Handle mem = Handle(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), width);
    H5Tset_strpad(mem.get(), H5T_STR_NULLPAD);
    if (n > 0 && H5Aread(a.get(), mem.get(), buf.data()) < 0) fail(path, "cannot read attribute " + name);
    std::vector<std::string> out;
    for (hssize_t i = 0; i < n; ++i) {
      const char* s = buf.data() + i * width;
      out.emplace_back(s, strnlen(s, width));
    }
    return out;
  }

  std::string string_attr(hid_t obj, const std::string& path, const std::string& name) const {
    auto v = string_array_attr(obj, path, name);
    if (v.size() != 1) fail(path, "attribute " + name + " is not a single string");
    return v[0];
  }

  template <typename T>
  T scalar_attr(hid_t obj, const std::string& path, const std::string& name) const {
    hid_t mem_type;
    if constexpr (std::is_same_v<T, int64_t>) mem_type = H5T_NATIVE_INT64;
    else if constexpr (std::is_same_v<T, uint64_t>) mem_type = H5T_NATIVE_UINT64;
    else if constexpr (std::is_same_v<T, int32_t>) mem_type = H5T_NATIVE_INT32;
    else if constexpr (std::is_same_v<T, double>) mem_type = H5T_NATIVE_DOUBLE;
    else mem_type = H5T_NATIVE_FLOAT;
    Handle a = attr(obj, path, name);
    Handle space(H5Aget_space(a.get()), H5Sclose);
    if (H5Sget_simple_extent_npoints(space.get()) != 1) fail(path, "attribute " + name + " is not a scalar");
    T value{};
    if (H5Aread(a.get(), mem_type, &value) < 0) fail(path, "cannot read attribute " + name);
    return value;
  }

  // Reads a dataset, checks its shape and its sha256 attribute.
  template <typename T>
  std::vector<T> dataset(hid_t parent, const std::string& path, const std::string& name,
                         const std::vector<hsize_t>& expected_dims) const {
    const std::string obj = path + "/" + name;
    if (H5Lexists(parent, name.c_str(), H5P_DEFAULT) <= 0) fail(path, "dataset " + name + " is missing");
    Handle ds(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!ds.valid()) fail(obj, "cannot open dataset");
    Handle space(H5Dget_space(ds.get()), H5Sclose);
    const int rank = H5Sget_simple_extent_ndims(space.get());
    std::vector<hsize_t> dims(std::max(rank, 0));
    if (rank < 0 || H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0) fail(obj, "unreadable shape");
    if (dims != expected_dims) fail(obj, ::fmt::format("shape [{}] but expected [{}]", ::fmt::join(dims, ", "),
                                                       ::fmt::join(expected_dims, ", ")));
    // Shapes come from the file: a forged one asked for a 48 GB buffer before any check (fuzz_bundle,
    // fuzz/regressions/bundle/). Uncompressed data cannot be larger than the file holding it.
    hsize_t n = 1;
    for (hsize_t d : dims) {
      if (d != 0 && n > file_size_ / sizeof(T) / d)
        fail(obj, ::fmt::format("shape [{}] declares more elements than the file can hold", ::fmt::join(dims, ", ")));
      n *= d;
    }
    std::vector<T> data(n);
    if (n > 0 && H5Dread(ds.get(), dataset_type<T>().mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) < 0)
      fail(obj, "cannot read dataset (file truncated or corrupt)");
    const std::string stored = string_attr(ds.get(), obj, "sha256");
    if (stored != sha256_hex(std::as_bytes(std::span<const T>(data))))
      fail(obj, "checksum mismatch: the dataset's bytes do not match its sha256 attribute (corrupt file)");
    return data;
  }

 private:
  std::string file_;
  uintmax_t file_size_ = UINTMAX_MAX;
};

TensorQuantSpec read_tensor_spec(const Reader& r, hid_t quant, const std::string& name) {
  const std::string path = "/quant/" + name;
  Handle g = r.group(quant, "/quant", name);
  TensorQuantSpec t;
  t.storage = parse_kv_storage(r.string_attr(g.get(), path, "storage"), path);
  t.clip_ratio = r.scalar_attr<float>(g.get(), path, "clip_ratio");
  // The segment count is whatever was written; read the shape first.
  Handle ds(H5Dopen2(g.get(), "segments", H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) r.fail(path, "dataset segments is missing");
  Handle space(H5Dget_space(ds.get()), H5Sclose);
  hsize_t dims[2] = {0, 0};
  if (H5Sget_simple_extent_ndims(space.get()) != 2 || H5Sget_simple_extent_dims(space.get(), dims, nullptr) < 0 ||
      dims[1] != 3)
    r.fail(path + "/segments", "expected shape [n, 3]");
  auto seg = r.dataset<int32_t>(g.get(), path, "segments", {dims[0], 3});
  for (hsize_t i = 0; i < dims[0]; ++i) t.segments.push_back({seg[3 * i], seg[3 * i + 1], seg[3 * i + 2]});
  return t;
}

Bundle read_all(const Reader& r, hid_t file) {
  Bundle b;
  b.format_major = r.scalar_attr<int32_t>(file, "/", "format_major");
  b.format_minor = r.scalar_attr<int32_t>(file, "/", "format_minor");
  if (b.format_major > kBundleFormatMajor)
    r.fail("", ::fmt::format("bundle format {}.{} is newer than this oscar reads ({}.x); upgrade oscar or recalibrate",
                             b.format_major, b.format_minor, kBundleFormatMajor));
  if (b.format_major < 1) r.fail("", ::fmt::format("invalid bundle format major version {}", b.format_major));
  b.producer = r.string_attr(file, "/", "producer");
  if (H5Aexists(file, "ef_clip_feedback") > 0) {
    const int32_t cf = r.scalar_attr<int32_t>(file, "/", "ef_clip_feedback");
    if (cf != 0 && cf != 1) r.fail("", ::fmt::format("attribute ef_clip_feedback is {} (must be 0 or 1)", cf));
    b.ef_clip_feedback = cf == 1;
  }
  if (H5Aexists(file, "ef_damp") > 0) b.ef_damp = r.scalar_attr<double>(file, "/", "ef_damp");
  if (H5Aexists(file, "ef_metric_positions") > 0)
    b.ef_metric_positions = r.scalar_attr<int64_t>(file, "/", "ef_metric_positions");
  if (H5Aexists(file, "ef_key_context") > 0) b.ef_key_context = r.scalar_attr<int64_t>(file, "/", "ef_key_context");

  {
    Handle g = r.group(file, "/", "model");
    const std::string p = "/model";
    auto& m = b.model;
    m.architecture = r.string_attr(g.get(), p, "architecture");
    m.num_layers = r.scalar_attr<int64_t>(g.get(), p, "num_layers");
    m.num_heads = r.scalar_attr<int64_t>(g.get(), p, "num_heads");
    m.num_kv_heads = r.scalar_attr<int64_t>(g.get(), p, "num_kv_heads");
    m.head_dim = r.scalar_attr<int64_t>(g.get(), p, "head_dim");
    m.hidden_size = r.scalar_attr<int64_t>(g.get(), p, "hidden_size");
    m.vocab_size = r.scalar_attr<int64_t>(g.get(), p, "vocab_size");
    m.config_sha256 = r.string_attr(g.get(), p, "config_sha256");
    m.attention_sha256 = r.string_attr(g.get(), p, "attention_sha256");
  }
  {
    Handle g = r.group(file, "/", "calibration");
    const std::string p = "/calibration";
    auto& c = b.calibration;
    auto paths = r.string_array_attr(g.get(), p, "data_file_paths");
    auto sums = r.string_array_attr(g.get(), p, "data_file_sha256");
    if (paths.size() != sums.size()) r.fail(p, "data_file_paths and data_file_sha256 differ in length");
    for (size_t i = 0; i < paths.size(); ++i) c.data_files.push_back({paths[i], sums[i]});
    c.num_sequences = r.scalar_attr<int64_t>(g.get(), p, "num_sequences");
    c.num_tokens = r.scalar_attr<int64_t>(g.get(), p, "num_tokens");
    c.seq_len = r.scalar_attr<int64_t>(g.get(), p, "seq_len");
    c.num_heldout_sequences = r.scalar_attr<int64_t>(g.get(), p, "num_heldout_sequences");
    c.seed = r.scalar_attr<uint64_t>(g.get(), p, "seed");
    auto keys = r.string_array_attr(g.get(), p, "option_keys");
    auto values = r.string_array_attr(g.get(), p, "option_values");
    if (keys.size() != values.size()) r.fail(p, "option_keys and option_values differ in length");
    for (size_t i = 0; i < keys.size(); ++i) c.options.emplace_back(keys[i], values[i]);
  }
  {
    Handle g = r.group(file, "/", "quant");
    const std::string p = "/quant";
    b.quant.head_dim = r.scalar_attr<int64_t>(g.get(), p, "head_dim");
    b.quant.sink_tokens = r.scalar_attr<int64_t>(g.get(), p, "sink_tokens");
    b.quant.recent_tokens = r.scalar_attr<int64_t>(g.get(), p, "recent_tokens");
    b.quant.k = read_tensor_spec(r, g.get(), "k");
    b.quant.v = read_tensor_spec(r, g.get(), "v");
  }
  {
    Handle g = r.group(file, "/", "layers");
    const std::string p = "/layers";
    const int64_t num_layers = r.scalar_attr<int64_t>(g.get(), p, "num_layers");
    b.rotation_groups = r.scalar_attr<int64_t>(g.get(), p, "rotation_groups");
    b.rotation_composition = r.string_attr(g.get(), p, "rotation_composition");
    if (num_layers < 0 || num_layers > 100000) r.fail(p, ::fmt::format("implausible num_layers {}", num_layers));
    if (b.rotation_groups < 1 || b.rotation_groups > 4096)
      r.fail(p, ::fmt::format("implausible rotation_groups {}", b.rotation_groups));
    if (b.quant.head_dim < 1 || b.quant.head_dim > 4096)
      r.fail("/quant", ::fmt::format("implausible head_dim {}", b.quant.head_dim));
    const hsize_t groups = static_cast<hsize_t>(b.rotation_groups);
    const hsize_t d = static_cast<hsize_t>(b.quant.head_dim);
    for (int64_t i = 0; i < num_layers; ++i) {
      const std::string name = layer_group_name(static_cast<size_t>(i));
      const std::string lp = p + "/" + name;
      Handle lg = r.group(g.get(), p, name);
      LayerCalibration l;
      l.k_rotation = r.dataset<float>(lg.get(), lp, "k_rotation", {groups, d, d});
      l.v_rotation = r.dataset<float>(lg.get(), lp, "v_rotation", {groups, d, d});
      l.k_eigenvalues = r.dataset<double>(lg.get(), lp, "k_eigenvalues", {groups, d});
      l.v_eigenvalues = r.dataset<double>(lg.get(), lp, "v_eigenvalues", {groups, d});
      auto clips = r.dataset<float>(lg.get(), lp, "clip_ratios", {2});
      l.k_clip_ratio = clips[0];
      l.v_clip_ratio = clips[1];
      // 1.1 objects; absent in 1.0 files and in layers that use the global layout.
      for (const auto& [name, segs] : {std::pair{"k_segments", &l.k_segments}, std::pair{"v_segments", &l.v_segments}}) {
        if (H5Lexists(lg.get(), name, H5P_DEFAULT) <= 0) continue;
        Handle ds(H5Dopen2(lg.get(), name, H5P_DEFAULT), H5Dclose);
        if (!ds.valid()) r.fail(lp + "/" + name, "cannot open dataset");
        Handle space(H5Dget_space(ds.get()), H5Sclose);
        hsize_t dims[2] = {0, 0};
        if (H5Sget_simple_extent_ndims(space.get()) != 2 ||
            H5Sget_simple_extent_dims(space.get(), dims, nullptr) < 0 || dims[1] != 3 || dims[0] > 4096)
          r.fail(lp + "/" + name, "expected shape [n, 3]");
        auto flat = r.dataset<int32_t>(lg.get(), lp, name, {dims[0], 3});
        for (hsize_t k = 0; k < dims[0]; ++k) segs->push_back({flat[3 * k], flat[3 * k + 1], flat[3 * k + 2]});
      }
      // 1.2 objects: a table is its order and its weights; one without the other is damage.
      if (b.model.num_kv_heads < 1 || b.model.num_kv_heads > 4096)
        r.fail("/model", ::fmt::format("implausible num_kv_heads {}", b.model.num_kv_heads));
      const hsize_t kv = static_cast<hsize_t>(b.model.num_kv_heads);
      for (const auto& [order_name, weights_name, order, weights] :
           {std::tuple{"k_ef_order", "k_ef_weights", &l.k_ef_order, &l.k_ef_weights},
            std::tuple{"v_ef_order", "v_ef_weights", &l.v_ef_order, &l.v_ef_weights}}) {
        const bool has_order = H5Lexists(lg.get(), order_name, H5P_DEFAULT) > 0;
        const bool has_weights = H5Lexists(lg.get(), weights_name, H5P_DEFAULT) > 0;
        if (!has_order && !has_weights) continue;
        if (!has_order || !has_weights)
          r.fail(lp + "/" + (has_order ? order_name : weights_name),
                 ::fmt::format("error-feedback table without its {}", has_order ? weights_name : order_name));
        *order = r.dataset<int32_t>(lg.get(), lp, order_name, {kv, d});
        *weights = r.dataset<float>(lg.get(), lp, weights_name, {kv, d, d});
      }
      if (H5Lexists(lg.get(), "k_ef_metric", H5P_DEFAULT) > 0)
        l.k_ef_metric = r.dataset<double>(lg.get(), lp, "k_ef_metric", {kv, d, d});
      // 2.0 objects. In a 1.x file they are damage (or a forgery): a 1.x reader would ignore them and quantize with
      // the rotation alone, so they may only appear under the major that says they must be used.
      for (const char* name : {"k_transform", "k_transform_inverse", "k_mean", "v_transform", "v_transform_inverse"}) {
        if (H5Lexists(lg.get(), name, H5P_DEFAULT) <= 0) continue;
        if (b.format_major < 2)
          r.fail(lp + "/" + name, ::fmt::format("a storage transform (format 2.0) in a format {}.{} file",
                                                b.format_major, b.format_minor));
        const std::string n = name;
        std::vector<float>* dst = n == "k_transform"           ? &l.k_transform
                                  : n == "k_transform_inverse" ? &l.k_transform_inverse
                                  : n == "k_mean"              ? &l.k_mean
                                  : n == "v_transform"         ? &l.v_transform
                                                               : &l.v_transform_inverse;
        *dst = n == "k_mean" ? r.dataset<float>(lg.get(), lp, name, {kv, d})
                             : r.dataset<float>(lg.get(), lp, name, {kv, d, d});
      }
      b.layers.push_back(std::move(l));
    }
  }
  {
    Handle g = r.group(file, "/", "error_report");
    const std::string p = "/error_report";
    auto& e = b.errors;
    e.rows = r.string_array_attr(g.get(), p, "rows");
    e.num_layers = r.scalar_attr<int64_t>(g.get(), p, "num_layers");
    if (e.num_layers < 0 || e.num_layers > 100000) r.fail(p, ::fmt::format("implausible num_layers {}", e.num_layers));
    const std::vector<hsize_t> dims = {e.rows.size(), static_cast<hsize_t>(e.num_layers)};
    e.k_relative_error = r.dataset<double>(g.get(), p, "k_relative_error", dims);
    e.v_relative_error = r.dataset<double>(g.get(), p, "v_relative_error", dims);
  }
  return b;
}

template <typename T>
bool all_finite(const std::vector<T>& v) {
  return std::all_of(v.begin(), v.end(), [](T x) { return std::isfinite(x); });
}

// max |M·N − I| over the entries of d x d row-major fp32 matrices, in fp64; N given transposed when n_transposed
// (N = Rᵀ for an orthogonality check reads R's rows).
double identity_deviation(const float* m, const float* n, int64_t d, bool n_transposed) {
  double worst = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < d; ++k)
        dot += static_cast<double>(m[i * d + k]) * (n_transposed ? n[j * d + k] : n[k * d + j]);
      worst = std::max(worst, std::abs(dot - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

// fp32 rotations built from fp64 orthogonal matrices are orthogonal to ~1e-7; 1e-4 catches any real damage.
void check_orthogonal(const std::vector<float>& r, int64_t groups, int64_t d, const std::string& where) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* m = r.data() + g * d * d;
    const double worst = identity_deviation(m, m, d, true);
    if (worst > 1e-4) throw Error(where, ::fmt::format("group {} is not orthogonal (max |R·Rᵀ − I| = {:.3g})", g, worst));
  }
}

// A storage transform (2.0): A and A⁻¹ [kv_heads, d, d] (and μ [kv_heads, d] for keys) all present or all absent,
// finite, and A·A⁻¹ = I per head. fp32 copies of fp64 factors with the condition numbers partial whitening gives
// (α ≤ 1 on a floored covariance) multiply to I within ~1e-5; 1e-3 catches a damaged or mismatched inverse.
void check_transform(const std::vector<float>& a, const std::vector<float>& a_inv, const std::vector<float>* mean,
                     int64_t kv_heads, int64_t d, const std::string& where) {
  const bool any = !a.empty() || !a_inv.empty() || (mean && !mean->empty());
  if (!any) return;
  if (a.empty() || a_inv.empty() || (mean && mean->empty()))
    throw Error(where, mean ? "a key transform needs k_transform, k_transform_inverse and k_mean together"
                            : "a value transform needs v_transform and v_transform_inverse together");
  const size_t dd = static_cast<size_t>(kv_heads * d * d);
  if (a.size() != dd || a_inv.size() != dd)
    throw Error(where, ::fmt::format("transform and inverse must hold [{}, {}, {}] values, have {} and {}", kv_heads, d,
                                     d, a.size(), a_inv.size()));
  if (mean && static_cast<int64_t>(mean->size()) != kv_heads * d)
    throw Error(where, ::fmt::format("k_mean must hold [{}, {}] values, has {}", kv_heads, d, mean->size()));
  if (!all_finite(a) || !all_finite(a_inv) || (mean && !all_finite(*mean)))
    throw Error(where, "non-finite transform, inverse or mean");
  for (int64_t h = 0; h < kv_heads; ++h) {
    const double worst = identity_deviation(a.data() + h * d * d, a_inv.data() + h * d * d, d, false);
    if (worst > 1e-3)
      throw Error(where, ::fmt::format("KV head {}: the stored inverse is not the transform's inverse "
                                       "(max |A·A⁻¹ − I| = {:.3g})", h, worst));
  }
}

// A stored key metric: beside a key table only, [kv_heads, d, d], finite, symmetric (it is a second moment; the
// tables are rebuilt from it, so a damaged one must not be factorized silently).
void check_key_metric(const std::vector<double>& metric, bool has_table, int64_t kv_heads, int64_t d,
                      const std::string& where) {
  if (metric.empty()) return;
  if (!has_table) throw Error(where, "a key metric without a key table");
  if (static_cast<int64_t>(metric.size()) != kv_heads * d * d)
    throw Error(where, ::fmt::format("must hold [{}, {}, {}] values, has {}", kv_heads, d, d, metric.size()));
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        const double a = metric[static_cast<size_t>((h * d + i) * d + j)];
        const double b = metric[static_cast<size_t>((h * d + j) * d + i)];
        if (!std::isfinite(a) || !std::isfinite(b))
          throw Error(where, ::fmt::format("KV head {}: non-finite value at [{}, {}]", h, i, j));
        if (a != b) throw Error(where, ::fmt::format("KV head {}: not symmetric at [{}, {}] ({} vs {})", h, i, j, a, b));
      }
}

// A 1.2 table (lib/calib/error_feedback.h's stored form) must be exactly what the writers can run: a permutation per
// KV head, finite weights that only feed later steps, and a tensor stored as one whole-head INT2 segment (the
// rounding reads one (scale, zero) per token; segmented layouts keep round-to-nearest).
void check_error_feedback(const std::vector<int32_t>& order, const std::vector<float>& weights,
                          const TensorQuantSpec& spec, int64_t kv_heads, int64_t d, const std::string& order_where,
                          const std::string& weights_where) {
  if (order.empty() && weights.empty()) return;
  if (order.empty() || weights.empty())
    throw Error(order.empty() ? order_where : weights_where,
                order.empty() ? "error-feedback weights without an order" : "error-feedback order without weights");
  if (static_cast<int64_t>(order.size()) != kv_heads * d)
    throw Error(order_where, ::fmt::format("must hold [{}, {}] values, has {}", kv_heads, d, order.size()));
  if (static_cast<int64_t>(weights.size()) != kv_heads * d * d)
    throw Error(weights_where, ::fmt::format("must hold [{}, {}, {}] values, has {}", kv_heads, d, d, weights.size()));
  if (!spec.whole_head_int2(d))
    throw Error(order_where, "error-feedback tables need a whole-head INT2 tensor (one segment [0, head_dim) of 2 bits)");
  for (int64_t h = 0; h < kv_heads; ++h) {
    std::vector<char> seen(static_cast<size_t>(d), 0);
    for (int64_t k = 0; k < d; ++k) {
      const int32_t i = order[static_cast<size_t>(h * d + k)];
      if (i < 0 || i >= d || seen[static_cast<size_t>(i)])
        throw Error(order_where, ::fmt::format("KV head {}: not a permutation of 0..{} (entry {} is {})", h, d - 1, k, i));
      seen[static_cast<size_t>(i)] = 1;
    }
    for (int64_t k = 0; k < d; ++k)
      for (int64_t m = 0; m < d; ++m) {
        const float x = weights[static_cast<size_t>((h * d + k) * d + m)];
        if (!std::isfinite(x))
          throw Error(weights_where, ::fmt::format("KV head {}: non-finite weight at [{}, {}]", h, k, m));
        if (m <= k && x != 0.0f)
          throw Error(weights_where,
                      ::fmt::format("KV head {}: not strictly upper triangular ([{}, {}] = {})", h, k, m, x));
      }
  }
}

}  // namespace

bool has_error_feedback(const Bundle& bundle) {
  for (const auto& l : bundle.layers)
    if (!l.k_ef_order.empty() || !l.v_ef_order.empty() || !l.k_ef_weights.empty() || !l.v_ef_weights.empty())
      return true;
  return false;
}

bool has_key_metric(const Bundle& bundle) {
  for (const auto& l : bundle.layers)
    if (!l.k_ef_metric.empty()) return true;
  return false;
}

bool has_storage_transform(const Bundle& bundle) {
  for (const auto& l : bundle.layers)
    if (!l.k_transform.empty() || !l.v_transform.empty() || !l.k_transform_inverse.empty() ||
        !l.v_transform_inverse.empty() || !l.k_mean.empty())
      return true;
  return false;
}

int32_t required_format_major(const Bundle& bundle) { return has_storage_transform(bundle) ? 2 : 1; }

int32_t required_format_minor(const Bundle& bundle) {
  if (has_storage_transform(bundle)) return 0;
  return has_key_metric(bundle) ? 3 : has_error_feedback(bundle) ? 2 : 1;
}

std::string_view kv_storage_name(KvStorage s) {
  switch (s) {
    case KvStorage::BF16: return "bf16";
    case KvStorage::Int: return "int";
    case KvStorage::Fp8E4M3: return "fp8_e4m3";
  }
  return "unknown";
}

KvStorage parse_kv_storage(std::string_view name, const std::string& where) {
  if (name == "bf16") return KvStorage::BF16;
  if (name == "int") return KvStorage::Int;
  if (name == "fp8_e4m3") return KvStorage::Fp8E4M3;
  throw Error(where, "unknown KV storage \"" + std::string(name) + "\" (bf16, int, fp8_e4m3)");
}

KvQuantSpec layer_spec(const Bundle& bundle, size_t layer) {
  KvQuantSpec spec = bundle.quant;
  if (layer >= bundle.layers.size())
    throw Error("layer_spec", ::fmt::format("layer {} of a bundle with {} layers", layer, bundle.layers.size()));
  const auto& l = bundle.layers[layer];
  if (!l.k_segments.empty()) spec.k.segments = l.k_segments;
  if (!l.v_segments.empty()) spec.v.segments = l.v_segments;
  spec.k.clip_ratio = l.k_clip_ratio;
  spec.v.clip_ratio = l.v_clip_ratio;
  return spec;
}

void validate_bundle(const Bundle& b, const std::string& where) {
  if (b.format_major < 1 || b.format_major > kBundleFormatMajor)
    throw Error(where, ::fmt::format("format major {} is not 1..{}", b.format_major, kBundleFormatMajor));
  const auto& m = b.model;
  if (m.num_layers <= 0 || m.num_heads <= 0 || m.num_kv_heads <= 0 || m.head_dim <= 0 ||
      m.num_heads % m.num_kv_heads != 0)
    throw Error(where + ":/model", ::fmt::format("inconsistent shapes: layers {}, heads {}, kv heads {}, head_dim {}",
                                                 m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim));
  b.quant.validate(where + ":/quant");
  if (b.quant.head_dim != m.head_dim)
    throw Error(where + ":/quant", ::fmt::format("head_dim {} but the model's is {}", b.quant.head_dim, m.head_dim));
  if (b.rotation_groups != 1 && b.rotation_groups != m.num_kv_heads)
    throw Error(where + ":/layers",
                ::fmt::format("rotation_groups {} is neither 1 nor num_kv_heads {}", b.rotation_groups, m.num_kv_heads));
  if (static_cast<int64_t>(b.layers.size()) != m.num_layers)
    throw Error(where + ":/layers", ::fmt::format("{} layers but the model has {}", b.layers.size(), m.num_layers));
  const int64_t g = b.rotation_groups, d = m.head_dim;
  for (size_t i = 0; i < b.layers.size(); ++i) {
    const auto& l = b.layers[i];
    const std::string lw = where + ":/layers/" + layer_group_name(i);
    if (static_cast<int64_t>(l.k_rotation.size()) != g * d * d || static_cast<int64_t>(l.v_rotation.size()) != g * d * d)
      throw Error(lw, ::fmt::format("rotations must hold [{}, {}, {}] values", g, d, d));
    if (static_cast<int64_t>(l.k_eigenvalues.size()) != g * d || static_cast<int64_t>(l.v_eigenvalues.size()) != g * d)
      throw Error(lw, ::fmt::format("eigenvalues must hold [{}, {}] values", g, d));
    if (!all_finite(l.k_rotation) || !all_finite(l.v_rotation) || !all_finite(l.k_eigenvalues) ||
        !all_finite(l.v_eigenvalues))
      throw Error(lw, "non-finite rotation or eigenvalue");
    if (!(l.k_clip_ratio > 0.0f && l.k_clip_ratio <= 1.0f) || !(l.v_clip_ratio > 0.0f && l.v_clip_ratio <= 1.0f))
      throw Error(lw, ::fmt::format("clip ratios {} / {} outside (0, 1]", l.k_clip_ratio, l.v_clip_ratio));
    if (!l.k_segments.empty() || !l.v_segments.empty()) layer_spec(b, i).validate(lw + " (segments)");
    check_orthogonal(l.k_rotation, g, d, lw + "/k_rotation");
    check_orthogonal(l.v_rotation, g, d, lw + "/v_rotation");
    const KvQuantSpec spec = layer_spec(b, i);
    check_error_feedback(l.k_ef_order, l.k_ef_weights, spec.k, m.num_kv_heads, d, lw + "/k_ef_order",
                         lw + "/k_ef_weights");
    check_error_feedback(l.v_ef_order, l.v_ef_weights, spec.v, m.num_kv_heads, d, lw + "/v_ef_order",
                         lw + "/v_ef_weights");
    check_key_metric(l.k_ef_metric, !l.k_ef_order.empty(), m.num_kv_heads, d, lw + "/k_ef_metric");
    check_transform(l.k_transform, l.k_transform_inverse, &l.k_mean, m.num_kv_heads, d, lw + "/k_transform");
    check_transform(l.v_transform, l.v_transform_inverse, nullptr, m.num_kv_heads, d, lw + "/v_transform");
    if ((!l.k_transform.empty() && !spec.k.whole_head_int2(d)) || (!l.v_transform.empty() && !spec.v.whole_head_int2(d)))
      throw Error(lw + (l.k_transform.empty() ? "/v_transform" : "/k_transform"),
                  "storage transforms need a whole-head INT2 tensor (one segment [0, head_dim) of 2 bits)");
  }
  if (has_key_metric(b)) {
    if (!(b.ef_damp >= 0 && std::isfinite(b.ef_damp)))
      throw Error(where + ":/", ::fmt::format("ef_damp {} is not a finite damping >= 0", b.ef_damp));
    if (b.ef_metric_positions <= 0 || b.ef_key_context <= 0)
      throw Error(where + ":/", ::fmt::format("ef_metric_positions {} and ef_key_context {} must be positive",
                                              b.ef_metric_positions, b.ef_key_context));
  }
  const auto& e = b.errors;
  const size_t cells = e.rows.size() * static_cast<size_t>(std::max<int64_t>(e.num_layers, 0));
  if (e.num_layers < 0 || e.k_relative_error.size() != cells || e.v_relative_error.size() != cells)
    throw Error(where + ":/error_report", ::fmt::format("tables must hold [{}, {}] values", e.rows.size(), e.num_layers));
  if (!all_finite(e.k_relative_error) || !all_finite(e.v_relative_error))
    throw Error(where + ":/error_report", "non-finite relative error");
}

void write_bundle(const fs::path& path, const Bundle& bundle) {
  const std::string where = path.string();
  validate_bundle(bundle, where);
  silence_hdf5();
  AtomicFile out(path);
  {
    Writer w(where);
    Handle file = w.create_file(out.temp_path());
    write_all(w, file.get(), bundle);
    check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), where, "H5Fflush failed");
    if (file.close() < 0) throw Error(where, "closing the HDF5 file failed");
  }
  out.commit();
}

Bundle read_bundle(const fs::path& path) {
  const std::string where = path.string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error(where, "no such bundle file");
  silence_hdf5();
  if (H5Fis_hdf5(path.c_str()) <= 0) throw Error(where, "not an HDF5 bundle (bad signature, truncated or corrupt)");
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) throw Error(where, "cannot open as HDF5 (truncated or corrupt file)");
  Reader r(where, fs::file_size(path, ec));
  Bundle b = read_all(r, file.get());
  validate_bundle(b, where);
  return b;
}

namespace {

DatasetChecksum checksum_dataset(hid_t obj, std::string object, uintmax_t file_size) {
  DatasetChecksum c;
  c.object = std::move(object);
  Handle type(H5Dget_type(obj), H5Tclose);
  Handle native(type.valid() ? H5Tget_native_type(type.get(), H5T_DIR_ASCEND) : H5I_INVALID_HID, H5Tclose);
  Handle space(H5Dget_space(obj), H5Sclose);
  const hssize_t n = space.valid() ? H5Sget_simple_extent_npoints(space.get()) : -1;
  const size_t element = native.valid() ? H5Tget_size(native.get()) : 0;
  // Bundles are uncompressed, so a dataset larger than the file is a forged header, not data worth reading.
  if (n < 0 || element == 0) {
    c.problem = "unreadable type or shape";
  } else if (static_cast<uintmax_t>(n) > (file_size + 1) / element) {
    c.problem = ::fmt::format("declares {} elements, more than the file can hold", n);
  } else {
    std::vector<std::byte> bytes(static_cast<size_t>(n) * element);
    if (n > 0 && H5Dread(obj, native.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()) < 0)
      c.problem = "cannot read dataset (file truncated or corrupt)";
    else
      c.computed_sha256 = sha256_hex(bytes);
    try {
      c.stored_sha256 = Reader(c.object).string_attr(obj, c.object, "sha256");
    } catch (const Error& e) {
      if (c.problem.empty()) c.problem = e.detail();
    }
  }
  return c;
}

// Our own depth-first walk instead of H5Lvisit. libhdf5 1.10's H5Lvisit remembers only objects whose header counts
// more than one link, so a damaged group whose symbol-table message names an ancestor's B-tree (a link cycle through
// a group with link count 1; fuzz/regressions/bundle/h5lvisit_self_linked_group.oscar) is re-entered forever, each
// level re-resolving an ever longer path: no callback cap ends that soon enough. Here every level is ours: each
// group's links are listed by one H5Literate whose callback can stop it, and every group entered is remembered.
// The order and the visiting rule (a group reached again through a second counted link is not re-entered) are
// H5Lvisit's, so valid files list exactly the datasets they listed before.
class ChecksumWalk {
 public:
  ChecksumWalk(std::string where, uintmax_t file_size) : where_(std::move(where)), file_size_(file_size) {
    // A link costs at least a 16-byte record in the file (a symbol-table entry is 40, a link message 8 + name +
    // address), so a group index yielding more links than that is iterating damaged metadata.
    max_links_ = file_size_ / 16 + 16;
  }

  std::vector<DatasetChecksum> run(hid_t root) {
    H5O_info_t info;
    if (H5Oget_info2(root, &info, H5O_INFO_BASIC) < 0) fail("/", "cannot read the root group's header");
    entered_.emplace(info.addr, "/");
    walk_group(root, "", 0);
    return std::move(out_);
  }

 private:
  struct Listing {
    ChecksumWalk* walk;
    std::vector<std::string> links;  // hard links only, in name order
    bool overflow = false;
  };

  // Bundles nest three deep (/layers/NNNNN/k_rotation); anything near this is not a bundle.
  static constexpr int kMaxDepth = 32;

  [[noreturn]] void fail(const std::string& object, const std::string& what) const {
    throw Error(where_, ::fmt::format("cannot walk the HDF5 object tree at {}: {} (corrupt file)", object, what));
  }

  static herr_t list_link(hid_t, const char* name, const H5L_info_t* info, void* data) {
    auto& l = *static_cast<Listing*>(data);
    if (++l.walk->links_seen_ > l.walk->max_links_) {
      l.overflow = true;
      return 1;  // stops H5Literate even if a damaged B-tree would make it go round forever
    }
    if (info->type == H5L_TYPE_HARD) l.links.emplace_back(name);
    return 0;
  }

  void walk_group(hid_t group, const std::string& path, int depth) {
    const std::string shown = path.empty() ? "/" : path;
    if (depth > kMaxDepth) fail(shown, ::fmt::format("groups nested deeper than {}", kMaxDepth));
    Listing listing{this, {}, false};
    hsize_t idx = 0;
    const herr_t rc = H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, &idx, list_link, &listing);
    if (listing.overflow)
      fail(shown, ::fmt::format("the group indexes yield more than {} links, more than a file of {} bytes holds",
                                max_links_, file_size_));
    if (rc < 0) fail(shown, "cannot list the group's links");
    for (const auto& name : listing.links) {
      const std::string child = path + "/" + name;
      // One path component, resolved in this group: never an n-deep path resolution from the root.
      Handle obj(H5Oopen(group, name.c_str(), H5P_DEFAULT), H5Oclose);
      if (!obj.valid()) fail(child, "cannot open the object");
      const H5I_type_t kind = H5Iget_type(obj.get());
      if (kind == H5I_DATASET) out_.push_back(checksum_dataset(obj.get(), child, file_size_));
      if (kind != H5I_GROUP) continue;
      H5O_info_t info;
      if (H5Oget_info2(obj.get(), &info, H5O_INFO_BASIC) < 0) fail(child, "cannot read the group's header");
      const auto seen = entered_.find(info.addr);
      if (seen != entered_.end()) {
        // A group with two counted links is legal HDF5 and H5Lvisit lists it once; with a count of one, the second
        // way in is damage, and when it is an ancestor it is the cycle libhdf5 itself would follow forever.
        if (info.rc > 1) continue;
        const bool cycle = child.starts_with(seen->second == "/" ? "/" : seen->second + "/");
        fail(child, cycle ? ::fmt::format("it links back to its ancestor {} (a cycle in the group index)", seen->second)
                          : ::fmt::format("it is the group {} again, whose header counts one link", seen->second));
      }
      entered_.emplace(info.addr, child);
      walk_group(obj.get(), child, depth + 1);
    }
  }

  std::string where_;
  uintmax_t file_size_ = 0;
  uintmax_t max_links_ = 0;
  uintmax_t links_seen_ = 0;
  std::map<haddr_t, std::string> entered_;  // object address -> the path it was first entered by
  std::vector<DatasetChecksum> out_;
};

}  // namespace

std::vector<DatasetChecksum> bundle_checksums(const fs::path& path) {
  const std::string where = path.string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error(where, "no such bundle file");
  silence_hdf5();
  if (H5Fis_hdf5(path.c_str()) <= 0) throw Error(where, "not an HDF5 bundle (bad signature, truncated or corrupt)");
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) throw Error(where, "cannot open as HDF5 (truncated or corrupt file)");
  Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
  if (!root.valid())
    throw Error(where, "cannot walk the HDF5 object tree at /: cannot open the root group (corrupt file)");
  return ChecksumWalk(where, fs::file_size(path, ec)).run(root.get());
}

std::string sha256_tensors(const TensorStore& store, const std::vector<std::string>& names) {
  // One streaming digest would need OpenSSL here; hashing the per-tensor digests in order is just as binding
  // and keeps the only sha256 implementation in atomic_file.cpp.
  std::string manifest;
  for (const auto& name : names) {
    const TensorView& t = store.get(name);
    manifest += ::fmt::format("{}|{}|{}|{}\n", name, dtype_name(t.dtype), ::fmt::join(t.shape, ","),
                              sha256_hex(std::span<const std::byte>(t.data, t.nbytes)));
  }
  return sha256_hex(std::as_bytes(std::span<const char>(manifest.data(), manifest.size())));
}

}  // namespace oscar::fmt
