#include "apps/oscar/bundle_tools.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include <fmt/format.h>

#include "formats/atomic_file.h"
#include "formats/error.h"
#include "formats/model_config.h"
#include "formats/safetensors.h"
#include "lib/calib/calibrator.h"
#include "lib/calib/rotation.h"
#include "oscar_version.h"

namespace oscar::app {

namespace fs = std::filesystem;

double rotation_orthogonality_error(std::span<const float> r, int64_t d) {
  double worst = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i; j < d; ++j) {
      double dot = 0;
      for (int64_t m = 0; m < d; ++m) dot += static_cast<double>(r[m * d + i]) * r[m * d + j];
      worst = std::max(worst, std::abs(dot - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

bool has_eigenbasis(const std::string& composition) {
  return composition == "eigen" || composition == "eigen*hadamard*bitrev";
}

std::vector<double> eigenbasis_of_rotation(std::span<const float> r, int64_t d, const std::string& composition,
                                           const std::string& where) {
  const size_t n = static_cast<size_t>(d * d);
  std::vector<double> u(r.begin(), r.begin() + static_cast<std::ptrdiff_t>(n));
  if (composition == "eigen") return u;
  if (composition != "eigen*hadamard*bitrev" || !calib::is_power_of_two(d))
    throw Error(where, "unknown rotation composition '" + composition + "' (eigen, eigen*hadamard*bitrev)");
  const std::vector<double> h = calib::hadamard(d);
  const std::vector<int64_t> br = calib::bit_reversal_permutation(d);
  std::vector<double> uh(n);  // U_asc·H, un-permuted
  for (int64_t j = 0; j < d; ++j)
    for (int64_t row = 0; row < d; ++row) uh[row * d + (d - 1 - br[j])] = r[row * d + j];
  // U_asc = (U_asc·H)·H; U_desc column c is U_asc column d−1−c.
  for (int64_t row = 0; row < d; ++row)
    for (int64_t c = 0; c < d; ++c) {
      double s = 0;
      for (int64_t m = 0; m < d; ++m) s += uh[row * d + m] * h[m * d + (d - 1 - c)];
      u[row * d + c] = s;
    }
  return u;
}

namespace {

// Orthonormal basis (row-major [d, k]) of the span of the leading k columns of row-major [d, d] `a`: Householder
// QR, so that fp32 rounding in the stored rotations does not show up as a spurious angle.
std::vector<double> leading_basis(std::span<const double> a, int64_t d, int64_t k) {
  std::vector<double> q(static_cast<size_t>(d * k));
  for (int64_t r = 0; r < d; ++r)
    for (int64_t c = 0; c < k; ++c) q[r * k + c] = a[r * d + c];
  std::vector<double> tau(static_cast<size_t>(k));
  const auto n = static_cast<lapack_int>(d), m = static_cast<lapack_int>(k);
  lapack_int info = LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, n, m, q.data(), m, tau.data());
  if (info == 0) info = LAPACKE_dorgqr(LAPACK_ROW_MAJOR, n, m, m, q.data(), m, tau.data());
  if (info != 0) throw Error("principal angles", ::fmt::format("LAPACKE QR failed (info {})", info));
  return q;
}

std::vector<double> singular_values(std::vector<double> m, int64_t rows, int64_t cols) {
  const int64_t n = std::min(rows, cols);
  std::vector<double> sv(static_cast<size_t>(n)), superb(static_cast<size_t>(std::max<int64_t>(n, 2)));
  const lapack_int info =
      LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', static_cast<lapack_int>(rows), static_cast<lapack_int>(cols),
                     m.data(), static_cast<lapack_int>(cols), sv.data(), nullptr, 1, nullptr, 1, superb.data());
  if (info != 0) throw Error("principal angles", ::fmt::format("LAPACKE_dgesvd failed (info {})", info));
  return sv;  // descending
}

}  // namespace

std::vector<double> principal_angles(std::span<const double> a, std::span<const double> b, int64_t d, int64_t k) {
  if (k < 1 || k > d) throw Error("--k", ::fmt::format("{} is outside [1, head_dim {}]", k, d));
  const std::vector<double> qa = leading_basis(a, d, k), qb = leading_basis(b, d, k);
  // cos θ from the singular values of QaᵀQb; sin θ from those of (I − QaQaᵀ)Qb. acos alone loses half the digits
  // near 0 (an angle of 1e-8 rad reads as 1e-4), so θ = atan2(sin, cos) pairs the ascending sines with the
  // descending cosines (Björck & Golub).
  std::vector<double> m(static_cast<size_t>(k * k), 0.0), residual = qb;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t r = 0; r < d; ++r) m[i * k + j] += qa[r * k + i] * qb[r * k + j];
  for (int64_t r = 0; r < d; ++r)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < k; ++i) residual[r * k + j] -= qa[r * k + i] * m[i * k + j];
  const std::vector<double> cosines = singular_values(m, k, k);
  std::vector<double> sines = singular_values(residual, d, k);
  std::sort(sines.begin(), sines.end());
  std::vector<double> angles(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) angles[i] = std::atan2(sines[i], cosines[i]);
  std::sort(angles.begin(), angles.end());
  return angles;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  return ::fmt::format("{:.{}f} {}", b, u == 0 ? 0 : 2, units[u]);
}

