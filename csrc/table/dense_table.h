// The dense parameter table of one shard: chunk key -> chunk.
//
// A registered tensor is split into chunks (EmbeddedClient, keys from
// protocol/keys.h); each chunk lives on exactly one shard and is touched only
// by that shard's thread, so the table needs no locks (see Note [Shard
// ownership] in server/shard.h).
//
// The embedded server's chunks borrow their memory (DenseChunk): the shard
// updates the user's parameter and optimizer-state tensors in place,
// zero-copy, and the caller keeps torch's step counter with the tensors. The
// network server's chunks own theirs (OwnedDenseChunk, the base of PsChunk in
// server/dense_service.h), with the step counter and the state created as
// torch creates it. Both apply through optim_update; a shard keeps both kinds
// in its one ShardState (Note [One shard state] in server/shard_state.h).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "table/optimizer.h"

namespace fastps {

constexpr int kMaxStateBuffers = 3;

struct DenseChunk {
  float* param = nullptr;
  int64_t numel = 0;
  float* state[kMaxStateBuffers] = {nullptr, nullptr, nullptr};
  int num_state = 0;
};

// A chunk that owns its memory: parameters, the optimizer state torch keeps
// for them, and torch's float32 state['step'].
struct OwnedDenseChunk {
  int64_t numel = 0;
  std::vector<float> param;
  std::vector<float> state[kMaxStateBuffers];
  float step = 0.0f;   // torch's float32 state['step'] (Adam, Adagrad)
  bool fresh = true;   // SGD: momentum buffer not yet initialised (torch clones the first gradient)

  // Makes the state buffers optimizer `h` uses, as torch does: zeros, or
  // Adagrad's initial_accumulator_value. Buffers already there are kept.
  void ensure_state(const OptimHyper& h);
  // Buffer `buf` (0: the parameters, 1..kMaxStateBuffers: state), made (zeros)
  // if the optimizer does not use it yet. InvalidArgument past the last.
  std::vector<float>& buffer(uint32_t buf);
  // One optimizer step with `grad` (numel floats): the step counter advances
  // as torch's does, then the fused kernel runs.
  void apply(const OptimHyper& h, const float* grad);
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
