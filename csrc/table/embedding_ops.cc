// See Note [Worker-side embedding ops] in embedding_ops.h.
#include "table/embedding_ops.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "common/cpu.h"
#include "common/error.h"
#include "common/hash.h"
#include "common/prefetch.h"

namespace fastps {

namespace {

// Per-thread scratch buffers grow with the largest batch seen; beyond this
// size they are released after use rather than kept for the thread's life.
constexpr size_t kKeepScratchBytes = size_t{16} << 20;

template <typename T>
void trim(std::vector<T>& v) {
  if (v.capacity() * sizeof(T) > kKeepScratchBytes) std::vector<T>().swap(v);
}

// Sorts keys[0, count) ascending and sets rank[k] = the new position of the
// key that was at k. LSD radix sort on the 8 bytes of the order-preserving
// unsigned image of the keys (sign bit flipped), skipping bytes that are equal
// in every key (ids below 2^24 need 3 passes): ~5x faster than std::sort on
// (key, position) pairs for the benchmark's 7k unique ids.
void sort_with_positions(int64_t* keys, int64_t count, int64_t* rank) {
  constexpr uint64_t kSign = uint64_t{1} << 63;
  thread_local std::vector<std::pair<uint64_t, int64_t>> a, b;
  a.resize(count);
  b.resize(count);
  int64_t hist[8][256] = {};
  for (int64_t k = 0; k < count; ++k) {
    const uint64_t u = static_cast<uint64_t>(keys[k]) ^ kSign;
    a[k] = {u, k};
    for (int d = 0; d < 8; ++d) ++hist[d][(u >> (8 * d)) & 0xff];
  }
  for (int d = 0; d < 8; ++d) {
    int64_t* h = hist[d];
    if (h[(a[0].first >> (8 * d)) & 0xff] == count) continue;  // one value: the pass keeps the order
    int64_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const int64_t c = h[v];
      h[v] = sum;
      sum += c;
    }
    for (int64_t k = 0; k < count; ++k) b[h[(a[k].first >> (8 * d)) & 0xff]++] = a[k];
    a.swap(b);
  }
  for (int64_t k = 0; k < count; ++k) {
    keys[k] = static_cast<int64_t>(a[k].first ^ kSign);
    rank[a[k].second] = k;
  }
  trim(a);
  trim(b);
}

}  // namespace

UniqueResult unique_inverse(const int64_t* ids, int64_t n, int64_t* uids, int64_t* inverse, bool sorted) {
  UniqueResult r;
  if (n <= 0) return r;
  // Open addressing at <= 50% load; a slot holds the position in uids + 1 (0:
  // empty). The scratch is per thread, so a steady batch size allocates once.
  FASTPS_CHECK(n < int64_t{1} << 31, "fastps.nn: ", n, " ids in one call; at most 2^31 - 1 are supported");
  uint64_t cap = 16;
  while (cap < 2 * static_cast<uint64_t>(n)) cap <<= 1;
  thread_local std::vector<uint32_t> slots;
  if (slots.size() < cap) slots.resize(cap);
  std::memset(slots.data(), 0, cap * sizeof(uint32_t));
  const uint64_t mask = cap - 1;
  int64_t count = 0;
  int64_t lo = ids[0], hi = ids[0];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    lo = std::min(lo, id);
    hi = std::max(hi, id);
    uint64_t s = mix64(static_cast<uint64_t>(id)) & mask;
    for (;;) {
      const uint32_t v = slots[s];
      if (v == 0) {
        uids[count] = id;
        slots[s] = static_cast<uint32_t>(++count);
        inverse[i] = count - 1;
        break;
      }
      if (uids[v - 1] == id) {
        inverse[i] = v - 1;
        break;
      }
      s = (s + 1) & mask;
    }
  }
  if (sorted && count > 1) {
    // Sort the (few) unique ids, not all n, and renumber the inverse, which is
    // then monotone in the ids (as np.unique's).
    thread_local std::vector<int64_t> rank;
    rank.resize(count);
    sort_with_positions(uids, count, rank.data());
    for (int64_t i = 0; i < n; ++i) inverse[i] = rank[inverse[i]];
    trim(rank);
  }
  trim(slots);
  r.count = count;
  r.min = lo;
  r.max = hi;
  return r;
}

void embedding_chains(const int64_t* inverse, int64_t n, int64_t n_unique, int64_t* first, int64_t* next) {
  std::fill(first, first + n_unique, int64_t{-1});
  for (int64_t i = n - 1; i >= 0; --i) {  // backwards: each chain in increasing order
    next[i] = first[inverse[i]];
    first[inverse[i]] = i;
  }
}

void gather_rows(const float* rows, const int64_t* inverse, int64_t n, int64_t dim, float* out) {
  // The rows were just written by the shard threads, half of them on another
  // core: prefetching kAhead rows ahead overlaps those cache-line transfers.
  constexpr int64_t kAhead = 8;
  const size_t bytes = static_cast<size_t>(dim) * sizeof(float);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) prefetch_span<0>(rows + inverse[i + kAhead] * dim, bytes);
    std::memcpy(out + i * dim, rows + inverse[i] * dim, bytes);
  }
}

namespace {

// The loop is inlined into a baseline and an AVX2 copy, so the compiler uses
// 256-bit adds where the CPU has them (element-wise adds: same bits either way).
inline __attribute__((always_inline)) void add_rows(const float* __restrict grads, const int64_t* inverse,
                                                    int64_t n, int64_t dim, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    float* __restrict o = out + inverse[i] * dim;
    const float* __restrict g = grads + i * dim;
    for (int64_t k = 0; k < dim; ++k) o[k] += g[k];
  }
}

void add_rows_generic(const float* grads, const int64_t* inverse, int64_t n, int64_t dim, float* out) {
  add_rows(grads, inverse, n, dim, out);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void add_rows_avx2(const float* grads, const int64_t* inverse, int64_t n,
                                                   int64_t dim, float* out) {
  add_rows(grads, inverse, n, dim, out);
}
#endif

}  // namespace

void segment_sum(const float* grads, const int64_t* inverse, int64_t n, int64_t dim, int64_t n_unique,
                 float* out) {
  std::memset(out, 0, static_cast<size_t>(n_unique) * dim * sizeof(float));
#if defined(__x86_64__)
  if (cpu_has_avx2()) return add_rows_avx2(grads, inverse, n, dim, out);
#endif
  add_rows_generic(grads, inverse, n, dim, out);
}

}  // namespace fastps
