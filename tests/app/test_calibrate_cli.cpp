// `oscar calibrate` end to end on the CPU: the real TinyStories llama2.c 280k checkpoint (HF layout, head_dim 8) on
// the TinyStories sample text. The bundle must equal what the library makes from the packer's sequences (so the
// CLI's data split is the documented one), be byte-deterministic, survive kill -9 + --resume byte for byte, and
// bad inputs must fail with one error line naming the culprit and leave no output file.
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "datasets/pack.h"
#include "formats/atomic_file.h"
#include "formats/bundle.h"
#include "formats/safetensors.h"
#include "formats/tokenizer.h"
#include "lib/calib/calibrator.h"
#include "calibrate_cli_fixture.h"
#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

namespace fs = std::filesystem;

class CalibrateCli : public TinyStoriesCalibrateCli {
 protected:
  // A small calibration: 6 sequences of 64 tokens, 2 held-out, windows shrunk to fit the short sequences. The
  // published method (the CLI's default, spectral, needs --budget-bits >= 5 at this head_dim 8; see
  // test_calibrate_method_cli.cpp).
  // `extra` flags replace the defaults' values or are appended. Logs below warnings are off, so stderr holds only
  // warnings and the one error line.
  std::vector<std::string> args(const fs::path& out, std::vector<std::string> extra = {}) const {
    return calibrate_args(out,
                          {"--num-seqs", "6", "--seq-len", "64", "--heldout-seqs", "2", "--sink", "16", "--recent",
                           "16", "--seed", "3", "--log-level", "warn", "--method", "published"},
                          extra);
  }
};

TEST_F(CalibrateCli, BundleMatchesTheLibraryOnThePackedSplitAndIsDeterministic) {
  const RunResult a = run_oscar(args(dir_ / "a.oscar"));
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const RunResult b = run_oscar(args(dir_ / "b.oscar"));
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(slurp(dir_ / "a.oscar"), slurp(dir_ / "b.oscar"));
  // The default keeps the fixed published ratios (tuned ones lost in KL: docs/results.md, "Clip objective vs KL").
  EXPECT_NE(a.out.find("oscar+clip"), std::string::npos) << a.out;  // the summary table
  EXPECT_EQ(a.out.find("oscar+tuned_clip"), std::string::npos) << a.out;

  const fmt::Bundle bundle = fmt::read_bundle(dir_ / "a.oscar");
  EXPECT_EQ(bundle.calibration.num_sequences, 6);
  EXPECT_EQ(bundle.calibration.num_tokens, 6 * 64);
  EXPECT_EQ(bundle.calibration.seq_len, 64);
  EXPECT_EQ(bundle.calibration.num_heldout_sequences, 2);
  EXPECT_EQ(bundle.calibration.seed, 3u);
  EXPECT_EQ(bundle.quant.sink_tokens, 16);
  EXPECT_EQ(bundle.quant.recent_tokens, 16);
  ASSERT_EQ(bundle.calibration.data_files.size(), 1u);
  EXPECT_EQ(bundle.calibration.data_files[0].sha256, fmt::sha256_file(text_));
  const auto& opts = bundle.calibration.options;
  const auto has = [&](const std::string& k, const std::string& v) {
    return std::find(opts.begin(), opts.end(), std::pair<std::string, std::string>{k, v}) != opts.end();
  };
  EXPECT_TRUE(has("num_seqs", "6"));
  EXPECT_TRUE(has("seq_len", "64"));
  EXPECT_TRUE(has("heldout_seqs", "2"));
  EXPECT_TRUE(has("device", "cpu"));
  EXPECT_TRUE(has("value_weighting", "query"));
  EXPECT_TRUE(has("tune_clip", "false"));
  for (const auto& l : bundle.layers) {
    EXPECT_EQ(l.k_clip_ratio, 0.96f);
    EXPECT_EQ(l.v_clip_ratio, 0.92f);
  }
  EXPECT_TRUE(std::is_sorted(opts.begin(), opts.end()));

  // The documented split: pack num + held-out shuffled sequences; the first 6 calibrate, the last 2 are held out.
  auto tok = fmt::Tokenizer::load(model_);
  data::PackOptions po;
  po.seq_len = 64;
  po.num_seqs = 8;
  po.seed = 3;
  const data::PackedDataset packed = data::pack_dataset({text_}, tok.get(), data::SourceOptions{}, po);
  ASSERT_EQ(packed.num_seqs(), 8);
  calib::CalibrationData data;
  data.seq_len = 64;
  for (int64_t i = 0; i < 8; ++i) {
    const auto s = packed.sequence(i);
    (i < 6 ? data.sequences : data.heldout).emplace_back(s.begin(), s.end());
  }
  calib::CalibrationOptions opt;
  opt.quant = fmt::KvQuantSpec::int2_default(8);
  opt.quant.sink_tokens = 16;
  opt.quant.recent_tokens = 16;
  opt.tune_clip = false;  // the CLI's default
  auto model = model::CpuModel::load(model_);
  // The CLI's default error feedback (kv, damp 0.1, clip feedback on): the tables must match too.
  opt.error_feedback.mode = calib::ErrorFeedbackMode::KV;
  opt.error_feedback.value_metrics = calib::value_output_metrics(fmt::TensorStore::open(model_), model->config());
  opt.transform.enabled = true;  // the CLI's --transform auto with tables and held-out sequences (α 0.5, the default)
  calib::CpuForwardRunner runner(*model);
  const calib::CalibrationResult lib = calib::calibrate(runner, calib::model_fingerprint(model_), data, opt);
  EXPECT_FALSE(lib.bundle.layers[0].k_ef_order.empty());
  EXPECT_EQ(bundle.layers, lib.bundle.layers);
  EXPECT_EQ(bundle.ef_clip_feedback, lib.bundle.ef_clip_feedback);
  EXPECT_EQ(bundle.errors, lib.bundle.errors);
  EXPECT_EQ(bundle.model, lib.bundle.model);
}

