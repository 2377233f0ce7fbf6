#pragma once
// Rotations of a head vector: y = x · R with x a row vector and R orthogonal [d, d], row-major, fp64.
//
// OSCAR's rotation (the published "r_h_pbr" composition, docs/method.md):
//     R = U_asc · H · P_br
//   U_asc  eigenvectors of Σ as columns, ascending eigenvalue order (the order LAPACK dsyevd and torch.eigh return)
//   H      the normalized Sylvester Hadamard matrix (H·Hᵀ = I)
//   P_br   the column permutation with column j = e_{σ(br(j))}: σ sorts eigen-indices by eigenvalue descending and
//          br is the bit-reversal of log2(d) bits; so column j of R is column σ(br(j)) of U_asc·H.
// When d is not a power of two there is no Sylvester Hadamard: R = U_desc (eigenvectors, descending), and the
// bundle records the composition "eigen".
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace oscar::calib {

bool is_power_of_two(int64_t n);

// Normalized Sylvester Hadamard H_n, row-major [n, n]: H[i][j] = (−1)^popcount(i & j) / √n. n must be 2^k.
std::vector<double> hadamard(int64_t n);

// br[i] = i with its log2(n) bits reversed; n must be 2^k. An involution, hence a permutation.
std::vector<int64_t> bit_reversal_permutation(int64_t n);

// Eigen-decomposition of a symmetric matrix, eigenvalues descending.
struct SymmetricEigen {
  int64_t dim = 0;
  std::vector<double> values;   // [d], descending
  std::vector<double> vectors;  // row-major [d, d]; column j is the unit eigenvector of values[j]
};

// LAPACK dsyevd on (Σ + Σᵀ)/2 (row-major [d, d]). Sign convention, so bundles are byte-identical across runs:
// the largest-magnitude component of each eigenvector is positive (first such index on ties). Equal eigenvalues
// keep LAPACK's ascending order reversed. Throws oscar::Error(where, ...) when LAPACK fails or Σ is not finite.
SymmetricEigen symmetric_eigen(std::span<const double> sigma, int64_t d, const std::string& where);

// The sign and order convention above applied to a solver's raw output: `ascending_values` [d] and the matching
// unit eigenvectors as the columns of a column-major [d, d] matrix (what LAPACK dsyevd and cuSOLVER syevd write),
// so every eigensolver (CPU LAPACK, GPU cuSOLVER) yields the same SymmetricEigen for the same spectrum.
SymmetricEigen eigen_from_ascending(std::span<const double> ascending_values,
                                    std::span<const double> column_major_vectors, int64_t d);

// The rotations the error report compares.
enum class RotationKind {
  None,           // identity
  Hadamard,       // H (2^k only)
  Eigen,          // U_desc
  EigenHadamard,  // OSCAR: U_asc · H · P_br (falls back to U_desc when d is not 2^k)
};
std::string_view rotation_kind_name(RotationKind k);  // "none", "hadamard", "eigen", "oscar"

// Builds R [d, d] row-major. `eig` is needed for Eigen/EigenHadamard (may be empty otherwise).
// Throws oscar::Error for Hadamard with d not a power of two.
std::vector<double> build_rotation(RotationKind kind, const SymmetricEigen& eig, int64_t d);

// The composition actually used for EigenHadamard at this head_dim: "eigen*hadamard*bitrev" or "eigen".
std::string oscar_composition_name(int64_t d);

// max |R·Rᵀ − I| (a diagnostic and a test helper).
double orthogonality_error(std::span<const double> r, int64_t d);

}  // namespace oscar::calib
