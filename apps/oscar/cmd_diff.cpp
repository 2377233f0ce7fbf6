// oscar diff A B: how two calibrations differ. Per layer (and rotation group) the principal subspace angles
// between the leading k columns of the two rotations (the coordinates the quantizer stores first) and between the
// two leading-k eigenspaces recovered from the rotations; per-layer clip ratio differences; every differing
// field of the quantizer spec, rotation setup, fingerprint and calibration options. Exit 0 (a report, not a test).
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <numbers>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/oscar/bundle_tools.h"
#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "lib/calib/ef_calibration.h"

namespace oscar::app {
namespace {

struct DiffOptions {
  std::string a, b;
  int64_t k = 0;
  bool json = false;
};

struct Difference {
  std::string field, a, b;
};

std::string spec_text(const fmt::TensorQuantSpec& t) {
  std::string s = std::string(fmt::kv_storage_name(t.storage));
  for (const auto& seg : t.segments) s += ::fmt::format(" [{},{}):{}", seg.begin, seg.end, seg.bits);
  return s + ::fmt::format(" clip {}", t.clip_ratio);
}

std::string segments_text(const fmt::TensorQuantSpec& t) {
  std::string s;
  for (const auto& seg : t.segments) s += ::fmt::format("[{},{}):{} ", seg.begin, seg.end, seg.bits);
  return s;
}

std::vector<Difference> setup_differences(const fmt::Bundle& a, const fmt::Bundle& b) {
  std::vector<Difference> out;
  auto cmp = [&](const std::string& field, const auto& x, const auto& y) {
    if (!(x == y)) out.push_back({field, ::fmt::format("{}", x), ::fmt::format("{}", y)});
  };
  cmp("quant.head_dim", a.quant.head_dim, b.quant.head_dim);
  cmp("quant.k", spec_text(a.quant.k), spec_text(b.quant.k));
  cmp("quant.v", spec_text(a.quant.v), spec_text(b.quant.v));
  cmp("quant.sink_tokens", a.quant.sink_tokens, b.quant.sink_tokens);
  cmp("quant.recent_tokens", a.quant.recent_tokens, b.quant.recent_tokens);
  cmp("rotation_groups", a.rotation_groups, b.rotation_groups);
  cmp("rotation_composition", a.rotation_composition, b.rotation_composition);
  cmp("model.architecture", a.model.architecture, b.model.architecture);
  cmp("model.num_layers", a.model.num_layers, b.model.num_layers);
  cmp("model.num_kv_heads", a.model.num_kv_heads, b.model.num_kv_heads);
  cmp("model.config_sha256", a.model.config_sha256, b.model.config_sha256);
  cmp("model.attention_sha256", a.model.attention_sha256, b.model.attention_sha256);
  cmp("calibration.num_sequences", a.calibration.num_sequences, b.calibration.num_sequences);
  cmp("calibration.num_tokens", a.calibration.num_tokens, b.calibration.num_tokens);
  cmp("calibration.seq_len", a.calibration.seq_len, b.calibration.seq_len);
  cmp("calibration.seed", a.calibration.seed, b.calibration.seed);
  for (size_t l = 0; l < std::min(a.layers.size(), b.layers.size()); ++l) {
    const fmt::KvQuantSpec la = fmt::layer_spec(a, l), lb = fmt::layer_spec(b, l);
    cmp(::fmt::format("layer {} k segments", l), segments_text(la.k), segments_text(lb.k));
    cmp(::fmt::format("layer {} v segments", l), segments_text(la.v), segments_text(lb.v));
  }
  // Error-feedback rounding (1.2/1.3): which tensors have tables, whether the tables differ, and for which key
  // positions they were made. The tables themselves are d² numbers per head; "differ" says enough for a diff.
  cmp("format", ::fmt::format("{}.{}", a.format_major, a.format_minor),
      ::fmt::format("{}.{}", b.format_major, b.format_minor));
  cmp("ef_clip_feedback", fmt::has_error_feedback(a) && a.ef_clip_feedback, fmt::has_error_feedback(b) && b.ef_clip_feedback);
  cmp("ef key tables for positions", calib::error_feedback_context(a), calib::error_feedback_context(b));
  cmp("ef key metric stored", fmt::has_key_metric(a), fmt::has_key_metric(b));
  for (size_t l = 0; l < std::min(a.layers.size(), b.layers.size()); ++l) {
    const auto& x = a.layers[l];
    const auto& y = b.layers[l];
    for (const bool keys : {true, false}) {
      const auto& order_a = keys ? x.k_ef_order : x.v_ef_order;
      const auto& order_b = keys ? y.k_ef_order : y.v_ef_order;
      const auto& weights_a = keys ? x.k_ef_weights : x.v_ef_weights;
      const auto& weights_b = keys ? y.k_ef_weights : y.v_ef_weights;
      if (order_a == order_b && weights_a == weights_b) continue;
      out.push_back({::fmt::format("layer {} {} ef table", l, keys ? "k" : "v"), order_a.empty() ? "none" : "table",
                     order_b.empty() ? "none" : order_a.empty() ? "table" : "another table"});
    }
    // Storage transforms (2.0), likewise by presence and equality.
    for (const bool keys : {true, false}) {
      const auto& ta = keys ? x.k_transform : x.v_transform;
      const auto& tb = keys ? y.k_transform : y.v_transform;
      if (ta == tb && (!keys || x.k_mean == y.k_mean)) continue;
      out.push_back({::fmt::format("layer {} {} transform", l, keys ? "k" : "v"), ta.empty() ? "none" : "transform",
                     tb.empty() ? "none" : ta.empty() ? "transform" : "another transform"});
    }
  }
  std::map<std::string, std::string> oa(a.calibration.options.begin(), a.calibration.options.end());
  std::map<std::string, std::string> ob(b.calibration.options.begin(), b.calibration.options.end());
  for (const auto& [k, v] : oa) cmp("option " + k, v, ob.contains(k) ? ob[k] : std::string("(absent)"));
  for (const auto& [k, v] : ob)
    if (!oa.contains(k)) cmp("option " + k, std::string("(absent)"), v);
  return out;
}

constexpr double kDegrees = 180.0 / std::numbers::pi;

// The eigenspace angle is undefined (NaN) when a bundle stores no eigenbasis: null in JSON, "n/a" in text.
nlohmann::json json_angle(double deg) { return std::isnan(deg) ? nlohmann::json(nullptr) : nlohmann::json(deg); }
std::string text_angle(double deg) { return std::isnan(deg) ? std::string("n/a") : ::fmt::format("{:.4f}", deg); }

int run_diff(const DiffOptions& o) {
  const fmt::Bundle a = fmt::read_bundle(o.a);
  const fmt::Bundle b = fmt::read_bundle(o.b);
  const std::vector<Difference> diffs = setup_differences(a, b);
  const int64_t d = a.quant.head_dim;
  const bool comparable = d == b.quant.head_dim && a.layers.size() == b.layers.size() &&
                          a.rotation_groups == b.rotation_groups;
  const int64_t k = o.k > 0 ? o.k : std::max<int64_t>(1, d / 4);

  struct Row {
    size_t layer;
    int64_t group;
    double k_columns, k_eigen, v_columns, v_eigen;  // largest principal angle, degrees
    float k_clip_a, k_clip_b, v_clip_a, v_clip_b;
  };
  std::vector<Row> rows;
  if (comparable) {
    if (k > d) throw Error("--k", ::fmt::format("{} exceeds head_dim {}", k, d));
    for (size_t l = 0; l < a.layers.size(); ++l) {
      const auto &la = a.layers[l], &lb = b.layers[l];
      for (int64_t g = 0; g < a.rotation_groups; ++g) {
        auto angles = [&](const std::vector<float>& ra, const std::vector<float>& rb, double& columns, double& eigen) {
          const auto sa = std::span(ra).subspan(g * d * d, d * d), sb = std::span(rb).subspan(g * d * d, d * d);
          const std::vector<double> da(sa.begin(), sa.end()), db(sb.begin(), sb.end());
          columns = principal_angles(da, db, d, k).back() * kDegrees;
          const std::string where = ::fmt::format("layer {} group {}", l, g);
          // Bundles without a recoverable eigenbasis (hadamard, none, spectral) compare by stored columns only.
          if (!has_eigenbasis(a.rotation_composition) || !has_eigenbasis(b.rotation_composition)) {
            eigen = std::numeric_limits<double>::quiet_NaN();
            return;
          }
          eigen = principal_angles(eigenbasis_of_rotation(sa, d, a.rotation_composition, o.a + ": " + where),
                                   eigenbasis_of_rotation(sb, d, b.rotation_composition, o.b + ": " + where), d, k)
                      .back() *
                  kDegrees;
        };
        Row r{l, g, 0, 0, 0, 0, la.k_clip_ratio, lb.k_clip_ratio, la.v_clip_ratio, lb.v_clip_ratio};
        angles(la.k_rotation, lb.k_rotation, r.k_columns, r.k_eigen);
        angles(la.v_rotation, lb.v_rotation, r.v_columns, r.v_eigen);
        rows.push_back(r);
      }
    }
  }

  if (o.json) {
    nlohmann::json j;
    j["a"] = o.a;
    j["b"] = o.b;
    j["k"] = k;
    j["comparable"] = comparable;
    nlohmann::json dj = nlohmann::json::array();
    for (const auto& x : diffs) dj.push_back({{"field", x.field}, {"a", x.a}, {"b", x.b}});
    j["differences"] = dj;
    nlohmann::json lj = nlohmann::json::array();
    for (const auto& r : rows)
      lj.push_back({{"layer", r.layer}, {"group", r.group},
                    {"k_max_angle_columns_deg", r.k_columns}, {"k_max_angle_eigen_deg", json_angle(r.k_eigen)},
                    {"v_max_angle_columns_deg", r.v_columns}, {"v_max_angle_eigen_deg", json_angle(r.v_eigen)},
                    {"k_clip", {r.k_clip_a, r.k_clip_b}}, {"v_clip", {r.v_clip_a, r.v_clip_b}}});
    j["layers"] = lj;
    std::puts(j.dump(2).c_str());
    return 0;
  }

  std::string out = ::fmt::format("A: {}\nB: {}\n", o.a, o.b);
  if (diffs.empty()) out += "setup: identical (spec, rotation setup, fingerprint, options)\n";
  for (const auto& x : diffs) out += ::fmt::format("differs  {:<28} A {}  |  B {}\n", x.field, x.a, x.b);
  if (!comparable) {
    out += "rotations: not comparable (head_dim, layer count or rotation groups differ)\n";
  } else {
    out += ::fmt::format(
        "\nlargest principal angle (degrees) between the leading {} of {} dims: stored columns / eigenspace\n"
        "{:>5} {:>5}  {:>9} {:>9}  {:>9} {:>9}  {:>15}  {:>15}\n",
        k, d, "layer", "group", "K cols", "K eigen", "V cols", "V eigen", "K clip A/B", "V clip A/B");
    for (const auto& r : rows)
      out += ::fmt::format("{:>5} {:>5}  {:>9.4f} {:>9}  {:>9.4f} {:>9}  {:>7.3f}/{:<7.3f}  {:>7.3f}/{:<7.3f}\n",
                           r.layer, r.group, r.k_columns, text_angle(r.k_eigen), r.v_columns, text_angle(r.v_eigen),
                           r.k_clip_a, r.k_clip_b, r.v_clip_a, r.v_clip_b);
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "diff", "Compare two .oscar bundles: principal subspace angles per layer, clip ratios, spec differences", 62,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<DiffOptions>();
      sub.add_option("A", o->a, "first .oscar bundle")->required()->type_name("FILE");
      sub.add_option("B", o->b, "second .oscar bundle")->required()->type_name("FILE");
      sub.add_option("--k", o->k, "leading dimensions whose subspaces are compared (default head_dim/4)")
          ->check(CLI::Range(int64_t{1}, int64_t{4096}));
      add_json_flag(sub, o->json);
      return [o] { return run_diff(*o); };
    });

}  // namespace oscar::app
