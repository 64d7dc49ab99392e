// How a dense tensor is cut into chunks and where each chunk goes: the one
// rule of both clients (EmbeddedClient places chunks on its server's shards,
// PsClient on the job's servers).
//
// Thread safety: ChunkLayout is a value; a ChunkPlacement is guarded by its
// owner (each client holds it under its registry mutex).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/error.h"
#include "protocol/keys.h"

namespace fastps {

// A tensor of `numel` floats cut into `chunks` chunks of `chunk_elems` (the
// last may be shorter); chunk c is key chunk_key(tensor, c).
struct ChunkLayout {
  int64_t numel = 0;
  int64_t chunk_elems = 0;
  int chunks = 0;
  int64_t begin(int c) const { return int64_t(c) * chunk_elems; }
  int64_t size(int c) const { return std::min(chunk_elems, numel - begin(c)); }
};

// Note [Splitting small tensors]
// A tensor of fewer chunks than there are targets (servers) would sit on one
// or two of them: one process sums it while the others wait, and every other
// worker's bytes cross to it. It is cut into up to one equal piece per
// target instead (pieces of at least 64 KiB), so every target takes a share,
// as with large tensors. A function of (numel, chunk_elems, split_over) only:
// every rank cuts alike. split_over 1 keeps chunks of chunk_elems (the
// embedded client's shards share one address space: nothing to spread).
// Throws InvalidArgument for a tensor that needs more chunks than a key holds.
inline ChunkLayout chunk_layout(int64_t numel, int64_t chunk_elems, int64_t split_over) {
  constexpr int64_t kMinSplitElems = (64 << 10) / 4;
  int64_t chunk = chunk_elems;
  int64_t chunks = (numel + chunk - 1) / chunk;
  if (chunks < split_over) {
    const int64_t pieces = std::min(split_over, numel / kMinSplitElems);
    if (pieces > chunks) {
      chunk = (numel + pieces - 1) / pieces;
      chunks = (numel + chunk - 1) / chunk;
    }
  }
  FASTPS_CHECK(chunks < (int64_t{1} << kChunkIndexBits), "fastps: tensor of ", numel, " elements needs ", chunks,
               " chunks, more than ", (1 << kChunkIndexBits), "; raise chunk_bytes");
  return ChunkLayout{numel, chunk, static_cast<int>(std::max<int64_t>(chunks, 1))};
}

// Each chunk goes to the target with the fewest registered bytes at the time
// it is placed (the first such target on a tie), so tensors of any mix of
// sizes spread evenly.
class ChunkPlacement {
 public:
  explicit ChunkPlacement(size_t targets = 0) : bytes_(targets, 0) {}

  // The target of each chunk of `layout`, counted as registered there.
  std::vector<int> place(const ChunkLayout& layout) {
    std::vector<int> where(static_cast<size_t>(layout.chunks));
    for (int c = 0; c < layout.chunks; ++c) {
      const int t = static_cast<int>(std::min_element(bytes_.begin(), bytes_.end()) - bytes_.begin());
      where[size_t(c)] = t;
      bytes_[size_t(t)] += layout.size(c) * 4;
    }
    return where;
  }
  // Forgets the chunks of `layout` placed at `where` (a place() result).
  void release(const ChunkLayout& layout, const std::vector<int>& where) {
    for (size_t c = 0; c < where.size(); ++c) bytes_[size_t(where[c])] -= layout.size(int(c)) * 4;
  }

 private:
  std::vector<int64_t> bytes_;  // registered bytes per target
};

}  // namespace fastps
