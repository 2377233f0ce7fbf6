// Perplexity of the trained Qwen3 fixture on held-out Python documentation. The training run measured a
// validation perplexity of 14.2 on 1024-token windows of the held-out 5% (PROVENANCE.md); a forward that is
// wrong anywhere (RoPE, q/k norm, GQA mapping, bf16 widening) lands in the hundreds or thousands (uniform = 4096).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "formats/tokenizer.h"
#include "lib/model/cpu_model.h"
#include "test_support.h"

namespace oscar::model {
namespace {

TEST(Qwen3TinyTrained, HeldOutPythonDocsPerplexity) {
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained/model.safetensors.index.json");
  OSCAR_REQUIRE_FIXTURE("text/python-docs-heldout.txt");
  const auto dir = oscar::test::fixtures_dir() / "models/qwen3-tiny-trained";
  std::ifstream in(oscar::test::fixtures_dir() / "text/python-docs-heldout.txt", std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  // Training windows start anywhere in the token stream without BOS; start at a line boundary and score the
  // same way: every token after the first, given its prefix.
  const std::string all = text.str();
  const std::string snippet = all.substr(all.find('\n') + 1, 8000);

  auto tokenizer = fmt::Tokenizer::load(dir);
  std::vector<int32_t> ids = tokenizer->encode(snippet, /*add_special_tokens=*/false);
  ASSERT_GE(ids.size(), 512u);
  ids.resize(512);

  auto model = CpuModel::load(dir);
  KvCache cache(model->config(), 512);
  const std::vector<float> logits = model->forward(ids, cache);
  const int64_t vocab = model->config().vocab_size;
  double nll = 0;
  for (size_t t = 0; t + 1 < ids.size(); ++t) {
    const float* row = logits.data() + t * vocab;
    double mx = row[0], sum = 0;
    for (int64_t i = 1; i < vocab; ++i) mx = std::max<double>(mx, row[i]);
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp(row[i] - mx);
    nll += (mx + std::log(sum)) - row[ids[t + 1]];
  }
  const double ppl = std::exp(nll / static_cast<double>(ids.size() - 1));
  std::printf("qwen3-tiny-trained: perplexity %.2f on 511 held-out python-docs tokens\n", ppl);
  RecordProperty("perplexity", std::to_string(ppl));
  EXPECT_GT(ppl, 2.0);
  EXPECT_LT(ppl, 30.0);
}

}  // namespace
}  // namespace oscar::model
