// Metrics on hand-computed distributions, retrieval prompt construction, and the report files.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "formats/error.h"
#include "formats/tokenizer.h"
#include "lib/eval/metrics.h"
#include "lib/eval/report.h"
#include "test_support.h"

namespace oscar::eval {
namespace {

TEST(Metrics, TwoTokenDistributionsByHand) {
  // Reference logits (0, ln 2) -> p = (1/3, 2/3); mode logits (0, 0) -> q = (1/2, 1/2).
  const std::vector<float> ref = {0.0f, static_cast<float>(std::log(2.0)), 5.0f, 1.0f};
  const std::vector<float> mode = {0.0f, 0.0f, 5.0f, 1.0f};
  const std::vector<int32_t> targets = {1, 0};
  const auto m = compare_positions(ref, mode, 2, targets);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_NEAR(m[0].kl, (1.0 / 3) * std::log((1.0 / 3) / 0.5) + (2.0 / 3) * std::log((2.0 / 3) / 0.5), 1e-7);
  EXPECT_NEAR(m[0].nll, std::log(2.0), 1e-7);
  EXPECT_FALSE(m[0].top1_agrees);  // argmax ref = 1; mode tie -> lowest id 0
  // Identical rows: KL 0; NLL of token 0 under softmax(5, 1) = log(1 + e^-4).
  EXPECT_EQ(m[1].kl, 0.0);
  EXPECT_NEAR(m[1].nll, std::log1p(std::exp(-4.0)), 1e-6);
  EXPECT_TRUE(m[1].top1_agrees);
  const MetricSummary s = summarize(m);
  EXPECT_EQ(s.positions, 2);
  EXPECT_NEAR(s.nll_mean, (m[0].nll + m[1].nll) / 2, 1e-12);
  EXPECT_NEAR(s.perplexity, std::exp(s.nll_mean), 1e-12);
  EXPECT_NEAR(s.kl_mean, m[0].kl / 2, 1e-12);
  EXPECT_EQ(s.kl_p99, m[0].kl);  // nearest rank: ceil(0.99 * 2) = 2nd smallest
  EXPECT_EQ(s.top1_agreement, 0.5);
  EXPECT_THROW(compare_positions(ref, mode, 2, std::vector<int32_t>{2, 0}), Error);
}

TEST(Metrics, PercentilesAndDivergence) {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);
  EXPECT_EQ(percentile_nearest_rank(v, 99), 99.0);
  EXPECT_EQ(percentile_nearest_rank(v, 50), 50.0);
  EXPECT_EQ(percentile_nearest_rank(v, 0), 1.0);
  EXPECT_EQ(percentile_nearest_rank({3, 1, 2, 5, 4}, 99), 5.0);
  EXPECT_TRUE(std::isnan(percentile_nearest_rank({}, 99)));
  EXPECT_TRUE(std::isnan(summarize({}).perplexity));
  const std::vector<int32_t> a = {1, 2, 3, 4}, b = {1, 2, 9, 4}, c = {1, 2};
  EXPECT_EQ(tokens_until_divergence(a, b), 2);
  EXPECT_EQ(tokens_until_divergence(a, a), 4);
  EXPECT_EQ(tokens_until_divergence(a, c), 2);
}

TEST(Retrieval, PromptsAreDeterministicAndHoldTheKey) {
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained/tokenizer.json");
  const auto tok = fmt::Tokenizer::load(test::fixtures_dir() / "models/qwen3-tiny-trained");
  for (RetrievalTask task : {RetrievalTask::Passkey, RetrievalTask::Needle}) {
    const RetrievalPrompt a = make_retrieval_prompt(*tok, task, 600, 0.5, 42);
    const RetrievalPrompt b = make_retrieval_prompt(*tok, task, 600, 0.5, 42);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.answer, b.answer);
    EXPECT_EQ(a.ids.size(), 600u);
    EXPECT_EQ(a.answer.size(), task == RetrievalTask::Passkey ? 5u : 7u);
    const std::string text = tok->decode(a.ids);
    EXPECT_NE(text.find(a.answer), std::string::npos);
    // The needle sits near the middle at depth 0.5, right after the intro at depth 0, before the question at 1.
    EXPECT_NEAR(static_cast<double>(a.needle_token) / 600.0, 0.5, 0.1);
    const RetrievalPrompt first = make_retrieval_prompt(*tok, task, 600, 0.0, 42);
    const RetrievalPrompt last = make_retrieval_prompt(*tok, task, 600, 1.0, 42);
    // At depth 0 the needle follows the intro directly, whatever the length.
    EXPECT_EQ(first.needle_token, make_retrieval_prompt(*tok, task, 200, 0.0, 42).needle_token);
    EXPECT_LT(first.needle_token, 60);
    EXPECT_GT(last.needle_token, 500);
    EXPECT_EQ(first.answer, a.answer);  // the key depends on the seed only
    // Other seeds give other keys (10 seeds, 90000 possible keys: a repeat would be a 1-in-2000 accident).
    std::set<std::string> keys;
    for (uint64_t s = 0; s < 10; ++s) keys.insert(make_retrieval_prompt(*tok, task, 300, 0.5, s).answer);
    EXPECT_EQ(keys.size(), 10u);
    EXPECT_THROW(make_retrieval_prompt(*tok, task, 20, 0.5, 1), Error);
  }
  EXPECT_TRUE(retrieval_success(" 12345. Remember", "12345"));
  EXPECT_FALSE(retrieval_success(" 1234 5", "12345"));
}

