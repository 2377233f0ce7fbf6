#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "datasets/token_file.h"
#include "formats/error.h"
#include "test_support.h"

namespace oscar::data {
namespace {

void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}
std::string le64(uint64_t v) { return le32(static_cast<uint32_t>(v)) + le32(static_cast<uint32_t>(v >> 32)); }

TEST(TokenFile, ReadsRawLittleEndianIds) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "raw.u32", le32(1) + le32(258) + le32(70000) + le32(0));
  EXPECT_EQ(read_token_file(dir / "raw.u32"), (std::vector<int32_t>{1, 258, 70000, 0}));
}

TEST(TokenFile, ReadsTheDocumentedHeaderLayout) {
  const auto dir = test::temp_dir_for_test();
  write_bytes(dir / "h.bin", std::string("OSCARTOK", 8) + le32(1) + le32(0) + le64(3) + le32(5) + le32(6) + le32(7));
  EXPECT_EQ(read_token_file(dir / "h.bin"), (std::vector<int32_t>{5, 6, 7}));
}

TEST(TokenFile, WriterProducesTheDocumentedBytes) {
  const auto dir = test::temp_dir_for_test();
  const std::vector<int32_t> ids = {9, 0, 123456};
  write_token_file(dir / "w.u32", ids);
  std::ifstream in(dir / "w.u32", std::ios::binary);
  const std::string got((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(got, std::string("OSCARTOK", 8) + le32(1) + le32(0) + le64(3) + le32(9) + le32(0) + le32(123456));
  EXPECT_EQ(read_token_file(dir / "w.u32"), ids);
}

TEST(TokenFile, RejectsMalformedFilesNamingThem) {
  const auto dir = test::temp_dir_for_test();
  auto expect_error = [&](const std::string& name, const std::string& bytes, const std::string& needle) {
    write_bytes(dir / name, bytes);
    try {
      read_token_file(dir / name);
      ADD_FAILURE() << name << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.where(), (dir / name).string());
      EXPECT_NE(e.detail().find(needle), std::string::npos) << e.what();
    }
  };
  expect_error("odd.u32", "abcde", "multiple of 4");
  expect_error("count.u32", std::string("OSCARTOK", 8) + le32(1) + le32(0) + le64(5) + le32(1), "header says 5");
  expect_error("version.u32", std::string("OSCARTOK", 8) + le32(2) + le32(0) + le64(0), "version 2");
  expect_error("short.u32", std::string("OSCARTOK", 8) + le32(1), "truncated");
  expect_error("big.u32", le32(0x80000000u), "above int32");
  EXPECT_THROW(read_token_file(dir / "absent.u32"), Error);
  EXPECT_THROW(write_token_file(dir / "neg.u32", std::vector<int32_t>{1, -1}), Error);
  EXPECT_FALSE(std::filesystem::exists(dir / "neg.u32"));
}

}  // namespace
}  // namespace oscar::data
