#pragma once
// oscar::Error — the one exception type host code throws. It always says *where* (a file, a tensor, a flag)
// and *what* is wrong, so the CLI can print one clear line and exit non-zero.
#include <stdexcept>
#include <string>
#include <utility>

namespace oscar {

class Error : public std::runtime_error {
 public:
  Error(std::string where, std::string what)
      : std::runtime_error(where.empty() ? what : where + ": " + what),
        where_(std::move(where)),
        what_(std::move(what)) {}
  // The file, tensor or option the error is about (may be empty for purely internal errors).
  const std::string& where() const noexcept { return where_; }
  // The problem, without the location prefix.
  const std::string& detail() const noexcept { return what_; }

 private:
  std::string where_;
  std::string what_;
};

}  // namespace oscar