void ensure_output_dir(const fs::path& dir, const std::string& flag) {
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw Error(flag + " " + dir.string(), "cannot create the output directory" + (ec ? ": " + ec.message() : ""));
}

// ------------------------------------------------------------------------------------------------ fold

namespace {

// Bytes of a folded tensor in the checkpoint's own dtype.
std::vector<std::byte> encode_like(const fmt::TensorView& t, const std::vector<double>& values) {
  std::vector<std::byte> out(values.size() * fmt::dtype_size(t.dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    const float f = static_cast<float>(values[i]);
    switch (t.dtype) {
      case fmt::DType::F32: std::memcpy(out.data() + 4 * i, &f, 4); break;
      case fmt::DType::BF16: {
        const uint16_t h = fmt::f32_to_bf16(f);
        std::memcpy(out.data() + 2 * i, &h, 2);
        break;
      }
      case fmt::DType::F16: {
        const uint16_t h = fmt::f32_to_f16(f);
        std::memcpy(out.data() + 2 * i, &h, 2);
        break;
      }
      default: throw Error(t.file.string() + ": tensor " + t.name, "fold supports F32, BF16 and F16 weights");
    }
  }
  return out;
}

const float* rotation_of(const fmt::LayerCalibration& layer, int64_t group, int64_t d) {
  return layer.v_rotation.data() + group * d * d;
}

void copy_file_atomic(const fs::path& from, const fs::path& to) {
  std::ifstream in(from, std::ios::binary);
  if (!in) throw Error(from.string(), "cannot open for copying");
  std::ostringstream ss;
  ss << in.rdbuf();
  fmt::write_file_atomic(to, ss.str());
}

}  // namespace

FoldReport fold_v_rotation(const fmt::Bundle& bundle, const fs::path& model_dir, const fs::path& out_dir) {
  std::error_code ec;
  if (fs::exists(out_dir, ec) && fs::equivalent(out_dir, model_dir, ec))
    throw Error(out_dir.string(), "--out must differ from --model (the fold writes a new checkpoint)");
  const fmt::ModelConfig cfg = fmt::ModelConfig::from_dir(model_dir);
  const fmt::ModelFingerprint found = calib::model_fingerprint(model_dir);
  if (found.attention_sha256 != bundle.model.attention_sha256 || found.num_layers != bundle.model.num_layers ||
      found.num_kv_heads != bundle.model.num_kv_heads || found.head_dim != bundle.model.head_dim)
    throw Error(model_dir.string(), "this checkpoint is not the one the bundle was calibrated on (fingerprint differs; "
                                    "run 'oscar verify BUNDLE --model DIR')");
  const fmt::TensorStore store = fmt::TensorStore::open(model_dir);
  ensure_output_dir(out_dir, "--out");

  const int64_t d = cfg.head_dim, groups = bundle.rotation_groups, group_size = cfg.group_size();
  const std::regex v_weight(R"(model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias))");
  const std::regex o_weight(R"(model\.layers\.(\d+)\.self_attn\.o_proj\.weight)");
  FoldReport report;

  for (const auto& file : store.files()) {
    std::vector<std::vector<std::byte>> owned;  // folded bytes, alive until the shard is written
    owned.reserve(file->tensors().size());
    std::vector<fmt::TensorToWrite> tensors;
    for (const fmt::TensorView& t : file->tensors()) {
      std::smatch m;
      const bool is_v = std::regex_match(t.name, m, v_weight);
      std::smatch mo;
      const bool is_o = !is_v && std::regex_match(t.name, mo, o_weight);
      if (!is_v && !is_o) {
        tensors.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(t.data, t.nbytes)});
        continue;
      }
      const int64_t layer = std::stoll(is_v ? m[1].str() : mo[1].str());
      const std::string where = t.file.string() + ": tensor " + t.name;
      if (layer < 0 || layer >= static_cast<int64_t>(bundle.layers.size()))
        throw Error(where, ::fmt::format("layer {} is not in the bundle ({} layers)", layer, bundle.layers.size()));
      const auto& cal = bundle.layers[static_cast<size_t>(layer)];
      const std::vector<float> w = fmt::to_f32(t);
      std::vector<double> out(w.size());
      if (is_v && m[2] == "weight") {
        if (t.shape.size() != 2 || t.shape[0] != cfg.kv_dim()) throw Error(where, "unexpected v_proj shape");
        const int64_t in = t.shape[1];
        for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
          const float* r = rotation_of(cal, rotation_group_of(h, groups), d);
          for (int64_t i = 0; i < d; ++i)
            for (int64_t c = 0; c < in; ++c) {
              double s = 0;  // (R_vᵀ·W_h)[i][c]
              for (int64_t k = 0; k < d; ++k) s += static_cast<double>(r[k * d + i]) * w[(h * d + k) * in + c];
              out[(h * d + i) * in + c] = s;
            }
        }
      } else if (is_v) {
        if (t.shape.size() != 1 || t.shape[0] != cfg.kv_dim()) throw Error(where, "unexpected v_proj bias shape");
        for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
          const float* r = rotation_of(cal, rotation_group_of(h, groups), d);
          for (int64_t i = 0; i < d; ++i) {
            double s = 0;  // (b_h·R_v)[i]
            for (int64_t k = 0; k < d; ++k) s += static_cast<double>(w[h * d + k]) * r[k * d + i];
            out[h * d + i] = s;
          }
        }
      } else {
        if (t.shape.size() != 2 || t.shape[1] != cfg.q_dim()) throw Error(where, "unexpected o_proj shape");
        const int64_t rows = t.shape[0], cols = t.shape[1];
        for (int64_t j = 0; j < cfg.num_heads; ++j) {
          const float* r = rotation_of(cal, rotation_group_of(j / group_size, groups), d);
          for (int64_t row = 0; row < rows; ++row)
            for (int64_t i = 0; i < d; ++i) {
              double s = 0;  // (W_j·R_v)[row][i]
              for (int64_t k = 0; k < d; ++k) s += static_cast<double>(w[row * cols + j * d + k]) * r[k * d + i];
              out[row * cols + j * d + i] = s;
            }
        }
      }
      owned.push_back(encode_like(t, out));
      tensors.push_back({t.name, t.dtype, t.shape, owned.back()});
      ++report.tensors_changed;
    }
    std::map<std::string, std::string> metadata = file->metadata();
    metadata["oscar_fold_v"] = "v_proj rows of each KV head replaced by R_v^T W, o_proj columns of each query head by W R_v";
    metadata["oscar_version"] = OSCAR_VERSION_STRING;
    const fs::path target = out_dir / file->path().filename();
    fmt::write_safetensors(target, tensors, metadata);
    report.files_written.push_back(target);
  }
  // config.json, tokenizer files, the shard index: unchanged (the fold keeps every tensor name, shape and dtype).
  for (const auto& entry : fs::directory_iterator(model_dir)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || name.starts_with(".") || entry.path().extension() == ".safetensors") continue;
    copy_file_atomic(entry.path(), out_dir / name);
    report.files_written.push_back(out_dir / name);
  }
  return report;
}

}  // namespace oscar::app
