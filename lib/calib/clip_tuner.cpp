#include "lib/calib/clip_tuner.h"

#include <fmt/format.h>

#include <cmath>
#include <string>

#include "formats/error.h"

namespace oscar::calib {

std::vector<float> ClipGrid::ratios() const {
  if (!(min_ratio > 0.0f && min_ratio <= max_ratio && max_ratio <= 1.0f && step > 0.0f))
    throw Error("clip grid", ::fmt::format("need 0 < min ({}) <= max ({}) <= 1 and step ({}) > 0", min_ratio,
                                           max_ratio, step));
  // The flags are decimal numbers: widen each float to its shortest decimal spelling ("0.8", not 0.800000011...)
  // and count steps in double, so 0.80 + 16 * 0.01 lands on 0.96f exactly as a user typing 0.96 would get.
  auto decimal = [](float f) { return std::stod(::fmt::format("{}", f)); };
  const double lo = decimal(min_ratio), hi = decimal(max_ratio), st = decimal(step);
  const auto count = static_cast<int64_t>(std::llround((hi - lo) / st));
  std::vector<float> out;
  for (int64_t i = 0; i <= count; ++i) out.push_back(static_cast<float>(std::min(hi, lo + static_cast<double>(i) * st)));
  return out;
}

ClipChoice tune_clip(const RotatedHeldout& rotated, const ClipGrid& grid, float k_reference, float v_reference) {
  const std::vector<float> ratios = grid.ratios();
  ClipChoice best;
  best.k_error = INFINITY;
  best.v_error = INFINITY;
  // Scanning from the largest ratio with a strict comparison resolves ties toward less clipping.
  for (auto it = ratios.rbegin(); it != ratios.rend(); ++it) {
    const double ke = rotated.key_error(*it);
    const double ve = rotated.value_error(*it);
    if (ke < best.k_error) {
      best.k_error = ke;
      best.k_ratio = *it;
    }
    if (ve < best.v_error) {
      best.v_error = ve;
      best.v_ratio = *it;
    }
  }
  best.k_error_reference = rotated.key_error(k_reference);
  best.v_error_reference = rotated.value_error(v_reference);
  return best;
}

}  // namespace oscar::calib
