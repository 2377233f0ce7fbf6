#pragma once
// Per-layer clip ratios: a grid search minimizing the attention-aware error (lib/calib/error_report.h) on held-out
// data. K and V are tuned independently (the key error does not depend on the value clip and vice versa).
// Ties go to the larger ratio (less clipping), so a flat error curve keeps the data unclipped.
#include <cstdint>
#include <vector>

#include "lib/calib/error_report.h"

namespace oscar::calib {

struct ClipGrid {
  float min_ratio = 0.80f;
  float max_ratio = 1.00f;
  float step = 0.01f;
  // min_ratio + i * step for i = 0 .. round((max − min) / step), computed in double, then rounded to float.
  // Throws oscar::Error("clip grid", ...) unless 0 < min <= max <= 1 and step > 0.
  std::vector<float> ratios() const;
};

struct ClipChoice {
  float k_ratio = 1.0f;
  float v_ratio = 1.0f;
  double k_error = 0;            // at k_ratio
  double v_error = 0;            // at v_ratio
  double k_error_reference = 0;  // at the reference ratios (the published 0.96 / 0.92, or the spec's)
  double v_error_reference = 0;
};

// Scores every grid ratio on `rotated` and keeps the best; the reference ratios are scored too, for the report.
ClipChoice tune_clip(const RotatedHeldout& rotated, const ClipGrid& grid, float k_reference, float v_reference);

}  // namespace oscar::calib
