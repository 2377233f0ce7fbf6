// `oscar eval --device cuda` at the command line, on checks that run before any device call (so they pass on a
// machine without a GPU): CPU-only modes refused naming --modes, a prefill past the sink refused naming
// --prefill-tokens, and --cpu-fallback running CPU-only modes with the device and the fallback recorded in the report.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {

const char* const kQwen = "models/qwen3-tiny-trained";
const char* const kText = "text/python-docs-heldout.txt";

std::vector<std::string> eval_args(const std::filesystem::path& out) {
  return {"eval", "--model", (fixtures_dir() / kQwen).string(), "--data", (fixtures_dir() / kText).string(),
          "--context", "192", "--num-seqs", "1", "--greedy-prompts", "0", "--sink", "16", "--recent", "64",
          "--out", out.string(), "--device", "cuda"};
}

TEST(EvalDeviceCli, RefusalsNameTheFlag) {
  OSCAR_REQUIRE_FIXTURE(kQwen);
  OSCAR_REQUIRE_FIXTURE(kText);
  const auto out = temp_dir_for_test() / "out";
  auto args = eval_args(out);
  args.insert(args.end(), {"--modes", "bf16,kivi2"});
  RunResult r = run_oscar(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
#ifdef OSCAR_HAVE_CUDA
  EXPECT_NE(r.err.find("--modes: kivi2 is cpu only"), std::string::npos) << r.err;
  args = eval_args(out);
  args.insert(args.end(), {"--modes", "bf16,int2", "--prefill-tokens", "17"});
  r = run_oscar(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("--prefill-tokens"), std::string::npos) << r.err;
#else
  EXPECT_NE(r.err.find("--device cuda"), std::string::npos) << r.err;
#endif
  EXPECT_FALSE(std::filesystem::exists(out / "report.json"));
}

#ifdef OSCAR_HAVE_CUDA
TEST(EvalDeviceCli, CpuFallbackRunsCpuOnlyModesAndSaysSo) {
  OSCAR_REQUIRE_FIXTURE(kQwen);
  OSCAR_REQUIRE_FIXTURE(kText);
  const auto out = temp_dir_for_test() / "out";
  auto args = eval_args(out);
  args.insert(args.end(), {"--modes", "kivi2", "--cpu-fallback"});  // nothing left for the engine: no device needed
  const RunResult r = run_oscar(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto report = nlohmann::json::parse(slurp(out / "report.json"));
  ASSERT_EQ(report["results"].size(), 1u);
  EXPECT_EQ(report["results"][0]["mode"], "kivi2");
  EXPECT_EQ(report["results"][0]["all_positions"]["positions"], 191);
  bool warned = false;
  for (const auto& w : report["warnings"]) warned |= w.get<std::string>().find("kivi2 ran on the CPU simulation") == 0;
  EXPECT_TRUE(warned) << report["warnings"].dump();
  bool device = false;
  for (const auto& [key, value] : report["settings"].items())
    device |= value.is_string() && value.get<std::string>().find("CPU fallback") != std::string::npos;
  EXPECT_TRUE(device) << report["settings"].dump();
}
#endif

}  // namespace
}  // namespace oscar::test
