// safetensors reader/writer: round trips, every hostile header we promise to reject (built byte by byte here),
// sharded stores, conversions, and the real fixture checkpoints/golden files.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "formats/dtype.h"
#include "formats/error.h"
#include "formats/safetensors.h"
#include "test_support.h"

namespace oscar::fmt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file from raw parts: the stated header length (defaults to the real one), header text, data.
std::string st_bytes(const std::string& header, size_t data_bytes, std::optional<uint64_t> stated_len = {}) {
  std::string data(data_bytes, '\x11');
  return u64_le(stated_len.value_or(header.size())) + header + data;
}

::testing::AssertionResult rejects(const fs::path& file, std::initializer_list<std::string> keywords,
                                   const std::string& where_contains = "") {
  try {
    SafetensorsFile::open(file);
    return ::testing::AssertionFailure() << file << " was accepted";
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.find(file.string()) == std::string::npos || e.where().find(file.string()) == std::string::npos)
      return ::testing::AssertionFailure() << "error does not name the file: " << what;
    for (const auto& k : keywords)
      if (what.find(k) == std::string::npos) return ::testing::AssertionFailure() << "'" << k << "' not in: " << what;
    if (!where_contains.empty() && e.where().find(where_contains) == std::string::npos)
      return ::testing::AssertionFailure() << "where() lacks '" << where_contains << "': " << e.where();
    return ::testing::AssertionSuccess() << what;
  }
}

class SafetensorsHostile : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = test::temp_dir_for_test(); }
  fs::path file(const std::string& name, const std::string& bytes) {
    fs::path p = dir_ / name;
    write_bytes(p, bytes);
    return p;
  }
  fs::path dir_;
};

TEST_F(SafetensorsHostile, TooShortForHeaderLength) {
  EXPECT_TRUE(rejects(file("empty.safetensors", ""), {"too short"}));
  EXPECT_TRUE(rejects(file("seven.safetensors", std::string(7, '\0')), {"7 bytes", "too short"}));
}

TEST_F(SafetensorsHostile, HeaderLengthBeyondFileOrLimit) {
  EXPECT_TRUE(rejects(file("beyond.safetensors", st_bytes("{}", 0, 1000)), {"header length 1000", "file size"}));
  EXPECT_TRUE(rejects(file("huge.safetensors", st_bytes("{}", 0, kMaxSafetensorsHeader + 1)), {"limit"}));
  EXPECT_TRUE(rejects(file("u64max.safetensors", st_bytes("{}", 0, ~uint64_t{0})), {"limit"}));
}

TEST_F(SafetensorsHostile, MalformedOrNonObjectJson) {
  EXPECT_TRUE(rejects(file("trunc.safetensors", st_bytes(R"({"a": {"dtype": "F32")", 0)), {"not valid JSON"}));
  EXPECT_TRUE(rejects(file("garbage.safetensors", st_bytes("\xff\xfe{}", 0)), {"not valid JSON"}));
  EXPECT_TRUE(rejects(file("array.safetensors", st_bytes("[1, 2]", 0)), {"not an object"}));
  EXPECT_TRUE(rejects(file("entry.safetensors", st_bytes(R"({"w": 5})", 0)), {"not an object"}, "tensor w"));
}

TEST_F(SafetensorsHostile, MissingFields) {
  EXPECT_TRUE(rejects(file("nodtype.safetensors", st_bytes(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4)),
                      {"missing 'dtype'"}, "tensor w"));
  EXPECT_TRUE(rejects(file("noshape.safetensors", st_bytes(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4)),
                      {"missing 'shape'"}, "tensor w"));
  EXPECT_TRUE(rejects(file("nooffs.safetensors", st_bytes(R"({"w": {"dtype": "F32", "shape": [1]}})", 4)),
                      {"missing 'data_offsets'"}, "tensor w"));
}

TEST_F(SafetensorsHostile, UnknownDtype) {
  EXPECT_TRUE(rejects(file("dtype.safetensors",
                           st_bytes(R"({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}})", 1)),
                      {"unknown dtype 'F4'"}, "tensor w"));
}

