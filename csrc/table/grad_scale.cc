#include "table/grad_scale.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace fastps {

namespace {

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Bits of a float mapped to an int32 line on which adjacent floats are
// adjacent integers (negative floats below positive ones; -0 is one below +0).
// Branch-free and 32-bit, so that loops over it vectorise.
int32_t ordered(float x) {
  const int32_t v = int32_t(bits(x));
  return v ^ ((v >> 31) & 0x7fffffff);
}

constexpr uint32_t kExp = 0x7f800000;  // a float is non-finite iff these bits are all set
constexpr int64_t kBlock = 4096;       // elements per pass over both arrays (in L1/L2)

// Over one block: bit k set if fl(m[i] * c[k]) != e[i] for some i, bit 3 if
// any value is non-finite. Branch-free so that the compiler vectorises it
// (the whole check runs at memory speed; the former per-element loop with
// double sums ran at a fifth of it).
unsigned mismatches(const float* e, const float* m, int64_t n, const float c[3]) {
  int f0 = 0, f1 = 0, f2 = 0, nf = 0;
  const float c0 = c[0], c1 = c[1], c2 = c[2];
  for (int64_t i = 0; i < n; ++i) {
    const float mi = m[i], ei = e[i];
    f0 |= int(mi * c0 != ei);
    f1 |= int(mi * c1 != ei);
    f2 |= int(mi * c2 != ei);
    nf |= int((bits(mi) & kExp) == kExp) | int((bits(ei) & kExp) == kExp);
  }
  return unsigned(f0) | unsigned(f1) << 1 | unsigned(f2) << 2 | unsigned(nf) << 3;
}

// The least-squares factor em/mm: eight float partial sums per block (so the
// loop vectorises without -ffast-math), summed across blocks in double.
float least_squares(const float* e, const float* m, int64_t n) {
  double em = 0.0, mm = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    float bem[8] = {}, bmm[8] = {};
    int64_t i = b;
    for (; i + 8 <= end; i += 8)
      for (int j = 0; j < 8; ++j) {
        bem[j] += e[i + j] * m[i + j];
        bmm[j] += m[i + j] * m[i + j];
      }
    for (; i < end; ++i) {
      bem[0] += e[i] * m[i];
      bmm[0] += m[i] * m[i];
    }
    for (int j = 0; j < 8; ++j) {
      em += bem[j];
      mm += bmm[j];
    }
  }
  return float(em / mm);
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
  unsigned failed = 0;  // bit k: candidate k failed somewhere
  for (int64_t b = 0; b < n; b += kBlock) {
    failed |= mismatches(edited + b, mean + b, std::min(kBlock, n - b), cand);
    if (failed & 8) return nan;  // a non-finite value
    if ((failed & 7) == 7) {     // no exact factor: finish the finiteness check, then a chain?
      for (int64_t r = b + kBlock; r < n; r += kBlock)
        if (mismatches(edited + r, mean + r, std::min(kBlock, n - r), cand) & 8) return nan;
      break;
    }
  }
  for (int k = 0; k < 3; ++k)
    if (!(failed >> k & 1)) return cand[k];
  const float s = least_squares(edited, mean, n);
  if (!std::isfinite(s)) return nan;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    int far = 0;
    for (int64_t i = b; i < end; ++i) {
      // |difference| <= max_ulps, in wrapping uint32 arithmetic: finite floats
      // span less than 2^32 - 2^24 ordered values, so a wrap never looks near.
      const uint32_t d = uint32_t(ordered(mean[i] * s)) - uint32_t(ordered(edited[i]));
      far |= int(d + uint32_t(max_ulps) > 2 * uint32_t(max_ulps));
    }
    if (far) return nan;
  }
  return s;
}

}  // namespace fastps
