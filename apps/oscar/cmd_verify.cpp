// oscar verify: every integrity check a bundle can be put through, each printed as PASS/FAIL on its own line:
// the sha256 of every dataset, the structural validation of read_bundle, ‖RᵀR − I‖_max ≤ 1e-5 for every rotation,
// finiteness of every number, and (with --model) the fingerprint against the checkpoint directory.
// Exit 0 when every check passes, 1 otherwise; a check that cannot run (unreadable bundle) counts as failed.
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/oscar/bundle_tools.h"
#include "apps/oscar/command.h"
#include "apps/oscar/common.h"
#include "formats/bundle.h"
#include "formats/error.h"
#include "lib/calib/calibrator.h"

namespace oscar::app {
namespace {

// fp32 rotations rounded from orthogonal fp64 matrices sit near 1e-7; 1e-5 leaves room for head_dim 256 while
// still catching a transposed-then-truncated or bit-flipped matrix.
constexpr double kOrthogonalityTolerance = 1e-5;

struct VerifyOptions {
  std::string bundle;
  std::string model_dir;
  bool json = false;
};

class CheckList {
 public:
  explicit CheckList(bool json) : json_(json) {}
  void add(bool pass, const std::string& name, const std::string& detail) {
    ++total_;
    failed_ += pass ? 0 : 1;
    if (json_) {
      checks_.push_back({{"check", name}, {"pass", pass}, {"detail", detail}});
    } else {
      std::printf("%s  %-40s %s\n", pass ? "PASS" : "FAIL", name.c_str(), detail.c_str());
    }
  }
  int finish(const std::string& bundle) {
    if (json_) {
      nlohmann::json j = {{"bundle", bundle}, {"checks", checks_}, {"total", total_}, {"failed", failed_},
                          {"ok", failed_ == 0}};
      std::puts(j.dump(2).c_str());
    } else {
      std::printf("verify: %d checks, %d failed: %s\n", total_, failed_, failed_ == 0 ? "OK" : "FAILED");
    }
    std::fflush(stdout);
    return failed_ == 0 ? 0 : 1;
  }

 private:
  bool json_;
  int total_ = 0, failed_ = 0;
  nlohmann::json checks_ = nlohmann::json::array();
};

template <typename T>
int64_t count_non_finite(const std::vector<T>& v) {
  int64_t n = 0;
  for (T x : v) n += std::isfinite(x) ? 0 : 1;
  return n;
}

void check_fingerprint(CheckList& checks, const fmt::ModelFingerprint& want, const std::string& model_dir) {
  fmt::ModelFingerprint got;
  try {
    check_model_dir(model_dir);
    got = calib::model_fingerprint(model_dir);
  } catch (const Error& e) {
    checks.add(false, "fingerprint", e.what());
    return;
  }
  auto field = [&](const std::string& name, const auto& a, const auto& b) {
    checks.add(a == b, "fingerprint " + name,
               a == b ? ::fmt::format("{}", a) : ::fmt::format("bundle {} but model {}", a, b));
  };
  field("architecture", want.architecture, got.architecture);
  field("num_layers", want.num_layers, got.num_layers);
  field("num_heads", want.num_heads, got.num_heads);
  field("num_kv_heads", want.num_kv_heads, got.num_kv_heads);
  field("head_dim", want.head_dim, got.head_dim);
  field("hidden_size", want.hidden_size, got.hidden_size);
  field("vocab_size", want.vocab_size, got.vocab_size);
  field("config_sha256", want.config_sha256, got.config_sha256);
  field("attention_sha256", want.attention_sha256, got.attention_sha256);
}

int run_verify(const VerifyOptions& o) {
  CheckList checks(o.json);
  std::vector<fmt::DatasetChecksum> sums;
  try {
    sums = fmt::bundle_checksums(o.bundle);
    checks.add(true, "hdf5", "file opens as HDF5");
  } catch (const Error& e) {
    checks.add(false, "hdf5", e.detail());
    return checks.finish(o.bundle);
  }
  checks.add(!sums.empty(), "datasets", ::fmt::format("{} datasets", sums.size()));
  for (const auto& s : sums)
    checks.add(s.ok(), "sha256 " + s.object,
               !s.problem.empty() ? s.problem
               : s.ok()           ? s.computed_sha256.substr(0, 16)
                                  : ::fmt::format("stored {} but bytes hash to {}", s.stored_sha256.substr(0, 16),
                                                  s.computed_sha256.substr(0, 16)));

  std::optional<fmt::Bundle> bundle;
  try {
    bundle = fmt::read_bundle(o.bundle);
    checks.add(true, "structure", ::fmt::format("format {}.{}, {} layers, {} rotation group(s), {}",
                                                bundle->format_major, bundle->format_minor, bundle->layers.size(),
                                                bundle->rotation_groups, bundle->rotation_composition));
  } catch (const Error& e) {
    checks.add(false, "structure", e.what());
  }

  if (bundle) {
    const int64_t d = bundle->quant.head_dim, g = bundle->rotation_groups;
    int64_t non_finite = 0;
    for (size_t l = 0; l < bundle->layers.size(); ++l) {
      const auto& L = bundle->layers[l];
      for (auto [name, r] : {std::pair{"k", &L.k_rotation}, std::pair{"v", &L.v_rotation}})
        for (int64_t gi = 0; gi < g; ++gi) {
          const double err = rotation_orthogonality_error(std::span(*r).subspan(gi * d * d, d * d), d);
          checks.add(err <= kOrthogonalityTolerance, ::fmt::format("orthogonal layer {} {} group {}", l, name, gi),
                     ::fmt::format("max|RtR - I| = {:.3g} (limit {:g})", err, kOrthogonalityTolerance));
        }
      non_finite += count_non_finite(L.k_rotation) + count_non_finite(L.v_rotation) +
                    count_non_finite(L.k_eigenvalues) + count_non_finite(L.v_eigenvalues) +
                    (std::isfinite(L.k_clip_ratio) ? 0 : 1) + (std::isfinite(L.v_clip_ratio) ? 0 : 1);
    }
    non_finite += count_non_finite(bundle->errors.k_relative_error) + count_non_finite(bundle->errors.v_relative_error);
    checks.add(non_finite == 0, "finite", ::fmt::format("{} non-finite values", non_finite));
    if (!o.model_dir.empty()) check_fingerprint(checks, bundle->model, o.model_dir);
  } else {
    checks.add(false, "rotations", "not checked: the bundle does not read");
    if (!o.model_dir.empty()) checks.add(false, "fingerprint", "not checked: the bundle does not read");
  }
  return checks.finish(o.bundle);
}

}  // namespace

OSCAR_REGISTER_COMMAND(
    "verify", "Check a .oscar bundle: dataset checksums, orthogonal rotations, finite values, model fingerprint", 61,
    [](CLI::App& sub) -> RunCommand {
      auto o = std::make_shared<VerifyOptions>();
      sub.add_option("FILE", o->bundle, ".oscar bundle")->required()->type_name("FILE");
      sub.add_option("--model", o->model_dir, "checkpoint directory whose fingerprint the bundle must match")
          ->type_name("DIR");
      add_json_flag(sub, o->json);
      return [o] { return run_verify(*o); };
    });

}  // namespace oscar::app
