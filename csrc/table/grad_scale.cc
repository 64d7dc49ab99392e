#include "table/grad_scale.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace fastps {

namespace {

// Bits of a float mapped to an integer line on which adjacent floats are
// adjacent integers (negative floats below positive ones; -0 == +0).
int64_t ordered(float x) {
  int32_t i;
  std::memcpy(&i, &x, 4);
  return i >= 0 ? int64_t(i) : -int64_t(i & 0x7fffffff);
}

}  // namespace

float uniform_scale(const float* edited, const float* mean, int64_t n, int max_ulps) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Candidates for the exact case, from the first element with a non-zero mean.
  int64_t first = 0;
  while (first < n && mean[first] == 0.0f) ++first;
  if (first == n) {  // a zero mean: unchanged if edited is zero too
    for (int64_t i = 0; i < n; ++i)
      if (edited[i] != 0.0f) return nan;
    return 1.0f;
  }
  if (!std::isfinite(mean[first]) || !std::isfinite(edited[first])) return nan;
  const float c0 = float(double(edited[first]) / double(mean[first]));
  const float cand[3] = {c0, std::nextafter(c0, -std::numeric_limits<float>::infinity()),
                         std::nextafter(c0, std::numeric_limits<float>::infinity())};
  bool exact[3] = {true, true, true};
  double em = 0.0, mm = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float m = mean[i], e = edited[i];
    if (!std::isfinite(m) || !std::isfinite(e)) return nan;
    for (int k = 0; k < 3; ++k) exact[k] &= (m * cand[k] == e);
    em += double(e) * double(m);
    mm += double(m) * double(m);
  }
  for (int k = 0; k < 3; ++k)
    if (exact[k]) return cand[k];
  const float s = float(em / mm);
  if (!std::isfinite(s)) return nan;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t d = ordered(mean[i] * s) - ordered(edited[i]);
    if (d > max_ulps || d < -max_ulps) return nan;
  }
  return s;
}

}  // namespace fastps