TEST_F(SafetensorsHostile, BadShapes) {
  EXPECT_TRUE(rejects(file("neg.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4)),
                      {"shape[0]", "negative"}, "tensor w"));
  EXPECT_TRUE(rejects(file("frac.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}})", 10)),
                      {"shape[0]", "integer"}, "tensor w"));
  EXPECT_TRUE(rejects(file("str.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}})", 4)),
                      {"shape[0]", "integer"}, "tensor w"));
  EXPECT_TRUE(rejects(file("notarray.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", 4)),
                      {"shape is not an array"}, "tensor w"));
  // 2^32 * 2^32 elements wraps to 0 in 64 bits; a zero-byte range must not sneak it through.
  EXPECT_TRUE(rejects(file("overflow.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})",
                                    0)),
                      {"overflow"}, "tensor w"));
  // numel fits but numel * 8 bytes does not.
  EXPECT_TRUE(rejects(file("overflow2.safetensors",
                           st_bytes(R"({"w": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 0]}})",
                                    0)),
                      {"overflow"}, "tensor w"));
}

TEST_F(SafetensorsHostile, BadOffsets) {
  EXPECT_TRUE(rejects(file("out.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4)),
                      {"out of the data section"}, "tensor w"));
  EXPECT_TRUE(rejects(file("reversed.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 8)),
                      {"begin 8 > end 4"}, "tensor w"));
  EXPECT_TRUE(rejects(file("negoff.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4)),
                      {"data_offsets[0]", "negative"}, "tensor w"));
  EXPECT_TRUE(rejects(file("pair.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})", 8)),
                      {"[begin, end] pair"}, "tensor w"));
  EXPECT_TRUE(rejects(file("overlap.safetensors",
                           st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                    12)),
                      {"overlap"}, "tensor b"));
  EXPECT_TRUE(rejects(file("alias.safetensors",
                           st_bytes(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                                    4)),
                      {"overlap"}));
  EXPECT_TRUE(rejects(file("gap.safetensors",
                           st_bytes(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                                    12)),
                      {"gap", "[4, 8)"}, "tensor b"));
  EXPECT_TRUE(rejects(file("lead.safetensors",
                           st_bytes(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", 8)),
                      {"gap", "[0, 4)"}, "tensor a"));
  EXPECT_TRUE(rejects(file("tail.safetensors",
                           st_bytes(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 9)),
                      {"gap", "after the last tensor"}));
}

TEST_F(SafetensorsHostile, ByteSizeDisagreesWithShape) {
  EXPECT_TRUE(rejects(file("size.safetensors",
                           st_bytes(R"({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 4]}})", 4)),
                      {"needs 6"}, "tensor w"));
}

TEST_F(SafetensorsHostile, DuplicateNames) {
  // nlohmann would silently keep the second entry; the two readers of such a file would disagree.
  EXPECT_TRUE(rejects(file("dup.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                        "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                                    8)),
                      {"duplicate key 'w'"}));
  EXPECT_TRUE(rejects(file("dupfield.safetensors",
                           st_bytes(R"({"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}})",
                                    4)),
                      {"duplicate key 'dtype'"}));
}

TEST_F(SafetensorsHostile, MetadataMustBeStrings) {
  EXPECT_TRUE(rejects(file("meta.safetensors", st_bytes(R"({"__metadata__": {"format": "pt", "n": 3}})", 0)),
                      {"__metadata__", "'n'", "not a string"}));
  EXPECT_TRUE(rejects(file("meta2.safetensors", st_bytes(R"({"__metadata__": ["pt"]})", 0)),
                      {"__metadata__", "not an object"}));
}

TEST_F(SafetensorsHostile, MinimalValidFilesAreAccepted) {
  // The counterpart of the cases above: the smallest legal files, padded header, zero-size and scalar tensors.
  auto f = SafetensorsFile::open(file("empty_ok.safetensors", st_bytes("{}      ", 0)));
  EXPECT_TRUE(f->tensors().empty());
  f = SafetensorsFile::open(
      file("ok.safetensors", st_bytes(R"({"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                                         "s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}})",
                                      8)));
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->find("e")->numel(), 0);
  EXPECT_EQ(f->find("s")->numel(), 1);
  EXPECT_EQ(f->find("missing"), nullptr);
}

