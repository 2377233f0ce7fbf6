// End-to-end tests of the `oscar` executable: real fixtures, real golden files from transformers, and the error
// contract (exit 1 + one line naming the file, exit 2 for usage errors, no partial outputs).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "formats/safetensors.h"
#include "oscar_version.h"
#include "run_oscar.h"
#include "test_support.h"

namespace oscar::test {
namespace {
namespace fs = std::filesystem;

const char* kTiny = "models/tinystories-llama2c-280k-hf";
const char* kQwen = "models/qwen3-tiny-trained";
const char* kTinyKvGolden = "golden/tinystories-llama2c-280k-hf-kv.safetensors";
const char* kTinyGolden = "golden/tinystories-llama2c-280k-hf.json";

std::string model(const char* rel) { return (fixtures_dir() / rel).string(); }

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(slurp(p)); }

std::string join_ids(const std::vector<int64_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

std::vector<int64_t> golden_input_ids(const fmt::SafetensorsFile& golden) {
  const auto* t = golden.find("input_ids");
  EXPECT_NE(t, nullptr);
  std::vector<int64_t> ids(static_cast<size_t>(t->numel()));
  std::memcpy(ids.data(), t->data, t->nbytes);
  return ids;
}

float max_abs_diff(const fmt::TensorView& a, const fmt::TensorView& b) {
  EXPECT_EQ(a.shape, b.shape) << a.name << " vs " << b.name;
  if (a.shape != b.shape) return INFINITY;
  const auto x = fmt::to_f32(a), y = fmt::to_f32(b);
  float m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

TEST(CliBasics, VersionAndUsageErrors) {
  auto r = run_oscar({"--version"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find(OSCAR_VERSION_STRING), std::string::npos) << r.out;

  r = run_oscar({});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  r = run_oscar({"info"});  // --model missing
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--model"), std::string::npos) << r.err;
  r = run_oscar({"info", "--model", "x", "--no-such-flag"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  r = run_oscar({"forward", "--model", "x", "--ids", "1", "--prompt", "a"});  // mutually exclusive
  EXPECT_EQ(r.exit_code, 2);
  r = run_oscar({"forward", "--model", "x"});  // neither --ids nor --prompt
  EXPECT_EQ(r.exit_code, 2);
  r = run_oscar({"info", "--model", "x", "--device", "tpu"});
  EXPECT_EQ(r.exit_code, 2);
}

TEST(CliInfo, TinyStoriesDimensionsAndParameterCount) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  auto r = run_oscar({"info", "--model", model(kTiny), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(j["num_layers"], 5);
  EXPECT_EQ(j["num_heads"], 8);
  EXPECT_EQ(j["num_kv_heads"], 4);
  EXPECT_EQ(j["head_dim"], 8);
  EXPECT_EQ(j["parameters"], 279232);  // PROVENANCE.md table, from the llama2.c header
  // K and V, 5 layers x 4 KV heads x 8 dims, 2 bytes each.
  EXPECT_EQ(j["kv_cache"]["bf16_bytes_per_token"].get<double>(), 2.0 * 5 * 4 * 8 * 2);

  r = run_oscar({"info", "--model", model(kTiny)});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("8 query, 4 KV"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("279,232"), std::string::npos) << r.out;
}

TEST(CliInfo, Qwen3KvCacheSizesFollowTheInt2Format) {
  OSCAR_REQUIRE_FIXTURE(kQwen);
  const auto r = run_oscar({"info", "--model", model(kQwen), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["num_layers"], 6);
  EXPECT_EQ(j["num_heads"], 4);
  EXPECT_EQ(j["num_kv_heads"], 2);
  EXPECT_EQ(j["head_dim"], 128);
  // Analytic parameter count from config.json (tied embeddings, q/k-norm):
  const int64_t H = 512, V = 4096, I = 1024, d = 128, L = 6;
  const int64_t per_layer = H * 4 * d + 2 * H * 2 * d + 4 * d * H + 2 * d + 3 * H * I + 2 * H;
  EXPECT_EQ(j["parameters"], V * H + L * per_layer + H);
  // INT2 over a 128-dim head with one fp16 scale + fp16 zero per token: 2 + 32/128 bits per element.
  const auto& kv = j["kv_cache"];
  EXPECT_DOUBLE_EQ(kv["int2_k_bits_per_element"].get<double>(), 2.25);
  EXPECT_DOUBLE_EQ(kv["int2_v_bits_per_element"].get<double>(), 2.25);
  const double bf16_pt = 2.0 * L * 2 * d * 2, int2_pt = 2.0 * L * 2 * d * 2.25 / 8;
  EXPECT_DOUBLE_EQ(kv["bf16_bytes_per_token"].get<double>(), bf16_pt);
  EXPECT_DOUBLE_EQ(kv["int2_bytes_per_token"].get<double>(), int2_pt);
  ASSERT_EQ(kv["contexts"].size(), 3u);
  const auto& c4k = kv["contexts"][0];
  EXPECT_EQ(c4k["context"], 4096);
  // 64 sink + 256 recent tokens stay BF16.
  EXPECT_DOUBLE_EQ(c4k["int2_bytes"].get<double>(), 320 * bf16_pt + (4096 - 320) * int2_pt);
}

TEST(CliForward, DumpMatchesTransformersGolden) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  OSCAR_REQUIRE_FIXTURE(kTinyKvGolden);
  const auto golden = fmt::SafetensorsFile::open(fixtures_dir() / kTinyKvGolden);
  const auto ids = golden_input_ids(*golden);
  const auto dump = temp_dir_for_test() / "dump.safetensors";
  const auto r = run_oscar({"forward", "--model", model(kTiny), "--ids", join_ids(ids), "--dump", dump.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto ours = fmt::SafetensorsFile::open(dump);
  ASSERT_NE(ours->find("logits"), nullptr);
  EXPECT_LE(max_abs_diff(*ours->find("logits"), *golden->find("logits")), 1e-3f);
  for (int l = 0; l < 5; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    ASSERT_NE(ours->find(p + "k"), nullptr) << p;
    EXPECT_LE(max_abs_diff(*ours->find(p + "k"), *golden->find(p + "key")), 1e-3f) << p;
    EXPECT_LE(max_abs_diff(*ours->find(p + "v"), *golden->find(p + "value")), 1e-3f) << p;
  }
  EXPECT_NE(ours->metadata().at("command").find("forward"), std::string::npos);
  EXPECT_EQ(ours->metadata().at("model"), model(kTiny));
}

TEST(CliForward, CudaDeviceWithoutAGpuIsOneErrorLineAndNoDump) {
  // On a machine without a usable GPU (CI) `--device cuda` must fail before loading anything, naming the flag,
  // and leave no dump behind. Where a GPU is present the GPU test CliForwardGpu runs the real thing.
  OSCAR_REQUIRE_FIXTURE(kTiny);
  const auto dump = temp_dir_for_test() / "cuda.safetensors";
  const auto r = run_oscar({"forward", "--model", model(kTiny), "--ids", "1,403", "--device", "cuda", "--dump",
                            dump.string()});
  if (r.exit_code == 0) GTEST_SKIP() << "a CUDA device is present: tests/gpu covers --device cuda";
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("--device cuda"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dump));
}

TEST(CliForward, RandomWeightsRefusalsNameTheFlag) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  const auto dump = temp_dir_for_test() / "random.safetensors";
  // The random model is built on the GPU only.
  auto r = run_oscar({"forward", "--model", model(kTiny), "--ids", "1,2", "--random-weights", "--dump", dump.string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("--random-weights"), std::string::npos) << r.err;
  // A config file has no tokenizer: --prompt is refused before any device work.
  const std::string config = (test_data_dir().parent_path().parent_path() / "bench/configs/qwen3-8b.json").string();
  ASSERT_TRUE(std::filesystem::is_regular_file(config)) << config;
  r = run_oscar({"forward", "--model", config, "--prompt", "a", "--random-weights", "--device", "cuda"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("--prompt"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dump));
}

TEST(CliForward, PromptIsTokenizedLikeTransformers) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  OSCAR_REQUIRE_FIXTURE(kTinyKvGolden);
  const auto golden = fmt::SafetensorsFile::open(fixtures_dir() / kTinyKvGolden);
  const std::string prompt = golden->metadata().at("prompt");
  const auto dump = temp_dir_for_test() / "p.safetensors";
  const auto r = run_oscar({"forward", "--model", model(kTiny), "--prompt", prompt, "--dump", dump.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto ours = fmt::SafetensorsFile::open(dump);
  const auto* ids = ours->find("input_ids");
  ASSERT_NE(ids, nullptr);
  const auto expected = golden_input_ids(*golden);
  ASSERT_EQ(ids->numel(), static_cast<int64_t>(expected.size()));
  for (size_t i = 0; i < expected.size(); ++i)
    EXPECT_EQ(reinterpret_cast<const int32_t*>(ids->data)[i], expected[i]) << i;
  EXPECT_LE(max_abs_diff(*ours->find("logits"), *golden->find("logits")), 1e-3f);

  const auto t = run_oscar({"tokenize", "--model", model(kTiny), "--text", prompt});
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_EQ(nlohmann::json::parse(t.out).get<std::vector<int64_t>>(), expected);
}

TEST(CliGenerate, GreedyContinuationMatchesTransformers) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  OSCAR_REQUIRE_FIXTURE(kTinyGolden);
  const auto golden = read_json(fixtures_dir() / kTinyGolden);
  const auto& p = golden["prompts"][0];
  auto r = run_oscar({"generate", "--model", model(kTiny), "--prompt", p["text"].get<std::string>(),
                      "--max-new-tokens", "32", "--ignore-eos", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["prompt_ids"], p["input_ids"]);
  EXPECT_EQ(j["new_ids"], p["greedy_32"]);
  // Streaming mode prints the prompt and the same continuation as text.
  r = run_oscar({"generate", "--model", model(kTiny), "--prompt", p["text"].get<std::string>(), "--max-new-tokens",
                 "32", "--ignore-eos", "--log-level", "off"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, p["text"].get<std::string>() + p["greedy_32_text"].get<std::string>() + "\n");
  EXPECT_EQ(r.err, "");
}

// Several prompts (the GPU engine's batch; the CPU reference runs them one by one): each gets the continuation it
// gets alone, in --json's "sequences" array and as "=== sequence i ===" blocks otherwise.
TEST(CliGenerate, SeveralPromptsEachGetTheirOwnContinuation) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  OSCAR_REQUIRE_FIXTURE(kTinyGolden);
  const auto golden = read_json(fixtures_dir() / kTinyGolden);
  const auto& p0 = golden["prompts"][0];
  const auto& p1 = golden["prompts"][1];
  auto r = run_oscar({"generate", "--model", model(kTiny), "--prompt", p0["text"].get<std::string>(), "--prompt",
                      p1["text"].get<std::string>(), "--max-new-tokens", "32", "--ignore-eos", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["sequences"].size(), 2u);
  EXPECT_EQ(j["sequences"][0]["prompt_ids"], p0["input_ids"]);
  EXPECT_EQ(j["sequences"][0]["new_ids"], p0["greedy_32"]);
  EXPECT_EQ(j["sequences"][1]["prompt_ids"], p1["input_ids"]);
  EXPECT_EQ(j["sequences"][1]["new_ids"], p1["greedy_32"]);
  r = run_oscar({"generate", "--model", model(kTiny), "--prompt", p0["text"].get<std::string>(), "--prompt",
                 p1["text"].get<std::string>(), "--max-new-tokens", "32", "--ignore-eos", "--log-level", "off"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "=== sequence 0 ===\n" + p0["text"].get<std::string>() + p0["greedy_32_text"].get<std::string>() +
                       "\n=== sequence 1 ===\n" + p1["text"].get<std::string>() +
                       p1["greedy_32_text"].get<std::string>() + "\n");
}

TEST(CliErrors, MissingModelDirectory) {
  const auto missing = (temp_dir_for_test() / "no-such-model").string();
  for (const char* cmd : {"info", "forward", "generate", "tokenize"}) {
    std::vector<std::string> args = {cmd, "--model", missing};
    if (std::string(cmd) == "forward") args.insert(args.end(), {"--ids", "1"});
    if (std::string(cmd) == "generate") args.insert(args.end(), {"--prompt", "a"});
    if (std::string(cmd) == "tokenize") args.insert(args.end(), {"--text", "a"});
    const auto r = run_oscar(args);
    EXPECT_EQ(r.exit_code, 1) << cmd;
    EXPECT_TRUE(is_one_error_line(r.err)) << cmd << ": " << r.err;
    EXPECT_NE(r.err.find(missing), std::string::npos) << cmd << ": " << r.err;
  }
}

TEST(CliErrors, GenerateEfContextIsCheckedBeforeAnyWork) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  for (const auto& [value, detail] : std::vector<std::pair<std::string, std::string>>{
           {"12x", "is not auto, bundle or a positive count"},
           {"0", "is not auto, bundle or a positive count"},
           {"128", "needs --bundle and --device cuda"}}) {
    const auto r = run_oscar({"generate", "--model", model(kTiny), "--prompt", "a", "--ef-context", value});
    EXPECT_EQ(r.exit_code, 1) << value;
    EXPECT_TRUE(is_one_error_line(r.err)) << value << ": " << r.err;
    EXPECT_NE(r.err.find("--ef-context"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(detail), std::string::npos) << r.err;
  }
}

TEST(CliErrors, CorruptConfigIsNamed) {
  const auto dir = temp_dir_for_test() / "model";
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << "{ \"hidden_size\": 64, oops";
  const auto dump = dir.parent_path() / "out.safetensors";
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"info", "--model", dir.string()},
           {"forward", "--model", dir.string(), "--ids", "1,2", "--dump", dump.string()}}) {
    const auto r = run_oscar(args);
    EXPECT_EQ(r.exit_code, 1) << args[0];
    EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
    EXPECT_NE(r.err.find((dir / "config.json").string()), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(dump));
}

TEST(CliErrors, UnwritableDumpLeavesNothingBehind) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  const auto dir = temp_dir_for_test();
  std::ofstream(dir / "plain-file") << "x";
  const std::vector<fs::path> bad = {dir / "missing-dir" / "d.safetensors", dir / "plain-file" / "d.safetensors"};
  for (const auto& target : bad) {
    const auto r = run_oscar({"forward", "--model", model(kTiny), "--ids", "1,403", "--dump", target.string()});
    EXPECT_EQ(r.exit_code, 1) << target;
    EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
    EXPECT_NE(r.err.find(target.string()), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(target));
  }
  // A directory as the target: refused, and the directory is left as it was (no temp files inside or beside it).
  fs::create_directories(dir / "adir");
  const auto r = run_oscar({"forward", "--model", model(kTiny), "--ids", "1,403", "--dump", (dir / "adir").string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(fs::is_empty(dir / "adir"));
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++entries;
  EXPECT_EQ(entries, 2u);  // plain-file and adir only
}

TEST(CliErrors, BadIdsAndCudaDevice) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  auto r = run_oscar({"forward", "--model", model(kTiny), "--ids", "1,512"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("--ids"), std::string::npos) << r.err;
  r = run_oscar({"forward", "--model", model(kTiny), "--ids", "1,x"});
  EXPECT_EQ(r.exit_code, 1);
  r = run_oscar({"info", "--model", model(kTiny), "--device", "cuda"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("CUDA forward not available"), std::string::npos) << r.err;
  r = run_oscar({"tokenize", "--model", model(kTiny), "--file", (temp_dir_for_test() / "nope.txt").string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("nope.txt"), std::string::npos) << r.err;
}

// `oscar eval`'s comma lists (--context, --passkey-lengths: positive integers; --passkey-depths: percentages) fail on
// the first bad item, naming the flag and the item, before any evaluation runs.
TEST(CliErrors, EvalListItemsAreNamed) {
  OSCAR_REQUIRE_FIXTURE(kTiny);
  OSCAR_REQUIRE_FIXTURE("text/tinystories-sample.txt");
  const auto out = temp_dir_for_test() / "eval";
  const std::vector<std::string> base = {"eval", "--model", model(kTiny), "--data",
                                         (fixtures_dir() / "text/tinystories-sample.txt").string(), "--modes", "bf16",
                                         "--num-seqs", "1", "--greedy-prompts", "0", "--out", out.string()};
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--context", "64,,128"}, "--context: '' is not a positive integer"},
      {{"--context", "64", "--passkey", "--passkey-lengths", "64,0"}, "--passkey-lengths: '0' is not a positive integer"},
      {{"--context", "64", "--passkey", "--passkey-depths", "50,x"}, "--passkey-depths: 'x' is not a percentage"},
      {{"--context", "64", "--passkey", "--passkey-depths", "50,100.5"}, "--passkey-depths: '100.5' is not a percentage"},
      {{"--context", "64", "--passkey", "--passkey-depths", "25,50%"}, "--passkey-depths: '50%' is not a percentage"},
  };
  for (const auto& [extra, message] : cases) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    const RunResult r = run_oscar(args);
    EXPECT_EQ(r.exit_code, 1) << message;
    EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out / "report.json")) << message;
  }
}

TEST(CliSynth, DeterministicLoadableCheckpoints) {
  const auto dir = temp_dir_for_test();
  for (const char* arch : {"qwen3", "llama"}) {
    const auto a = dir / (std::string(arch) + "-a"), b = dir / (std::string(arch) + "-b"),
               c = dir / (std::string(arch) + "-c");
    ASSERT_EQ(run_oscar({"synth", "--out", a.string(), "--arch", arch, "--seed", "7"}).exit_code, 0);
    ASSERT_EQ(run_oscar({"synth", "--out", b.string(), "--arch", arch, "--seed", "7"}).exit_code, 0);
    ASSERT_EQ(run_oscar({"synth", "--out", c.string(), "--arch", arch, "--seed", "8", "--layers", "3"}).exit_code, 0);
    EXPECT_EQ(slurp(a / "model.safetensors"), slurp(b / "model.safetensors")) << arch;
    EXPECT_NE(slurp(a / "model.safetensors"), slurp(c / "model.safetensors")) << arch;

    auto r = run_oscar({"info", "--model", c.string(), "--json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["num_layers"], 3);
    EXPECT_EQ(j["hidden_size"], 128);
    EXPECT_EQ(j["head_dim"], 32);
    EXPECT_EQ(j["qk_norm"], std::string(arch) == "qwen3");
    EXPECT_EQ(j["vocab_size"], 273);  // <|endoftext|> + 256 bytes + 16 merges
    EXPECT_EQ(j["tokenizer"]["vocab_size"], 273);

    // Byte b is id 1 + b; merge rank r is id 257 + r ("he" rank 1, "Ġthe" rank 2): "the the" -> t, he, Ġthe.
    r = run_oscar({"tokenize", "--model", a.string(), "--text", "the the"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(nlohmann::json::parse(r.out), nlohmann::json({1 + 't', 258, 259}));

    const auto dump = dir / (std::string(arch) + ".safetensors");
    r = run_oscar({"forward", "--model", a.string(), "--prompt", "the cat", "--dump", dump.string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto f = fmt::SafetensorsFile::open(dump);
    // "the cat" -> t, he, Ġc, a, t (no BOS: the ByteLevel post-processor adds none).
    EXPECT_EQ(f->find("logits")->shape, (std::vector<int64_t>{5, 273}));
    EXPECT_EQ(f->find("layers.1.k")->shape, (std::vector<int64_t>{2, 5, 32}));
    for (float x : fmt::to_f32(*f->find("logits"))) ASSERT_TRUE(std::isfinite(x));
  }
  const auto r = run_oscar({"synth", "--out", (dir / "qwen3-a" / "config.json").string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(is_one_error_line(r.err)) << r.err;
}

}  // namespace
}  // namespace oscar::test
