// The chunk rules both dense clients share (client/chunk_placement.h): how a
// tensor is cut (Note [Splitting small tensors]) and where each chunk goes
// (fewest registered bytes). EmbeddedClient cuts with split_over 1 over its
// shards, PsClient with split_over = servers over its servers; both place
// with one ChunkPlacement, so a job of S servers and an embedded server of S
// shards put the same large tensors on the same targets.
//
// Prints "N passed, M failed" like the other C++ tests; exits non-zero on failure.
#include <string>
#include <vector>

#include "client/chunk_placement.h"
#include "common/error.h"
#include "report.h"

using namespace fastps;
using namespace fastps_test;

int main() {
  constexpr int64_t kChunk = (4 << 20) / 4;  // the default chunk_bytes, in floats

  // Large tensors: chunks of chunk_elems, whatever split_over is.
  const ChunkLayout big = chunk_layout(3 * kChunk + 5, kChunk, 4);
  report(big.chunks == 4 && big.chunk_elems == kChunk && big.size(3) == 5 && big.begin(2) == 2 * kChunk,
         "a large tensor is cut into chunks of chunk_bytes");
  const ChunkLayout embedded_big = chunk_layout(3 * kChunk + 5, kChunk, 1);
  report(embedded_big.chunks == big.chunks && embedded_big.chunk_elems == big.chunk_elems,
         "embedded (split_over 1) and network cut a large tensor alike");

  // Small tensors: one chunk embedded, up to one piece per server over the network,
  // pieces of at least 64 KiB.
  const ChunkLayout small_embedded = chunk_layout(100000, kChunk, 1);
  const ChunkLayout small_network = chunk_layout(100000, kChunk, 4);
  report(small_embedded.chunks == 1 && small_embedded.size(0) == 100000, "embedded keeps a small tensor whole");
  report(small_network.chunks == 4 && small_network.chunk_elems == 25000 && small_network.size(3) == 25000,
         "the network client cuts a small tensor over the servers (Note [Splitting small tensors])");
  const ChunkLayout tiny = chunk_layout(20000, kChunk, 4);  // 80 KB: one piece of >= 64 KiB
  report(tiny.chunks == 1, "pieces are at least 64 KiB");
  report(chunk_layout(1, kChunk, 8).chunks == 1, "a one-element tensor is one chunk");

  bool threw = false;
  try {
    chunk_layout(int64_t{1} << 40, 1024, 1);
  } catch (const InvalidArgument& e) {
    threw = std::string(e.what()).find("raise chunk_bytes") != std::string::npos;
  }
  report(threw, "a tensor needing more chunks than a key holds is refused, naming chunk_bytes");

  // Placement: the target with the fewest registered bytes, the first on a tie.
  ChunkPlacement p(3);
  const std::vector<int> a = p.place(chunk_layout(2 * kChunk, kChunk, 1));  // 2 chunks
  report(a == std::vector<int>{0, 1}, "chunks fill empty targets in order");
  const std::vector<int> b = p.place(chunk_layout(kChunk / 2, kChunk, 1));
  report(b == std::vector<int>{2}, "the next chunk goes to the emptiest target");
  const std::vector<int> c = p.place(chunk_layout(kChunk / 4, kChunk, 1));
  report(c == std::vector<int>{2}, "a target with fewer bytes takes the next chunk again");
  p.release(chunk_layout(2 * kChunk, kChunk, 1), a);
  const std::vector<int> d = p.place(chunk_layout(kChunk, kChunk, 1));
  report(d == std::vector<int>{0}, "released bytes count no more");
  return summary();
}
