// The dense parameter table of one shard: chunk key -> chunk.
//
// A registered tensor is split into chunks (EmbeddedClient, keys from
// protocol/keys.h); each chunk lives on exactly one shard and is touched only
// by that shard's thread, so the table needs no locks (see Note [Shard
// ownership] in server/shard.h).
//
// The embedded server's chunks borrow their memory: the shard updates the
// user's parameter and optimizer-state tensors in place, zero-copy. (The
// network server keeps its own copies in PsChunk, server/dense_service.h; both
// apply through optim_update.)
#pragma once

#include <cstdint>
#include <unordered_map>

#include "table/optimizer.h"

namespace fastps {

constexpr int kMaxStateBuffers = 3;

struct DenseChunk {
  float* param = nullptr;
  int64_t numel = 0;
  float* state[kMaxStateBuffers] = {nullptr, nullptr, nullptr};
  int num_state = 0;
};

class DenseTable {
 public:
  // Registers (or re-binds) a chunk over memory the caller keeps alive until
  // the chunk is re-bound or erased.
  void bind(uint64_t key, float* param, int64_t numel, float* const* state, int num_state);
  void erase(uint64_t key) { chunks_.erase(key); }
  // Throws InvalidArgument for an unknown key.
  DenseChunk& at(uint64_t key);
  size_t size() const { return chunks_.size(); }

  // Applies one optimizer step to chunk `key` with `grad` (numel floats).
  void update(uint64_t key, const float* grad, int64_t numel, const OptimHyper& hyper, double step,
              bool first_step);

 private:
  std::unordered_map<uint64_t, DenseChunk> chunks_;
};

}  // namespace fastps
