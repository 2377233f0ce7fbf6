#include <gtest/gtest.h>

#include <fstream>

#include "byte_tokenizer.h"
#include "datasets/pack.h"
#include "datasets/shuffle.h"
#include "datasets/token_file.h"
#include "formats/error.h"
#include "test_support.h"

namespace oscar::data {
namespace {

using test::ByteTokenizer;
namespace fs = std::filesystem;

void write_bytes(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<int32_t> cat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

PackOptions plain(int64_t seq_len) {
  PackOptions o;
  o.seq_len = seq_len;
  o.shuffle = false;
  return o;
}

// Stream of a file with paragraphs "ab" and "cd\nef" (CRLF in the file): BOS ab BOS cd\nef = 9 tokens.
TEST(Pack, ParagraphsGetBosAndSequencesAreExactSlicesOfTheStream) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "t.txt", "ab\n\n  \ncd\r\nef\n");
  ByteTokenizer tok;
  const auto ds = pack_dataset({(dir / "t.txt").string()}, &tok, {}, plain(4));
  const auto expected_stream = cat({{1}, ByteTokenizer::ids("ab"), {1}, ByteTokenizer::ids("cd\nef")});
  ASSERT_EQ(expected_stream.size(), 9u);
  EXPECT_EQ(ds.num_seqs(), 2);  // floor(9 / 4)
  EXPECT_EQ(ds.tokens, std::vector<int32_t>(expected_stream.begin(), expected_stream.begin() + 8));
  EXPECT_EQ(ds.stats.stream_tokens, 9);
  EXPECT_EQ(ds.stats.sequences_available, 2);
  EXPECT_EQ(ds.stats.dropped_tail_tokens, 1);
  EXPECT_EQ(ds.stats.documents, 2);
  EXPECT_EQ(ds.stats.separator, std::optional<int32_t>(1));
  ASSERT_EQ(ds.files.size(), 1u);
  EXPECT_EQ(ds.files[0].documents, 2);
  EXPECT_EQ(ds.files[0].tokens, 9);
  EXPECT_EQ(ds.files[0].bytes, 14u);
  EXPECT_EQ(std::vector<int32_t>(ds.sequence(1).begin(), ds.sequence(1).end()),
            std::vector<int32_t>(expected_stream.begin() + 4, expected_stream.begin() + 8));
}

TEST(Pack, LineAndFileSplits) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "t.txt", "\xEF\xBB\xBFx\ny\n\nz");  // BOM, no trailing newline
  ByteTokenizer tok;
  SourceOptions by_line;
  by_line.text_split = TextSplit::Line;
  auto ds = pack_dataset({(dir / "t.txt").string()}, &tok, by_line, plain(1));
  EXPECT_EQ(ds.tokens, cat({{1}, ByteTokenizer::ids("x"), {1}, ByteTokenizer::ids("y"), {1}, ByteTokenizer::ids("z")}));
  SourceOptions whole;
  whole.text_split = TextSplit::File;
  ds = pack_dataset({(dir / "t.txt").string()}, &tok, whole, plain(1));
  EXPECT_EQ(ds.tokens, cat({{1}, ByteTokenizer::ids("x\ny\n\nz")}));
  EXPECT_EQ(ds.stats.documents, 1);
}

TEST(Pack, SeparatorPolicy) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "t.txt", "a\n\nb\n");
  const std::string f = (dir / "t.txt").string();
  ByteTokenizer no_bos(std::nullopt, 2);  // Qwen/GPT-2 style: EOS separates documents
  EXPECT_EQ(pack_dataset({f}, &no_bos, {}, plain(1)).tokens, cat({{2}, ByteTokenizer::ids("a"), {2}, ByteTokenizer::ids("b")}));
  ByteTokenizer none(std::nullopt, std::nullopt);
  EXPECT_EQ(pack_dataset({f}, &none, {}, plain(1)).tokens, ByteTokenizer::ids("ab"));
  ByteTokenizer tok;
  PackOptions explicit_sep = plain(1);
  explicit_sep.doc_separator = 0;
  EXPECT_EQ(pack_dataset({f}, &tok, {}, explicit_sep).tokens, cat({{0}, ByteTokenizer::ids("a"), {0}, ByteTokenizer::ids("b")}));
  PackOptions off = plain(1);
  off.use_separator = false;
  EXPECT_EQ(pack_dataset({f}, &tok, {}, off).tokens, ByteTokenizer::ids("ab"));
  PackOptions bad = plain(1);
  bad.doc_separator = 259;
  EXPECT_THROW(pack_dataset({f}, &tok, {}, bad), Error);
}