TEST_F(CalibrateCli, JsonSummary) {
  const RunResult r = run_oscar(args(dir_ / "j.oscar", {"--json", "--no-clip-tuning", "--per-head"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("bundle_sha256"), fmt::sha256_file(dir_ / "j.oscar"));
  EXPECT_EQ(j.at("num_sequences"), 6);
  EXPECT_EQ(j.at("heldout_sequences"), 2);
  EXPECT_EQ(j.at("rotation_groups"), 4);  // per KV head
  EXPECT_EQ(j.at("tune_clip"), false);
  ASSERT_EQ(j.at("layers").size(), 5u);
  EXPECT_FLOAT_EQ(j.at("layers")[0].at("k_clip").get<float>(), 0.96f);
  EXPECT_FLOAT_EQ(j.at("layers")[0].at("v_clip").get<float>(), 0.92f);
  // Mean over layers of the bundle's own per-layer report.
  const fmt::Bundle b = fmt::read_bundle(dir_ / "j.oscar");
  const auto row = std::find(b.errors.rows.begin(), b.errors.rows.end(), "oscar+clip") - b.errors.rows.begin();
  ASSERT_LT(static_cast<size_t>(row), b.errors.rows.size());
  double k = 0;
  for (int l = 0; l < 5; ++l) k += b.errors.k_relative_error[row * 5 + l] / 5;
  EXPECT_NEAR(j.at("errors_mean_over_layers").at("oscar+clip").at("k_relative_error").get<double>(), k, 1e-12 * k);
}

pid_t spawn_oscar(const std::vector<std::string>& args, const fs::path& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  const std::string bin = oscar_binary().string();
  std::vector<char*> argv{const_cast<char*>(bin.c_str())};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, bin.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

TEST_F(CalibrateCli, ResumeAfterKillNineGivesIdenticalBytes) {
  // A checkpoint after every sequence (each an fsync'ed atomic write): the run outlives the first one by far.
  const std::vector<std::string> size = {"--num-seqs", "24", "--checkpoint-every", "1"};
  const auto with = [&](const fs::path& out, const fs::path& ckpt, bool resume) {
    std::vector<std::string> a = args(out, size);
    a.insert(a.end(), {"--checkpoint", ckpt.string()});
    if (resume) a.push_back("--resume");
    return a;
  };
  const RunResult plain = run_oscar(with(dir_ / "plain.oscar", dir_ / "plain.ckpt", false));
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_FALSE(fs::exists(dir_ / "plain.ckpt"));  // removed once the bundle is written

  const fs::path ckpt = dir_ / "killed.ckpt";
  const pid_t pid = spawn_oscar(with(dir_ / "resumed.oscar", ckpt, false), dir_ / "log.txt");
  ASSERT_GT(pid, 0);
  int status = 0;
  bool exited = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(50);
  while (!fs::exists(ckpt) && std::chrono::steady_clock::now() < deadline) {
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  if (!exited) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "finished before the kill: " << slurp(dir_ / "log.txt");
  ASSERT_TRUE(fs::exists(ckpt));
  EXPECT_FALSE(fs::exists(dir_ / "resumed.oscar"));
  const fs::path copy = dir_ / "copy.ckpt";
  fs::copy_file(ckpt, copy);

  const RunResult resumed = run_oscar(with(dir_ / "resumed.oscar", ckpt, true));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_EQ(slurp(dir_ / "plain.oscar"), slurp(dir_ / "resumed.oscar"));

  // The killed run's checkpoint, offered to a run on other data (another shuffle seed): refused, naming the file.
  std::vector<std::string> other = with(dir_ / "other.oscar", copy, true);
  other[std::find(other.begin(), other.end(), "--seed") - other.begin() + 1] = "4";
  const RunResult refused = run_oscar(other);
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(refused.err)) << refused.err;
  EXPECT_NE(refused.err.find(copy.string()), std::string::npos) << refused.err;
  EXPECT_FALSE(fs::exists(dir_ / "other.oscar"));
}

TEST_F(CalibrateCli, BadInputsFailCleanly) {
  // A missing data file: exit 1, one line naming it, no bundle.
  const fs::path missing = dir_ / "no-such-corpus.txt";
  std::vector<std::string> a = args(dir_ / "x.oscar");
  a[std::find(a.begin(), a.end(), "--data") - a.begin() + 1] = missing.string();
  RunResult r = run_oscar(a);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find(missing.string()), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "x.oscar"));

  // An output directory that does not exist: exit 1 before any work, nothing created.
  const fs::path unwritable = dir_ / "no-such-dir" / "out.oscar";
  r = run_oscar(args(unwritable));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find(unwritable.string()), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "no-such-dir"));

  // A read-only directory (meaningless for root, who may write anywhere).
  if (::geteuid() != 0) {
    fs::create_directories(dir_ / "ro");
    fs::permissions(dir_ / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    r = run_oscar(args(dir_ / "ro" / "out.oscar"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
    fs::permissions(dir_ / "ro", fs::perms::owner_all);
    EXPECT_TRUE(fs::is_empty(dir_ / "ro"));
  }

  // No data at all: a file too short for one sequence is an error, not an empty bundle.
  {
    std::ofstream(dir_ / "tiny.txt") << "Once upon a time.\n";
  }
  a = args(dir_ / "y.oscar");
  a[std::find(a.begin(), a.end(), "--data") - a.begin() + 1] = (dir_ / "tiny.txt").string();
  r = run_oscar(a);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "y.oscar"));

  // --resume without --checkpoint.
  r = run_oscar(args(dir_ / "z.oscar", {"--resume"}));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--resume"), std::string::npos) << r.err;
}