EvalReport sample_report() {
  EvalReport r;
  r.model = "models/m";
  r.settings = {{"modes", "bf16,int2"}, {"context", "512,1024"}};
  r.data_files = {{"a.txt", "abc"}};
  for (int64_t ctx : {512, 1024})
    for (const char* mode : {"bf16", "int2"}) {
      ModeResult m;
      m.mode = mode;
      m.context = ctx;
      m.sequences = 2;
      m.all = {1022, 2.0, std::exp(2.0), mode[0] == 'b' ? 0.0 : 0.01 * ctx / 512, 0.1, 0.97};
      m.beyond = summarize({});  // NaN statistics must survive every rendering
      m.footprint = {ctx, 100.0, 3.5, 0.5};
      r.results.push_back(m);
    }
  r.retrieval = {{"bf16", "passkey", 512, 0.0, 2, 2}, {"bf16", "passkey", 512, 1.0, 2, 1},
                 {"int2", "passkey", 512, 0.0, 2, 0}, {"int2", "passkey", 512, 1.0, 2, 1}};
  r.warnings = {"a <warning> & more"};
  return r;
}

std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(Report, FilesJsonAndSvg) {
  const auto dir = test::temp_dir_for_test();
  const EvalReport r = sample_report();
  write_report(dir, r);
  for (const char* f : {"report.json", "report.md", "report.html"}) ASSERT_TRUE(std::filesystem::exists(dir / f)) << f;
  const auto j = nlohmann::json::parse(read_text(dir / "report.json"));
  ASSERT_EQ(j["results"].size(), 4u);
  EXPECT_EQ(j["results"][3]["mode"], "int2");
  EXPECT_EQ(j["results"][3]["context"], 1024);
  EXPECT_DOUBLE_EQ(j["results"][3]["all_positions"]["kl_mean"].get<double>(), 0.02);
  EXPECT_TRUE(j["results"][3]["beyond_windows"]["perplexity"].is_null());
  EXPECT_EQ(j["retrieval"][1]["successes"], 1);
  EXPECT_FALSE(j.contains("generated_at"));
  const std::string html = read_text(dir / "report.html");
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find("<polyline"), std::string::npos);  // KL / PPL vs context lines
  EXPECT_NE(html.find("passkey / int2"), std::string::npos);  // heat map per mode
  EXPECT_NE(html.find("a &lt;warning&gt; &amp; more"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("http://www.w3.org/2000/svg\" width") != std::string::npos, true);
  const std::string md = read_text(dir / "report.md");
  EXPECT_NE(md.find("| int2 | 1024 |"), std::string::npos);
  // Deterministic: the same report gives the same bytes.
  const auto dir2 = dir / "again";
  std::filesystem::create_directories(dir2);
  write_report(dir2, r);
  for (const char* f : {"report.json", "report.md", "report.html"}) EXPECT_EQ(read_text(dir / f), read_text(dir2 / f));
  EXPECT_THROW(write_report(dir / "missing", r), Error);
  const std::string table = format_table(r);
  EXPECT_NE(table.find("int2"), std::string::npos);
  EXPECT_NE(table.find("passkey int2: 1/4 retrieved"), std::string::npos);
}

}  // namespace
}  // namespace oscar::eval