TEST(Pack, JsonlSkipsBadLinesWithTheirLineNumbers) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "d.jsonl",
              "{\"text\": \"hi\"}\n"         // 1 ok
              "{not json\n"                  // 2 bad
              "{\"other\": \"x\"}\n"         // 3 no field
              "{\"text\": 5}\n"              // 4 not a string
              "[\"text\"]\n"                 // 5 not an object
              "\n"                           // 6 blank: ignored
              "{\"text\": \"\xff\"}\n"       // 7 invalid UTF-8
              "{\"text\": \"yo\\n\", \"id\": 2}\n");  // 8 ok, escape decoded
  ByteTokenizer tok;
  const auto ds = pack_dataset({(dir / "d.jsonl").string()}, &tok, {}, plain(1));
  EXPECT_EQ(ds.tokens, cat({{1}, ByteTokenizer::ids("hi"), {1}, ByteTokenizer::ids("yo\n")}));
  EXPECT_EQ(ds.stats.documents, 2);
  EXPECT_EQ(ds.stats.bad_jsonl_lines, 5);
  ASSERT_EQ(ds.stats.warnings.size(), 5u);
  const std::string prefix = (dir / "d.jsonl").string() + ":";
  const int lines[] = {2, 3, 4, 5, 7};
  for (int i = 0; i < 5; ++i)
    EXPECT_EQ(ds.stats.warnings[i].rfind(prefix + std::to_string(lines[i]) + ": ", 0), 0u) << ds.stats.warnings[i];
  EXPECT_NE(ds.stats.warnings[1].find("no field \"text\""), std::string::npos);

  SourceOptions other_field;
  other_field.jsonl_field = "other";
  const auto ds2 = pack_dataset({(dir / "d.jsonl").string()}, &tok, other_field, plain(1));
  EXPECT_EQ(ds2.tokens, cat({{1}, ByteTokenizer::ids("x")}));
  EXPECT_EQ(ds2.stats.bad_jsonl_lines, 6);
}

TEST(Pack, InvalidUtf8LinesAreCountedNotSilentlyDropped) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "t.txt", "ok\n\xff bad\nfine\n\xc0\x80\n");
  ByteTokenizer tok;
  const auto ds = pack_dataset({(dir / "t.txt").string()}, &tok, {}, plain(1));
  EXPECT_EQ(ds.stats.invalid_utf8_lines, 2);
  ASSERT_EQ(ds.stats.warnings.size(), 2u);
  EXPECT_NE(ds.stats.warnings[0].find("t.txt:2: invalid UTF-8"), std::string::npos);
  EXPECT_NE(ds.stats.warnings[1].find("t.txt:4: invalid UTF-8"), std::string::npos);
  // The skipped lines do not end the paragraph: "ok" and "fine" stay one document.
  EXPECT_EQ(ds.tokens, cat({{1}, ByteTokenizer::ids("ok\nfine")}));
}

TEST(Pack, DirectoriesAndGlobsAreSortedAndFiltered) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "b.txt", "B");
  write_bytes(dir / "a.txt", "A");
  write_bytes(dir / "sub" / "c.jsonl", "{\"text\": \"C\"}\n");
  write_bytes(dir / ".hidden.txt", "H");
  write_bytes(dir / ".git" / "x.txt", "G");
  write_bytes(dir / "notes.csv", "N");
  ByteTokenizer tok;
  const auto ds = pack_dataset({dir.string()}, &tok, {}, plain(1));
  EXPECT_EQ(ds.tokens, cat({{1}, ByteTokenizer::ids("A"), {1}, ByteTokenizer::ids("B"), {1}, ByteTokenizer::ids("C")}));
  ASSERT_EQ(ds.files.size(), 3u);
  EXPECT_EQ(ds.files[2].path, (dir / "sub" / "c.jsonl").string());
  EXPECT_EQ(ds.files[2].format, SourceFormat::Jsonl);

  const auto globbed = expand_sources({(dir / "*.txt").string(), (dir / "sub").string()});
  ASSERT_EQ(globbed.size(), 3u);
  EXPECT_EQ(globbed[0], dir / "a.txt");
  EXPECT_EQ(globbed[1], dir / "b.txt");
  EXPECT_EQ(globbed[2], dir / "sub" / "c.jsonl");
}

