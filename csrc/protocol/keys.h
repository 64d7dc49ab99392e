// Key layout shared by clients and servers (DESIGN.md "Keys"; docs/protocol.md).
#pragma once

#include <cstdint>

namespace fastps {

// Chunk key of chunk `index` of tensor `tensor_id`: the tensor id in the high
// bits, the chunk index in the low kChunkIndexBits.
constexpr int kChunkIndexBits = 16;
inline uint64_t chunk_key(uint32_t tensor_id, uint32_t index) {
  return (static_cast<uint64_t>(tensor_id) << kChunkIndexBits) | index;
}

}  // namespace fastps
