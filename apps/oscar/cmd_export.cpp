// oscar export: publishes a bundle for consumers that do not read HDF5 (docs/serving.md).
//   --format safetensors --out DIR              DIR/oscar_rotations.safetensors + DIR/manifest.json
//   --format safetensors --fold-v --model M --out DIR2
//                                               a copy of checkpoint M with R_v folded into v_proj / o_proj
//   --format safetensors --golden-kv DUMP --out DIR
//                                               also DIR/int2_golden.safetensors: the reference quantizer's records
//                                               for the first --golden-tokens tokens of an `oscar forward --dump`
//   --format sglang-oscar --out DIR             DIR/manifest.json + raw little-endian tensors, turned into the
//                                               serving .pt files by scripts/export/to_sglang_oscar.py
// Every file is written atomically, and manifest.json last: a directory with a manifest is a complete export.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "apps/oscar/bundle_tools.h"
#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/ef_calibration.h"
#include "lib/calib/error_feedback.h"
#include "lib/model/cpu_model.h"
#include "lib/calib/quantizer_ref.h"
#include "oscar_version.h"
#include "runtime/engine.h"

namespace oscar::app {
namespace {

namespace fs = std::filesystem;

struct ExportOptions {
  std::string bundle;
  std::string format;
  std::string out;
  std::string model_dir;
  bool fold_v = false;
  std::string golden_kv;
  int64_t golden_tokens = 64;
  int64_t ef_context = 0;  // > 0: the key tables rebuilt for positions 0..ef_context-1 (bundle 1.3)
};

nlohmann::json tensor_spec_json(const fmt::TensorQuantSpec& t) {
  nlohmann::json segs = nlohmann::json::array();
  for (const auto& s : t.segments) segs.push_back({{"begin", s.begin}, {"end", s.end}, {"bits", s.bits}});
  return {{"storage", std::string(fmt::kv_storage_name(t.storage))}, {"clip_ratio", t.clip_ratio}, {"segments", segs}};
}

nlohmann::json common_manifest(const fmt::Bundle& b, const std::string& bundle_path, const std::string& format) {
  const auto& m = b.model;
  nlohmann::json files = nlohmann::json::array();
  for (const auto& f : b.calibration.data_files) files.push_back({{"path", f.path}, {"sha256", f.sha256}});
  return {{"format", format},
          {"format_version", 1},
          {"producer", std::string("oscar ") + OSCAR_VERSION_STRING},
          {"command", command_line()},
          {"bundle", {{"path", bundle_path}, {"sha256", fmt::sha256_file(bundle_path)}, {"producer", b.producer}}},
          {"model",
           {{"architecture", m.architecture}, {"num_layers", m.num_layers}, {"num_heads", m.num_heads},
            {"num_kv_heads", m.num_kv_heads}, {"head_dim", m.head_dim}, {"hidden_size", m.hidden_size},
            {"vocab_size", m.vocab_size}, {"config_sha256", m.config_sha256},
            {"attention_sha256", m.attention_sha256}}},
          {"calibration",
           {{"data_files", files}, {"num_sequences", b.calibration.num_sequences},
            {"num_tokens", b.calibration.num_tokens}, {"seq_len", b.calibration.seq_len}}},
          {"quant",
           {{"head_dim", b.quant.head_dim}, {"sink_tokens", b.quant.sink_tokens},
            {"recent_tokens", b.quant.recent_tokens}, {"k", tensor_spec_json(b.quant.k)},
            {"v", tensor_spec_json(b.quant.v)}}},
          {"num_layers", b.layers.size()},
          {"head_dim", b.quant.head_dim},
          {"rotation_groups", b.rotation_groups},
          {"rotation_composition", b.rotation_composition},
          {"convention", "a head vector x (row) is stored as y = x . R; R row-major [head_dim, head_dim], orthogonal"}};
}

template <typename T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

// Reference vectors for a serving team's own implementation of the write/read path (scripts/serving_example.py
// checks itself against them): per layer and tensor, the first N tokens of a forward dump's post-RoPE K / V, the
// record calib::HeadQuantizer writes for each (codes then fp16 params, formats/kv_layout.h), and its decode in
// the rotated and the original basis. Every token is quantized here, sink/recent windows included: the windows
// are a cache policy (bf16 rows), not part of the record format. A tensor with error-feedback tables (format 1.2)
// gets the records the engine writes with them (calib::error_feedback_encode_record), not round-to-nearest ones.
nlohmann::json write_int2_golden(const fmt::Bundle& b, const ExportOptions& o, const fs::path& dir) {
  if (o.golden_tokens <= 0) throw Error("--golden-tokens", "must be positive");
  auto dump = fmt::SafetensorsFile::open(o.golden_kv);
  const int64_t L = static_cast<int64_t>(b.layers.size()), d = b.quant.head_dim;
  std::deque<std::vector<float>> floats;
  std::deque<std::vector<uint8_t>> records;
  std::vector<fmt::TensorToWrite> tensors;
  int64_t heads = 0, tokens = 0, ef_tensors = 0, transform_tensors = 0;
  for (int64_t l = 0; l < L; ++l) {
    const auto& layer = b.layers[static_cast<size_t>(l)];
    const fmt::KvQuantSpec spec = fmt::layer_spec(b, static_cast<size_t>(l));
    for (const char* kind : {"k", "v"}) {
      const bool is_k = kind[0] == 'k';
      const std::string name = ::fmt::format("layers.{}.{}", l, kind);
      const fmt::TensorView* t = dump->find(name);
      if (t == nullptr) throw Error(o.golden_kv + ":" + name, "tensor missing (expected an `oscar forward --dump`)");
      if (t->shape.size() != 3 || t->shape[2] != d || (b.rotation_groups > 1 && t->shape[0] != b.rotation_groups))
        throw Error(o.golden_kv + ":" + name,
                    ::fmt::format("shape [{}] does not match [kv_heads, T, {}] of the bundle",
                                  ::fmt::join(t->shape, ", "), d));
      heads = t->shape[0];
      tokens = std::min(o.golden_tokens, t->shape[1]);
      const std::vector<float> all = fmt::to_f32(*t);
      const fmt::TensorQuantSpec& ts = is_k ? spec.k : spec.v;
      const calib::HeadQuantizer q(ts, d, name);
      const float clip = is_k ? layer.k_clip_ratio : layer.v_clip_ratio;
      const std::vector<float>& rot_all = is_k ? layer.k_rotation : layer.v_rotation;
      const std::vector<int32_t>& ef_order = is_k ? layer.k_ef_order : layer.v_ef_order;
      const std::vector<float>& ef_weights = is_k ? layer.k_ef_weights : layer.v_ef_weights;
      if (!ef_order.empty() && heads != b.model.num_kv_heads)
        throw Error(o.golden_kv + ":" + name, ::fmt::format("{} KV heads, the bundle's tables have {}", heads,
                                                            b.model.num_kv_heads));
      ef_tensors += ef_order.empty() ? 0 : 1;
      auto& x = floats.emplace_back(static_cast<size_t>(heads * tokens * d));
      auto& deq = floats.emplace_back(x.size());
      auto& deq_rot = floats.emplace_back(x.size());
      auto& rec = records.emplace_back(static_cast<size_t>(heads * tokens * q.record_bytes()));
      const bool transformed = calib::has_transform(layer, is_k);
      if (transformed && heads != b.model.num_kv_heads)
        throw Error(o.golden_kv + ":" + name, ::fmt::format("{} KV heads, the bundle's transforms have {}", heads,
                                                            b.model.num_kv_heads));
      transform_tensors += transformed ? 1 : 0;
      std::vector<float> centered(static_cast<size_t>(d));
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t g = b.rotation_groups == 1 ? 0 : h;
        // Format 2.0: the record holds y = (x − μ)·A; the original-basis decode is ŷ·A⁻¹ + μ.
        const calib::HeadTransform tf =
            transformed ? calib::stored_transform(layer, is_k, h, d, name) : calib::HeadTransform{};
        const std::vector<float> a(tf.forward.begin(), tf.forward.end());
        const std::span<const float> rot = transformed ? std::span<const float>(a)
                                                       : std::span<const float>(rot_all.data() + g * d * d,
                                                                                static_cast<size_t>(d * d));
        for (int64_t i = 0; i < tokens; ++i) {
          const size_t row = static_cast<size_t>(h * tokens + i);
          const std::span<const float> src(all.data() + (h * t->shape[1] + i) * d, static_cast<size_t>(d));
          std::copy(src.begin(), src.end(), x.begin() + static_cast<std::ptrdiff_t>(row * d));
          for (int64_t c = 0; c < d; ++c) centered[c] = transformed ? src[c] - static_cast<float>(tf.mean[c]) : src[c];
          const std::span<uint8_t> r(rec.data() + row * q.record_bytes(), static_cast<size_t>(q.record_bytes()));
          if (ef_order.empty()) {
            q.encode(centered, rot, clip, r);
          } else {
            const calib::HeadTable ht = calib::head_table(ef_order, ef_weights, h, d);
            calib::error_feedback_encode_record(centered, rot, clip, 2, ht.order, ht.weights, b.ef_clip_feedback, r);
          }
          const std::span<float> out_rot(deq_rot.data() + row * d, static_cast<size_t>(d));
          const std::span<float> out(deq.data() + row * d, static_cast<size_t>(d));
          q.decode(r, rot, calib::Basis::Rotated, out_rot);
          if (!transformed) {
            q.decode(r, rot, calib::Basis::Original, out);
            continue;
          }
          for (int64_t c = 0; c < d; ++c) {
            double acc = tf.mean[c];
            for (int64_t k = 0; k < d; ++k) acc += static_cast<double>(out_rot[k]) * tf.inverse[k * d + c];
            out[c] = static_cast<float>(acc);
          }
        }
      }
      tensors.push_back(fmt::f32_tensor(name + ".x", {heads, tokens, d}, x));
      tensors.push_back({name + ".record", fmt::DType::U8, {heads, tokens, q.record_bytes()},
                         std::as_bytes(std::span<const uint8_t>(rec))});
      tensors.push_back(fmt::f32_tensor(name + ".dequant", {heads, tokens, d}, deq));
      tensors.push_back(fmt::f32_tensor(name + ".dequant_rotated", {heads, tokens, d}, deq_rot));
    }
  }
  const fs::path path = dir / "int2_golden.safetensors";
  fmt::write_safetensors(path, tensors,
                         {{"format", "oscar-int2-golden"},
                          {"source", o.golden_kv},
                          {"layout", "layers.L.{k,v}.x [kv_heads, T, d] f32 input (original basis); .record u8: "
                                     "codes (LSB-first bitstream per segment) then fp16 (scale, zero) per segment; "
                                     ".dequant / .dequant_rotated f32 decode in the original / rotated basis"},
                          {"error_feedback", "records of a tensor with layers.L.{k,v}_ef_order / _ef_weights are "
                                             "written with error-feedback rounding (docs/format.md), the others "
                                             "round to nearest"},
                          {"transform", "a tensor with layers.L.{k,v}_transform stores y = (x - mean)·A: "
                                        ".dequant_rotated is y's decode, .dequant = y·A^-1 + mean"}});
  return {{"file", path.filename().string()}, {"sha256", fmt::sha256_file(path)}, {"source", o.golden_kv},
          {"kv_heads", heads}, {"tokens", tokens}, {"error_feedback_tensors", ef_tensors},
          {"transform_tensors", transform_tensors}};
}

int export_safetensors(const fmt::Bundle& b, const ExportOptions& o) {
  const fs::path dir = o.out;
  ensure_output_dir(dir, "--out");
  const int64_t L = static_cast<int64_t>(b.layers.size()), g = b.rotation_groups, d = b.quant.head_dim;
  std::vector<fmt::TensorToWrite> tensors;
  std::deque<std::vector<int32_t>> owned_segments;  // stable addresses: tensors borrow these bytes
  nlohmann::json listing = nlohmann::json::array();
  auto add = [&](std::string name, fmt::DType dtype, std::vector<int64_t> shape, std::span<const std::byte> bytes,
                 const std::string& meaning) {
    listing.push_back({{"name", name}, {"dtype", std::string(fmt::dtype_name(dtype))}, {"shape", shape},
                       {"meaning", meaning}});
    tensors.push_back({std::move(name), dtype, std::move(shape), bytes});
  };
  for (int64_t l = 0; l < L; ++l) {
    const auto& layer = b.layers[static_cast<size_t>(l)];
    const std::string p = ::fmt::format("layers.{}.", l);
    add(p + "k_rotation", fmt::DType::F32, {g, d, d}, bytes_of(layer.k_rotation), "R_k per rotation group");
    add(p + "v_rotation", fmt::DType::F32, {g, d, d}, bytes_of(layer.v_rotation), "R_v per rotation group");
    add(p + "k_eigenvalues", fmt::DType::F64, {g, d}, bytes_of(layer.k_eigenvalues),
        "eigenvalues of Sigma_Q, descending");
    add(p + "v_eigenvalues", fmt::DType::F64, {g, d}, bytes_of(layer.v_eigenvalues),
        "eigenvalues of Sigma_V, descending");
    // Format 1.1: a layer's own segment layout overrides quant.{k,v}.segments.
    for (auto [name, segs] : {std::pair{"k_segments", &layer.k_segments}, std::pair{"v_segments", &layer.v_segments}}) {
      if (segs->empty()) continue;
      auto& flat = owned_segments.emplace_back();
      for (const auto& s : *segs) flat.insert(flat.end(), {s.begin, s.end, s.bits});
      add(p + name, fmt::DType::I32, {static_cast<int64_t>(segs->size()), 3}, bytes_of(flat),
          "this layer's own segments [begin, end, bits] (overrides quant.*.segments)");
    }
    // Format 1.2: error-feedback tables (docs/format.md has the rounding loop a writer must run with them).
    const int64_t kv = b.model.num_kv_heads;
    for (auto [name, order, weights] : {std::tuple{"k", &layer.k_ef_order, &layer.k_ef_weights},
                                        std::tuple{"v", &layer.v_ef_order, &layer.v_ef_weights}}) {
      if (order->empty()) continue;
      add(p + name + "_ef_order", fmt::DType::I32, {kv, d}, bytes_of(*order),
          "error-feedback rounding order per KV head (a permutation of 0..d-1)");
      add(p + name + "_ef_weights", fmt::DType::F32, {kv, d, d}, bytes_of(*weights),
          "error-feedback weights per KV head, strictly upper triangular");
    }
    // Format 2.0: storage transforms (docs/format.md: the writer stores y = (x − μ)·A, readers use A⁻¹).
    if (!layer.k_transform.empty()) {
      add(p + "k_transform", fmt::DType::F32, {kv, d, d}, bytes_of(layer.k_transform),
          "A_K per KV head: a key x is stored as y = (x - k_mean) A_K (replaces k_rotation)");
      add(p + "k_transform_inverse", fmt::DType::F32, {kv, d, d}, bytes_of(layer.k_transform_inverse),
          "A_K^-1 per KV head: q is read as q A_K^-T");
      add(p + "k_mean", fmt::DType::F32, {kv, d}, bytes_of(layer.k_mean),
          "mu_K per KV head, subtracted from every cached key (bf16 windows too, or add q.mu_K to INT2 logits)");
    }
    if (!layer.v_transform.empty()) {
      add(p + "v_transform", fmt::DType::F32, {kv, d, d}, bytes_of(layer.v_transform),
          "A_V per KV head: a value v is stored as y = v A_V (replaces v_rotation)");
      add(p + "v_transform_inverse", fmt::DType::F32, {kv, d, d}, bytes_of(layer.v_transform_inverse),
          "A_V^-1 per KV head: the attention output is o' A_V^-1");
    }
    // Format 1.3: the metric the key tables are factorized from (docs/format.md: a consumer can rebuild them for
    // its own context).
    if (!layer.k_ef_metric.empty())
      add(p + "k_ef_metric", fmt::DType::F64, {kv, d, d}, bytes_of(layer.k_ef_metric),
          "key metric per KV head (post-RoPE query second moment, original basis, positions "
          "0..ef_metric_positions-1)");
  }
  const std::vector<int64_t> ef_contexts = {b.ef_metric_positions, b.ef_key_context};
  const std::vector<double> ef_damp = {b.ef_damp};
  if (fmt::has_key_metric(b)) {
    add("ef_metric_positions_key_context", fmt::DType::I64, {2}, bytes_of(ef_contexts),
        "[positions the key metric averages over, positions the key tables are made for]");
    add("ef_damp", fmt::DType::F64, {1}, bytes_of(ef_damp), "the key tables' damping (relative to mean(diag M))");
  }
  const std::vector<int32_t> ef_clip_feedback = {b.ef_clip_feedback ? 1 : 0};
  if (fmt::has_error_feedback(b))
    add("ef_clip_feedback", fmt::DType::I32, {1}, bytes_of(ef_clip_feedback),
        "1: the error-feedback target is the unclipped rotated vector, 0: the clipped one");
  std::vector<float> k_clip, v_clip;
  for (const auto& layer : b.layers) k_clip.push_back(layer.k_clip_ratio), v_clip.push_back(layer.v_clip_ratio);
  add("k_clip_ratio", fmt::DType::F32, {L}, bytes_of(k_clip), "per-layer K clip ratio (quantile of |y|)");
  add("v_clip_ratio", fmt::DType::F32, {L}, bytes_of(v_clip), "per-layer V clip ratio");
  std::vector<int32_t> k_seg, v_seg;
  for (const auto& s : b.quant.k.segments) k_seg.insert(k_seg.end(), {s.begin, s.end, s.bits});
  for (const auto& s : b.quant.v.segments) v_seg.insert(v_seg.end(), {s.begin, s.end, s.bits});
  add("quant.k.segments", fmt::DType::I32, {static_cast<int64_t>(b.quant.k.segments.size()), 3}, bytes_of(k_seg),
      "K segments: rows of [begin, end, bits] over the rotated dims");
  add("quant.v.segments", fmt::DType::I32, {static_cast<int64_t>(b.quant.v.segments.size()), 3}, bytes_of(v_seg),
      "V segments");

  nlohmann::json manifest = common_manifest(b, o.bundle, "oscar-safetensors");
  // Only with transforms, so exports of 1.x bundles keep their manifests.
  if (fmt::has_storage_transform(b))
    manifest["storage_transforms"] = "bundle format 2.0: tensors with layers.L.{k,v}_transform are stored as "
                                     "y = (x - mean)·A per KV head, not x·R (docs/format.md)";
  const fs::path weights = dir / "oscar_rotations.safetensors";
  fmt::write_safetensors(weights, tensors,
                         {{"format", "oscar-rotations"},
                          {"format_version", "1"},
                          {"rotation_composition", b.rotation_composition},
                          {"model_attention_sha256", b.model.attention_sha256},
                          {"quant", manifest["quant"].dump()}});
  manifest["files"] = {{"oscar_rotations.safetensors", {{"sha256", fmt::sha256_file(weights)}}}};
  manifest["tensors"] = listing;
  if (!o.golden_kv.empty()) manifest["golden"] = write_int2_golden(b, o, dir);
  fmt::write_file_atomic(dir / "manifest.json", manifest.dump(2) + "\n");
  std::printf("exported %zu tensors to %s (manifest.json, oscar_rotations.safetensors)\n", tensors.size(),
              dir.string().c_str());
  return 0;
}

int export_fold_v(const fmt::Bundle& b, const ExportOptions& o) {
  check_model_dir(o.model_dir);
  for (const auto& layer : b.layers)
    if (!layer.v_transform.empty())
      throw Error(o.bundle, "--fold-v folds an orthogonal R_v; this bundle stores value transforms (format 2.0), "
                            "which --fold-v does not fold (calibrate with --transform none for a bundle it can fold)");
  const FoldReport r = fold_v_rotation(b, o.model_dir, o.out);
  std::printf("wrote %s: %zu files, %lld tensors folded (v_proj rows by R_v^T, o_proj columns by R_v)\n",
              o.out.c_str(), r.files_written.size(), static_cast<long long>(r.tensors_changed));
  return 0;
}

// The published server (FutureMLS-Lab/OSCAR) takes one K and one V clip ratio and the bf16 windows as launch
// settings; they are recorded so the converter can write them next to the .pt files.
nlohmann::json server_settings(const fmt::Bundle& b) {
  const auto int2_whole_head = [&](const fmt::TensorQuantSpec& t) {
    return t.storage == fmt::KvStorage::Int && t.segments.size() == 1 && t.segments[0].bits == 2;
  };
  bool every_layer_int2 = true;
  for (size_t l = 0; l < b.layers.size(); ++l) {
    const fmt::KvQuantSpec ls = fmt::layer_spec(b, l);
    every_layer_int2 = every_layer_int2 && int2_whole_head(ls.k) && int2_whole_head(ls.v);
  }
  nlohmann::json s;
  s["supported"] = every_layer_int2 && b.rotation_composition == "eigen*hadamard*bitrev" && b.rotation_groups == 1 &&
                   !fmt::has_storage_transform(b);
  if (!s["supported"].get<bool>())
    s["reason"] = "the published server serves INT2 whole-head K/V with one eigen*hadamard*bitrev rotation per layer" +
                  std::string(fmt::has_storage_transform(b) ? " (this bundle stores per-KV-head storage transforms)" : "");
  s["env"] = {{"SGLANG_ENABLE_MIXED_KV_WINDOWS", "1"},
              {"SGLANG_OSCAR_K_CLIP_RATIO", ::fmt::format("{}", b.quant.k.clip_ratio)},
              {"SGLANG_OSCAR_V_CLIP_RATIO", ::fmt::format("{}", b.quant.v.clip_ratio)},
              {"SGLANG_MIXED_KV_PREFIX_TOKENS", std::to_string(b.quant.sink_tokens)},
              {"SGLANG_MIXED_KV_RECENT_TOKENS", std::to_string(b.quant.recent_tokens)},
              {"SGLANG_MIXED_KV_HP_DTYPE", "bfloat16"}};
  s["args"] = {"--kv-cache-dtype", "int2", "--kv-cache-quant-group-size", std::to_string(b.quant.head_dim)};
  if (fmt::has_error_feedback(b))
    s["error_feedback"] = "not applied: the published server rounds to nearest, so it serves this bundle with the "
                          "accuracy of `oscar calibrate --error-feedback off` (same rotations and clips; the tables "
                          "change only which codes a writer picks)";
  return s;
}

int export_sglang(const fmt::Bundle& b, const ExportOptions& o) {
  // The published kernels rotate with one orthogonal R per layer; exporting R alone would serve the wrong cache.
  if (fmt::has_storage_transform(b))
    throw Error(o.bundle, "--format sglang-oscar: the bundle stores per-KV-head storage transforms (format 2.0), "
                          "which the published server cannot run; use --format safetensors, or calibrate with --transform none");
  const fs::path dir = o.out;
  ensure_output_dir(dir, "--out");
  const int64_t L = static_cast<int64_t>(b.layers.size()), g = b.rotation_groups, d = b.quant.head_dim;
  std::vector<float> k_rot, v_rot, clips;
  std::vector<double> k_eig, v_eig;
  for (const auto& l : b.layers) {
    k_rot.insert(k_rot.end(), l.k_rotation.begin(), l.k_rotation.end());
    v_rot.insert(v_rot.end(), l.v_rotation.begin(), l.v_rotation.end());
    k_eig.insert(k_eig.end(), l.k_eigenvalues.begin(), l.k_eigenvalues.end());
    v_eig.insert(v_eig.end(), l.v_eigenvalues.begin(), l.v_eigenvalues.end());
    clips.insert(clips.end(), {l.k_clip_ratio, l.v_clip_ratio});
  }
  nlohmann::json tensors = nlohmann::json::object();
  auto raw = [&](const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                 std::span<const std::byte> bytes) {
    const std::string file = name + ".bin";
    fmt::write_file_atomic(dir / file, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    tensors[name] = {{"file", file}, {"dtype", dtype}, {"shape", shape}, {"sha256", fmt::sha256_hex(bytes)}};
  };
  raw("k_rotation", "float32", {L, g, d, d}, bytes_of(k_rot));
  raw("v_rotation", "float32", {L, g, d, d}, bytes_of(v_rot));
  raw("k_eigenvalues", "float64", {L, g, d}, bytes_of(k_eig));
  raw("v_eigenvalues", "float64", {L, g, d}, bytes_of(v_eig));
  raw("clip_ratios", "float32", {L, 2}, bytes_of(clips));

  nlohmann::json manifest = common_manifest(b, o.bundle, "oscar-sglang-export");
  manifest["byte_order"] = "little";
  manifest["eigenvalue_order"] = "descending";
  manifest["objectives"] = {{"k", "qqt"}, {"v", "sst"}};
  manifest["tensors"] = tensors;
  manifest["server"] = server_settings(b);
  fmt::write_file_atomic(dir / "manifest.json", manifest.dump(2) + "\n");
  if (!manifest["server"]["supported"].get<bool>())
    spdlog::warn("{}", manifest["server"]["reason"].get<std::string>());
  if (manifest["server"].contains("error_feedback"))
    spdlog::warn("error-feedback tables: {}", manifest["server"]["error_feedback"].get<std::string>());
  std::printf("exported %lld layers to %s; convert with: python3 scripts/export/to_sglang_oscar.py %s --out DIR\n",
              static_cast<long long>(L), dir.string().c_str(), dir.string().c_str());
  return 0;
}

int run_export(const ExportOptions& o) {
  fmt::Bundle b = fmt::read_bundle(o.bundle);
  if (o.fold_v && o.format != "safetensors") throw Error("--fold-v", "only with --format safetensors");
  if (!o.model_dir.empty() && !o.fold_v && o.ef_context == 0)
    throw Error("--model", "only used with --fold-v or --ef-context");
  if (o.ef_context < 0) throw Error("--ef-context", ::fmt::format("{} must be > 0", o.ef_context));
  if (o.ef_context > 0) {
    if (o.model_dir.empty()) throw Error("--ef-context", "needs --model DIR (the checkpoint's RoPE frequencies)");
    rt::check_bundle_matches(b, calib::model_fingerprint(o.model_dir), o.bundle, o.model_dir);
    const int64_t rebuilt = calib::retarget_key_tables(b, model::rope_inv_freq(fmt::ModelConfig::from_dir(o.model_dir)),
                                                       o.ef_context);
    spdlog::info("key tables of {} layer(s) rebuilt for positions 0..{}", rebuilt, o.ef_context - 1);
  }
  if (o.fold_v && o.model_dir.empty()) throw Error("--fold-v", "needs --model DIR (the checkpoint to fold)");
  if (!o.golden_kv.empty() && (o.fold_v || o.format != "safetensors"))
    throw Error("--golden-kv", "only with --format safetensors (without --fold-v)");
  if (o.format == "sglang-oscar") return export_sglang(b, o);
  return o.fold_v ? export_fold_v(b, o) : export_safetensors(b, o);
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "export", "Publish a .oscar bundle as safetensors (+ manifest), a V-folded checkpoint, or for SGLang", 63,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<ExportOptions>();
      sub.add_option("FILE", o->bundle, ".oscar bundle")->required()->type_name("FILE");
      sub.add_option("--format", o->format, "safetensors or sglang-oscar")
          ->required()
          ->check(CLI::IsMember({"safetensors", "sglang-oscar"}));
      sub.add_option("--out", o->out, "output directory (created if absent)")->required()->type_name("DIR");
      sub.add_flag("--fold-v", o->fold_v, "write a copy of --model with R_v folded into v_proj and o_proj");
      sub.add_option("--model", o->model_dir, "checkpoint directory to fold (with --fold-v)")->type_name("DIR");
      sub.add_option("--golden-kv", o->golden_kv,
                     "an `oscar forward --dump` file: also write int2_golden.safetensors (reference records)")
          ->type_name("FILE");
      sub.add_option("--golden-tokens", o->golden_tokens, "tokens per layer and head in the golden file")
          ->capture_default_str();
      sub.add_option("--ef-context", o->ef_context,
                     "rebuild the error-feedback key tables for positions 0..N-1 from the bundle's stored key metric "
                     "(bundle 1.3) before exporting; needs --model")
          ->type_name("N");
      return [o] { return run_export(*o); };
    });

}  // namespace oscar::app