TEST(Pack, TokenFilesAreAppendedVerbatimAndCheckedAgainstTheVocabulary) {
  const auto dir = test::temp_dir_for_test();
  write_token_file(dir / "a.u32", std::vector<int32_t>{7, 8, 9});
  write_bytes(dir / "b.txt", "z");
  ByteTokenizer tok;
  auto ds = pack_dataset({(dir / "a.u32").string(), (dir / "b.txt").string()}, &tok, {}, plain(5));
  EXPECT_EQ(ds.tokens, cat({{7, 8, 9}, {1}, ByteTokenizer::ids("z")}));
  // Token files need no tokenizer; text files do.
  EXPECT_EQ(pack_dataset({(dir / "a.u32").string()}, nullptr, {}, plain(3)).tokens, (std::vector<int32_t>{7, 8, 9}));
  EXPECT_THROW(pack_dataset({(dir / "b.txt").string()}, nullptr, {}, plain(1)), Error);
  write_token_file(dir / "big.u32", std::vector<int32_t>{1, 259});
  try {
    pack_dataset({(dir / "big.u32").string()}, &tok, {}, plain(1));
    ADD_FAILURE() << "id 259 accepted with vocab 259";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), (dir / "big.u32").string());
  }
  // --format tokens reads any extension as a token file.
  fs::copy_file(dir / "a.u32", dir / "a.dat");
  SourceOptions as_tokens;
  as_tokens.format = SourceFormat::Tokens;
  EXPECT_EQ(pack_dataset({(dir / "a.dat").string()}, &tok, as_tokens, plain(3)).tokens, (std::vector<int32_t>{7, 8, 9}));
}

TEST(Pack, ShuffleIsTheSeededPermutationOfTheUnshuffledSequences) {
  const auto dir = test::temp_dir_for_test();
  std::vector<int32_t> ids(100);
  for (int i = 0; i < 100; ++i) ids[i] = i;
  write_token_file(dir / "s.u32", ids);
  const std::vector<std::string> spec = {(dir / "s.u32").string()};
  PackOptions opt = plain(7);  // 14 sequences, 2 tokens dropped
  const auto base = pack_dataset(spec, nullptr, {}, opt);
  ASSERT_EQ(base.num_seqs(), 14);
  EXPECT_EQ(base.stats.dropped_tail_tokens, 2);
  opt.shuffle = true;
  opt.seed = 1234;
  const auto a = pack_dataset(spec, nullptr, {}, opt);
  const auto b = pack_dataset(spec, nullptr, {}, opt);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_NE(a.tokens, base.tokens);
  const auto order = shuffled_indices(14, 1234);
  for (int64_t i = 0; i < 14; ++i)
    for (int64_t t = 0; t < 7; ++t) ASSERT_EQ(a.sequence(i)[t], order[i] * 7 + t);
  opt.seed = 1235;
  EXPECT_NE(pack_dataset(spec, nullptr, {}, opt).tokens, a.tokens);
  // --num-seqs keeps a prefix of the shuffled order.
  opt.seed = 1234;
  opt.num_seqs = 3;
  const auto three = pack_dataset(spec, nullptr, {}, opt);
  EXPECT_EQ(three.tokens, std::vector<int32_t>(a.tokens.begin(), a.tokens.begin() + 21));
}

TEST(Pack, NumSeqsWithoutShuffleStopsReadingEarly) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "1.txt", "abcdef");
  write_bytes(dir / "2.txt", "ghijkl");
  ByteTokenizer tok;
  PackOptions opt = plain(3);
  opt.num_seqs = 2;
  const auto ds = pack_dataset({(dir / "1.txt").string(), (dir / "2.txt").string()}, &tok, {}, opt);
  EXPECT_EQ(ds.tokens, cat({{1}, ByteTokenizer::ids("abcde")}));
  EXPECT_TRUE(ds.stats.stopped_early);
  EXPECT_EQ(ds.files.size(), 1u);
}

