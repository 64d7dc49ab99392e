// Software prefetch of a byte range, for the sparse tables' lookahead (the
// "Lookahead" point of the design note in table/sparse_table.h).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastps {

// Asks the cache for every line of [p, p + bytes); rw: 0 to read, 1 to write.
// A hint: never faults, changes no result.
template <int rw>
inline __attribute__((always_inline)) void prefetch_span(const void* p, size_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}; a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a), rw);
}

}  // namespace fastps