TEST_F(CalibrateCli, LessDataThanAskedIsUsedWithAWarning) {
  // The first 6 KB of the sample: a few dozen sequences of 64 tokens.
  {
    const std::string text = slurp(text_).substr(0, 6000);
    std::ofstream(dir_ / "short.txt", std::ios::binary) << text.substr(0, text.rfind('\n') + 1);
  }
  const RunResult r =
      run_oscar(args(dir_ / "w.oscar", {"--data", (dir_ / "short.txt").string(), "--num-seqs", "100000", "--json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("holds only"), std::string::npos) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  const int64_t calibration = j.at("num_sequences"), heldout = j.at("heldout_sequences");
  EXPECT_GT(calibration, 8);
  EXPECT_LT(calibration, 1000);
  EXPECT_EQ(heldout, 2);
  // Every complete sequence of the file is used: the bundle's token count is all of them.
  EXPECT_EQ(j.at("num_tokens").get<int64_t>(), calibration * 64);
  EXPECT_EQ(j.at("warnings").size(), 1u);
}

// A checkpoint whose layer-2 k_proj holds an Inf: every layer-2 key is non-finite, and calibration stops naming it.
TEST_F(CalibrateCli, NonFiniteActivationsNameTheLayer) {
  const fs::path bad_model = dir_ / "model";
  fs::create_directories(bad_model);
  for (const auto& e : fs::directory_iterator(model_)) {
    fs::copy_file(e.path(), bad_model / e.path().filename());
    fs::permissions(bad_model / e.path().filename(), fs::perms::owner_read | fs::perms::owner_write);
  }
  std::fstream f(bad_model / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  uint64_t header_len = 0;
  f.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  const nlohmann::json h = nlohmann::json::parse(header);
  const auto& t = h.at("model.layers.2.self_attn.k_proj.weight");
  ASSERT_EQ(t.at("dtype"), "F32");
  const uint64_t offset = 8 + header_len + t.at("data_offsets")[0].get<uint64_t>();
  const float inf = INFINITY;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(reinterpret_cast<const char*>(&inf), sizeof inf);
  f.close();

  std::vector<std::string> a = args(dir_ / "nan.oscar");
  a[std::find(a.begin(), a.end(), "--model") - a.begin() + 1] = bad_model.string();
  const RunResult r = run_oscar(a);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("layer 2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("non-finite"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "nan.oscar"));
}

}  // namespace
}  // namespace oscar::test
