#include "lib/calib/rotation.h"

#include <lapacke.h>
#include <fmt/format.h>

#include <bit>
#include <cmath>

#include "formats/error.h"

namespace oscar::calib {

bool is_power_of_two(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

std::vector<double> hadamard(int64_t n) {
  if (!is_power_of_two(n)) throw Error("hadamard", ::fmt::format("size {} is not a power of two", n));
  const double scale = 1.0 / std::sqrt(static_cast<double>(n));
  std::vector<double> h(static_cast<size_t>(n * n));
  // The Sylvester recursion [[H, H], [H, −H]] unrolled: the sign is the parity of the shared set bits.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      h[i * n + j] = (std::popcount(static_cast<uint64_t>(i & j)) & 1) ? -scale : scale;
  return h;
}

std::vector<int64_t> bit_reversal_permutation(int64_t n) {
  if (!is_power_of_two(n)) throw Error("bit_reversal_permutation", ::fmt::format("size {} is not a power of two", n));
  const int bits = std::countr_zero(static_cast<uint64_t>(n));
  std::vector<int64_t> br(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int64_t r = 0;
    for (int b = 0; b < bits; ++b)
      if (i & (int64_t{1} << b)) r |= int64_t{1} << (bits - 1 - b);
    br[i] = r;
  }
  return br;
}

SymmetricEigen symmetric_eigen(std::span<const double> sigma, int64_t d, const std::string& where) {
  if (d <= 0 || static_cast<int64_t>(sigma.size()) != d * d)
    throw Error(where, ::fmt::format("expected a [{0}, {0}] matrix, got {1} values", d, sigma.size()));
  // Symmetrizing makes the row/column-major question moot for the input; LAPACK then writes eigenvectors as the
  // columns of a column-major matrix, i.e. eigenvector j is the contiguous run a[j*d, (j+1)*d).
  std::vector<double> a(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      const double v = 0.5 * (sigma[i * d + j] + sigma[j * d + i]);
      if (!std::isfinite(v)) throw Error(where, ::fmt::format("non-finite covariance entry ({}, {})", i, j));
      a[i * d + j] = v;
    }
  std::vector<double> w(static_cast<size_t>(d));
  const lapack_int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', static_cast<lapack_int>(d), a.data(),
                                         static_cast<lapack_int>(d), w.data());
  if (info != 0) throw Error(where, ::fmt::format("LAPACK dsyevd failed (info = {})", info));
  return eigen_from_ascending(w, a, d);
}

SymmetricEigen eigen_from_ascending(std::span<const double> w, std::span<const double> a, int64_t d) {
  if (d <= 0 || static_cast<int64_t>(w.size()) != d || static_cast<int64_t>(a.size()) != d * d)
    throw Error("eigen_from_ascending", ::fmt::format("expected {0} values and [{0}, {0}] vectors", d));
  SymmetricEigen out;
  out.dim = d;
  out.values.resize(static_cast<size_t>(d));
  out.vectors.resize(static_cast<size_t>(d * d));
  for (int64_t j = 0; j < d; ++j) {
    const int64_t src = d - 1 - j;  // ascending -> descending
    const double* v = a.data() + src * d;
    int64_t arg = 0;
    for (int64_t i = 1; i < d; ++i)
      if (std::abs(v[i]) > std::abs(v[arg])) arg = i;
    const double sign = v[arg] < 0 ? -1.0 : 1.0;
    out.values[j] = w[src];
    for (int64_t i = 0; i < d; ++i) out.vectors[i * d + j] = sign * v[i];
  }
  return out;
}

std::string_view rotation_kind_name(RotationKind k) {
  switch (k) {
    case RotationKind::None: return "none";
    case RotationKind::Hadamard: return "hadamard";
    case RotationKind::Eigen: return "eigen";
    case RotationKind::EigenHadamard: return "oscar";
  }
  return "unknown";
}

std::string oscar_composition_name(int64_t d) { return is_power_of_two(d) ? "eigen*hadamard*bitrev" : "eigen"; }

std::vector<double> build_rotation(RotationKind kind, const SymmetricEigen& eig, int64_t d) {
  const size_t n = static_cast<size_t>(d * d);
  if (kind == RotationKind::None) {
    std::vector<double> r(n, 0.0);
    for (int64_t i = 0; i < d; ++i) r[i * d + i] = 1.0;
    return r;
  }
  if (kind == RotationKind::Hadamard) return hadamard(d);
  if (eig.dim != d || eig.vectors.size() != n)
    throw Error("build_rotation", ::fmt::format("eigenvectors of dim {} for a rotation of dim {}", eig.dim, d));
  if (kind == RotationKind::Eigen || !is_power_of_two(d)) return eig.vectors;

  // R = U_asc · H · P_br. U_asc column m is U_desc column d−1−m, and σ (descending argsort over ascending
  // indices) is m ↦ d−1−m, so column j of R is column d−1−br(j) of U_asc·H.
  const std::vector<double> h = hadamard(d);
  const std::vector<int64_t> br = bit_reversal_permutation(d);
  std::vector<double> uh(n, 0.0);  // U_asc · H
  for (int64_t r = 0; r < d; ++r)
    for (int64_t m = 0; m < d; ++m) {
      const double u = eig.vectors[r * d + (d - 1 - m)];
      for (int64_t c = 0; c < d; ++c) uh[r * d + c] += u * h[m * d + c];
    }
  std::vector<double> out(n);
  for (int64_t r = 0; r < d; ++r)
    for (int64_t j = 0; j < d; ++j) out[r * d + j] = uh[r * d + (d - 1 - br[j])];
  return out;
}

double orthogonality_error(std::span<const double> r, int64_t d) {
  double worst = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += r[i * d + k] * r[j * d + k];
      worst = std::max(worst, std::abs(dot - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

}  // namespace oscar::calib
