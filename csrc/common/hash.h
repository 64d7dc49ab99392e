// Small hashing helpers shared by the routing code and the tables.
#pragma once

#include <cstdint>

namespace fastps {

// 64-bit mixer (the splitmix64 finaliser): spreads keys over servers and
// shards, and seeds the sparse tables' per-id initial values.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace fastps