// ---------------------------------------------------------------------------------------------------------------

TEST(Safetensors, WriteReadRoundTripAndLayout) {
  const fs::path dir = test::temp_dir_for_test();
  const fs::path path = dir / "out.safetensors";
  const std::vector<float> w = {1.5f, -2.25f, 3.0f, 0.0f, -0.0f, 1e-30f};
  const std::vector<uint16_t> h = {0x3c00, 0xc000, 0x7bff};  // F16: 1, -2, 65504
  const std::vector<int64_t> ids = {1, -7, 1LL << 40};
  const std::vector<float> empty;
  std::vector<TensorToWrite> tensors;
  tensors.push_back(f32_tensor("z.weight", {2, 3}, w));
  tensors.push_back({"a.half", DType::F16, {3}, std::as_bytes(std::span(h))});
  tensors.push_back({"m.ids", DType::I64, {3}, std::as_bytes(std::span(ids))});
  tensors.push_back(f32_tensor("e.empty", {0, 4}, empty));
  write_safetensors(path, tensors, {{"format", "pt"}, {"note", "round trip"}});

  // Layout, read independently of our reader: 8-byte-aligned header, sorted contiguous offsets.
  const std::string bytes = read_bytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  const json header = json::parse(bytes.substr(8, header_len));
  EXPECT_EQ(header["__metadata__"]["note"], "round trip");
  EXPECT_EQ(header["a.half"]["data_offsets"], json::array({0, 6}));
  EXPECT_EQ(header["e.empty"]["data_offsets"], json::array({6, 6}));
  EXPECT_EQ(header["m.ids"]["data_offsets"], json::array({6, 30}));
  EXPECT_EQ(header["z.weight"]["data_offsets"], json::array({30, 54}));
  EXPECT_EQ(bytes.size(), 8 + header_len + 54);
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + header_len + 30, w.data(), 24), 0);

  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  ASSERT_EQ(file->tensors().size(), 4u);
  const TensorView* z = file->find("z.weight");
  ASSERT_NE(z, nullptr);
  EXPECT_EQ(z->dtype, DType::F32);
  EXPECT_EQ(z->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(z->dim(-1), 3);
  EXPECT_EQ(to_f32(*z), w);
  EXPECT_EQ(to_f32(*file->find("a.half")), (std::vector<float>{1.0f, -2.0f, 65504.0f}));
  const TensorView* m = file->find("m.ids");
  ASSERT_EQ(m->nbytes, 24u);
  EXPECT_EQ(std::memcmp(m->data, ids.data(), 24), 0);
  EXPECT_EQ(file->find("e.empty")->numel(), 0);

  // Nothing but the output is left in the directory (no temp file).
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(Safetensors, WriterRefusesInconsistentTensors) {
  const fs::path path = test::temp_dir_for_test() / "bad.safetensors";
  const std::vector<float> v(4, 1.0f);
  EXPECT_THROW(f32_tensor("w", {3}, v), Error);
  std::vector<TensorToWrite> dup{f32_tensor("w", {4}, v), f32_tensor("w", {2, 2}, v)};
  EXPECT_THROW(write_safetensors(path, dup), Error);
  std::vector<TensorToWrite> size{{"w", DType::F16, {4}, std::as_bytes(std::span(v))}};
  EXPECT_THROW(write_safetensors(path, size), Error);
  EXPECT_FALSE(fs::exists(path));
}

TEST(Safetensors, Conversions) {
  const fs::path path = test::temp_dir_for_test() / "conv.safetensors";
  // 1 + 2^-8 + 2^-30 lies just above a bf16 tie; via fp32 it would become the tie and round down to 1.0.
  const std::vector<double> d = {1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30), -0.1, 3.0e38 * 10.0, 0.5};
  const std::vector<uint16_t> bf = {0x3f80, 0xc049, 0x7f80};  // 1, -3.140625, inf
  const std::vector<float> f = {0.1f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f};
  const std::vector<int32_t> ints = {1, 2};
  write_safetensors(path, {{"d", DType::F64, {4}, std::as_bytes(std::span(d))},
                           {"bf", DType::BF16, {3}, std::as_bytes(std::span(bf))},
                           f32_tensor("f", {3}, f),
                           {"i", DType::I32, {2}, std::as_bytes(std::span(ints))}});
  auto file = SafetensorsFile::open(path);
  const TensorView& dv = *file->find("d");
  EXPECT_EQ(to_bf16(dv), (std::vector<uint16_t>{0x3f81, 0xbdcd, 0x7f80, 0x3f00}));
  const auto df = to_f32(dv);
  EXPECT_EQ(df[1], -0.1f);
  EXPECT_TRUE(std::isinf(df[2]));
  EXPECT_EQ(to_f32(*file->find("bf")), (std::vector<float>{1.0f, -3.140625f, INFINITY}));
  EXPECT_EQ(to_bf16(*file->find("bf")), bf);
  EXPECT_EQ(to_bf16(*file->find("f")), (std::vector<uint16_t>{0x3dcd, 0x3f80, 0x3f82}));  // ties to even

  std::vector<float> slice(2);
  to_f32_range(*file->find("bf"), 1, slice);
  EXPECT_EQ(slice, (std::vector<float>{-3.140625f, INFINITY}));
  EXPECT_THROW(to_f32_range(*file->find("bf"), 2, slice), Error);
  EXPECT_THROW(to_f32_range(*file->find("bf"), -1, slice), Error);
  std::vector<float> wrong(2);
  EXPECT_THROW(to_f32(*file->find("f"), wrong), Error);
  try {
    to_f32(*file->find("i"));
    FAIL() << "integers must be refused";
  } catch (const Error& e) {
    EXPECT_NE(e.where().find("tensor i"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("I32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(to_bf16(*file->find("i")), Error);
}

// ---------------------------------------------------------------------------------------------------------------

class ShardedStore : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::temp_dir_for_test();
    write_safetensors(dir_ / "s1.safetensors", {f32_tensor("a", {2}, a_), f32_tensor("b", {1}, b_)});
    write_safetensors(dir_ / "s2.safetensors", {f32_tensor("c", {3}, c_)});
  }
  void write_index(const json& weight_map) {
    write_bytes(dir_ / "model.safetensors.index.json", json{{"metadata", {{"total_size", 24}}},
                                                            {"weight_map", weight_map}}
                                                           .dump(2));
  }
  ::testing::AssertionResult store_rejects(std::initializer_list<std::string> keywords) {
    try {
      TensorStore::open(dir_);
      return ::testing::AssertionFailure() << "accepted";
    } catch (const Error& e) {
      for (const auto& k : keywords)
        if (std::string(e.what()).find(k) == std::string::npos)
          return ::testing::AssertionFailure() << "'" << k << "' not in: " << e.what();
      return ::testing::AssertionSuccess();
    }
  }
  fs::path dir_;
  std::vector<float> a_{1, 2}, b_{3}, c_{4, 5, 6};
};

TEST_F(ShardedStore, OpensAllShards) {
  write_index({{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s2.safetensors"}});
  TensorStore store = TensorStore::open(dir_);
  EXPECT_EQ(store.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(store.files().size(), 2u);
  EXPECT_EQ(to_f32(store.get("c")), c_);
  EXPECT_EQ(store.get("c").file, dir_ / "s2.safetensors");
  EXPECT_TRUE(store.contains("a"));
  EXPECT_FALSE(store.contains("d"));
  try {
    store.get("d");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), dir_.string() + ": tensor d");
    EXPECT_EQ(e.detail(), "not found");
  }
  // A moved store keeps valid views (they live in the shared files).
  const TensorStore moved = std::move(store);
  EXPECT_EQ(to_f32(moved.get("a")), a_);
}

TEST_F(ShardedStore, MissingShard) {
  write_index({{"a", "s1.safetensors"}, {"c", "s3.safetensors"}});
  EXPECT_TRUE(store_rejects({"s3.safetensors", "model.safetensors.index.json", "does not exist"}));
}

TEST_F(ShardedStore, TensorListedButAbsent) {
  write_index({{"a", "s1.safetensors"}, {"c", "s1.safetensors"}});
  EXPECT_TRUE(store_rejects({"s1.safetensors", "tensor c", "absent"}));
}

TEST_F(ShardedStore, NameInTwoShards) {
  write_safetensors(dir_ / "s2.safetensors", {f32_tensor("a", {2}, a_), f32_tensor("c", {3}, c_)});
  write_index({{"a", "s1.safetensors"}, {"c", "s2.safetensors"}});
  EXPECT_TRUE(store_rejects({"tensor a", "two shards", "s1.safetensors", "s2.safetensors"}));
}

TEST_F(ShardedStore, ShardOutsideTheDirectory) {
  write_index({{"a", "../s1.safetensors"}});
  EXPECT_TRUE(store_rejects({"../s1.safetensors", "not a file name"}));
}

TEST_F(ShardedStore, DirectoryWithoutCheckpoint) {
  EXPECT_TRUE(store_rejects({dir_.string(), "model.safetensors"}));
  EXPECT_THROW(TensorStore::open(dir_ / "nope"), Error);
}

TEST_F(ShardedStore, SingleFileAndSingleFileDirectory) {
  const TensorStore file_store = TensorStore::open(dir_ / "s1.safetensors");
  EXPECT_EQ(file_store.names(), (std::vector<std::string>{"a", "b"}));
  fs::copy_file(dir_ / "s2.safetensors", dir_ / "model.safetensors");
  write_index({{"a", "missing.safetensors"}});  // model.safetensors takes precedence, as in transformers
  EXPECT_EQ(TensorStore::open(dir_).names(), (std::vector<std::string>{"c"}));
}

// ---------------------------------------------------------------------------------------------------------------

TEST(SafetensorsFixtures, Qwen3TinyShardedCheckpoint) {
  OSCAR_REQUIRE_FIXTURE("models/qwen3-tiny-trained/model.safetensors.index.json");
  const fs::path dir = test::fixtures_dir() / "models/qwen3-tiny-trained";
  const json index = json::parse(read_bytes(dir / "model.safetensors.index.json"));
  const json config = json::parse(read_bytes(dir / "config.json"));
  const TensorStore store = TensorStore::open(dir);
  EXPECT_EQ(store.files().size(), 3u);
  EXPECT_EQ(store.names().size(), index["weight_map"].size());
  uint64_t total = 0;
  for (const auto& name : store.names()) {
    const TensorView& t = store.get(name);
    EXPECT_EQ(t.dtype, DType::BF16) << name;
    EXPECT_EQ(t.file.filename().string(), index["weight_map"][name].get<std::string>()) << name;
    total += t.nbytes;
  }
  EXPECT_EQ(total, index["metadata"]["total_size"].get<uint64_t>());

  const int64_t hidden = config["hidden_size"], heads = config["num_attention_heads"];
  const int64_t kv = config["num_key_value_heads"], hd = config["head_dim"];
  const int64_t inter = config["intermediate_size"], vocab = config["vocab_size"];
  EXPECT_EQ(store.get("model.embed_tokens.weight").shape, (std::vector<int64_t>{vocab, hidden}));
  EXPECT_EQ(store.get("model.layers.0.self_attn.q_proj.weight").shape, (std::vector<int64_t>{heads * hd, hidden}));
  EXPECT_EQ(store.get("model.layers.5.self_attn.k_proj.weight").shape, (std::vector<int64_t>{kv * hd, hidden}));
  EXPECT_EQ(store.get("model.layers.3.self_attn.o_proj.weight").shape, (std::vector<int64_t>{hidden, heads * hd}));
  EXPECT_EQ(store.get("model.layers.2.self_attn.k_norm.weight").shape, (std::vector<int64_t>{hd}));
  EXPECT_EQ(store.get("model.layers.4.mlp.down_proj.weight").shape, (std::vector<int64_t>{hidden, inter}));
  EXPECT_FALSE(store.contains("lm_head.weight"));  // tied

  // bf16 -> fp32 is exact: to_bf16 of the fp32 values must give back the stored bits.
  const TensorView& norm = store.get("model.norm.weight");
  const auto values = to_f32(norm);
  const auto bits = to_bf16(norm);
  std::vector<uint16_t> stored(norm.numel());
  std::memcpy(stored.data(), norm.data, norm.nbytes);
  EXPECT_EQ(bits, stored);
  for (size_t i = 0; i < values.size(); ++i) ASSERT_EQ(f32_to_bf16(values[i]), stored[i]);
}

TEST(SafetensorsFixtures, LlamaHfCheckpointsMatchTheirConfigs) {
  for (const char* name : {"aidreams-llama2c-260k-hf", "tinystories-llama2c-280k-hf", "karpathy-stories-llama2c-260k-hf"}) {
    const fs::path dir = test::fixtures_dir() / "models" / name;
    if (!fs::exists(dir / "model.safetensors")) GTEST_SKIP() << "fixture not found: " << dir;
    const json config = json::parse(read_bytes(dir / "config.json"));
    const TensorStore store = TensorStore::open(dir);
    const int64_t layers = config["num_hidden_layers"], hidden = config["hidden_size"];
    EXPECT_EQ(store.names().size(), static_cast<size_t>(9 * layers + 2)) << name;
    EXPECT_EQ(store.files().front()->metadata().at("format"), "pt");
    const int64_t kv_dim = config["num_key_value_heads"].get<int64_t>() * config["head_dim"].get<int64_t>();
    EXPECT_EQ(store.get("model.layers.0.self_attn.k_proj.weight").shape, (std::vector<int64_t>{kv_dim, hidden}));
    EXPECT_EQ(store.get("model.layers.0.mlp.up_proj.weight").shape,
              (std::vector<int64_t>{config["intermediate_size"].get<int64_t>(), hidden}));
  }
}

TEST(SafetensorsFixtures, GoldenKvFilesAgreeWithGoldenJson) {
  for (const char* name : {"aidreams-llama2c-260k-hf", "tinystories-llama2c-280k-hf", "karpathy-stories-llama2c-260k-hf"}) {
    const fs::path kv_path = test::fixtures_dir() / "golden" / (std::string(name) + "-kv.safetensors");
    const fs::path json_path = test::fixtures_dir() / "golden" / (std::string(name) + ".json");
    if (!fs::exists(kv_path) || !fs::exists(json_path)) GTEST_SKIP() << "fixture not found: " << kv_path;
    const json golden = json::parse(read_bytes(json_path));
    const json config = json::parse(read_bytes(test::fixtures_dir() / "models" / name / "config.json"));
    const json& prompt = golden["prompts"][0];
    auto file = SafetensorsFile::open(kv_path);
    EXPECT_EQ(file->metadata().at("prompt"), prompt["text"].get<std::string>());

    const TensorView& ids = *file->find("input_ids");
    ASSERT_EQ(ids.dtype, DType::I64);
    const auto expected_ids = prompt["input_ids"].get<std::vector<int64_t>>();
    const int64_t T = static_cast<int64_t>(expected_ids.size());
    ASSERT_EQ(ids.shape, (std::vector<int64_t>{T}));
    std::vector<int64_t> stored_ids(T);
    std::memcpy(stored_ids.data(), ids.data, ids.nbytes);
    EXPECT_EQ(stored_ids, expected_ids) << name;

    const int64_t layers = config["num_hidden_layers"], kv = config["num_key_value_heads"];
    const int64_t hd = config["head_dim"], vocab = config["vocab_size"];
    for (int64_t l = 0; l < layers; ++l)
      for (const char* part : {"key", "value"}) {
        const TensorView* t = file->find("layers." + std::to_string(l) + "." + part);
        ASSERT_NE(t, nullptr);
        EXPECT_EQ(t->shape, (std::vector<int64_t>{kv, T, hd}));
      }
    // The last row of the stored logits is the golden json's final_logits (rounded there to 4 decimals).
    const TensorView& logits = *file->find("logits");
    ASSERT_EQ(logits.shape, (std::vector<int64_t>{T, vocab}));
    std::vector<float> last(vocab);
    to_f32_range(logits, (T - 1) * vocab, last);
    const auto rounded = prompt["final_logits"].get<std::vector<double>>();
    ASSERT_EQ(rounded.size(), static_cast<size_t>(vocab));
    for (int64_t v = 0; v < vocab; ++v) ASSERT_NEAR(last[v], rounded[v], 5.01e-5) << name << " vocab " << v;
  }
}

}  // namespace
}  // namespace oscar::fmt
