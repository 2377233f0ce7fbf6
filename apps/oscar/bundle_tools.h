#pragma once
// What the bundle publishing commands (inspect, verify, diff, export) share: rotation diagnostics, principal
// subspace angles, recovery of the eigenbasis from a stored OSCAR rotation, and the V-rotation fold into a
// checkpoint's v_proj / o_proj weights.
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "formats/bundle.h"

namespace oscar::app {

// max |RᵀR − I| over one d×d row-major rotation, in fp64 (columns orthonormal; for a square matrix the same
// property as rows orthonormal, but this is the product the fold relies on).
double rotation_orthogonality_error(std::span<const float> r, int64_t d);

// Whether eigenbasis_of_rotation can recover the eigenvectors of a bundle with this composition ("hadamard",
// "none" and "spectral" — an ordered basis with per-segment mixes — store no invertible eigenbasis).
bool has_eigenbasis(const std::string& composition);
// The eigenvectors (columns, eigenvalue descending) a stored rotation was built from, row-major [d, d].
// "eigen": R itself. "eigen*hadamard*bitrev": R = U_asc·H·P_br (lib/calib/rotation.h) is inverted exactly:
// column j of R is column d−1−br(j) of U_asc·H, and H·H = I. Throws oscar::Error(where) for other compositions.
std::vector<double> eigenbasis_of_rotation(std::span<const float> r, int64_t d, const std::string& composition,
                                           const std::string& where);

// Principal angles (radians, ascending) between span(A[:, :k]) and span(B[:, :k]) for row-major [d, d] A and B:
// the singular values of A_kᵀ·B_k (LAPACKE dgesvd) are the cosines. Both bases must be orthonormal.
std::vector<double> principal_angles(std::span<const double> a, std::span<const double> b, int64_t d, int64_t k);

// Which rotation group serves KV head `kv_head`: groups is 1 (shared) or num_kv_heads (per head).
inline int64_t rotation_group_of(int64_t kv_head, int64_t groups) { return groups == 1 ? 0 : kv_head; }

struct FoldReport {
  std::vector<std::filesystem::path> files_written;  // every file of the new checkpoint directory
  int64_t tensors_changed = 0;                        // v_proj weights/biases and o_proj weights
};

// Writes a copy of the Hugging Face checkpoint `model_dir` into `out_dir` (created if absent) with each layer's
// V rotation folded into its weights, so the unmodified model code produces v' = v·R_v and the same outputs:
//   v_proj rows of KV head h:       W' = R_vᵀ·W   (and bias b' = b·R_v)
//   o_proj columns of query head j: W' = W·R_v    (R_v of the KV head j / group_size serves)
// Tensors keep their dtype (bf16/fp16 are rounded to nearest even from the fp32 product); other tensors and
// every non-weight file are copied byte for byte; every file is written atomically. Throws oscar::Error when the
// bundle's fingerprint does not match the checkpoint (shapes or attention weights) or out_dir == model_dir.
FoldReport fold_v_rotation(const fmt::Bundle& bundle, const std::filesystem::path& model_dir,
                           const std::filesystem::path& out_dir);

std::string human_bytes(double bytes);

// Creates `dir` (and parents) unless it exists; throws oscar::Error(flag: dir) when it cannot (a file is in the
// way, no permission).
void ensure_output_dir(const std::filesystem::path& dir, const std::string& flag);

}  // namespace oscar::app