TEST(Pack, RecordsSha256OfEachFile) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "abc.txt", "abc");
  ByteTokenizer tok;
  const auto ds = pack_dataset({(dir / "abc.txt").string()}, &tok, {}, plain(1));
  // FIPS 180-2 appendix B.1 test vector.
  EXPECT_EQ(ds.files.at(0).sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Pack, ErrorsNameTheFileOrFlag) {
  const auto dir = test::temp_dir_for_test();
  ByteTokenizer tok;
  auto where_of = [&](const std::vector<std::string>& specs, const PackOptions& opt) -> std::string {
    try {
      pack_dataset(specs, &tok, {}, opt);
    } catch (const Error& e) {
      return e.where();
    }
    return "<no error>";
  };
  const std::string missing = (dir / "missing.txt").string();
  EXPECT_EQ(where_of({missing}, plain(4)), missing);
  const std::string nomatch = (dir / "*.nothing").string();
  EXPECT_EQ(where_of({nomatch}, plain(4)), nomatch);
  write_bytes(dir / "empty.txt", "");
  EXPECT_EQ(where_of({(dir / "empty.txt").string()}, plain(4)), (dir / "empty.txt").string());
  write_bytes(dir / "short.txt", "ab");  // 3 tokens with BOS: no sequence of 4
  try {
    pack_dataset({(dir / "short.txt").string()}, &tok, {}, plain(4));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(e.detail().find("not enough tokens"), std::string::npos);
    EXPECT_NE(e.detail().find("3 tokens"), std::string::npos);
  }
  EXPECT_EQ(where_of({(dir / "short.txt").string()}, plain(0)), "--seq-len");
  PackOptions neg = plain(1);
  neg.num_seqs = -1;
  EXPECT_EQ(where_of({(dir / "short.txt").string()}, neg), "--num-seqs");
  fs::create_directories(dir / "emptydir");
  EXPECT_EQ(where_of({(dir / "emptydir").string()}, plain(1)), (dir / "emptydir").string());
  EXPECT_EQ(where_of({}, plain(1)), "--data");
}

// With the real SentencePiece vocabulary of the TinyStories model, packing one sentence must give exactly the
// ids transformers produced for it (golden file: BOS + encoding).
TEST(PackFixture, MatchesTransformersIdsForTheGoldenPrompt) {
  OSCAR_REQUIRE_FIXTURE("models/tinystories-llama2c-280k-hf/tokenizer.json");
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "p.txt", "Once upon a time, there was a little girl named Lily.\n");
  auto tok = fmt::Tokenizer::load(test::fixtures_dir() / "models/tinystories-llama2c-280k-hf");
  const auto ds = pack_dataset({(dir / "p.txt").string()}, tok.get(), {}, plain(16));
  const std::vector<int32_t> golden = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426};
  EXPECT_EQ(ds.tokens, golden);
  EXPECT_EQ(ds.stats.dropped_tail_tokens, 0);
}

TEST(PackFixture, TinyStoriesSampleHasNoSkippedLines) {
  OSCAR_REQUIRE_FIXTURE("text/tinystories-sample.txt");
  OSCAR_REQUIRE_FIXTURE("models/tinystories-llama2c-280k-hf/tokenizer.json");
  auto tok = fmt::Tokenizer::load(test::fixtures_dir() / "models/tinystories-llama2c-280k-hf");
  PackOptions opt;
  opt.seq_len = 128;
  opt.num_seqs = 8;
  opt.seed = 3;
  const auto ds = pack_dataset({(test::fixtures_dir() / "text/tinystories-sample.txt").string()}, tok.get(), {}, opt);
  EXPECT_EQ(ds.num_seqs(), 8);
  EXPECT_EQ(ds.stats.invalid_utf8_lines, 0);
  // Blocks of non-blank lines, counted independently: awk '{if(NF>0&&p==0)c++;p=NF}END{print c}'
  EXPECT_EQ(ds.stats.documents, 1230);
  EXPECT_EQ(ds.files.at(0).sha256, "727e8b228375be3075114c20729c93ed6e81ae5d8fe7faf7cb54b304f0322d70");
  for (int32_t id : ds.tokens) ASSERT_TRUE(id >= 0 && id < 512);
}

}  // namespace
}  // namespace oscar::data
