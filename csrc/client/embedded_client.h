// Worker-side access to an in-process (embedded) Server: splits tensors into
// chunks, routes chunks to shards, batches one task per shard per call and
// waits for all of them with a deadline.
//
// Memory contract: register_dense() binds the caller's buffers (parameter,
// optimizer state and the float32 step counter) without copying. The caller
// keeps them alive and calls register_dense() again if any pointer changes.
// update() reads the gradient buffers only until it returns.
//
// Placement: each chunk goes to the shard with the fewest registered bytes at
// the time it is registered (ChunkPlacement, client/chunk_placement.h, the
// rule PsClient uses over servers).
//
// Thread safety: all methods may be called from any thread; the registry is
// guarded by a mutex on the client (the shards themselves take no lock).
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "client/chunk_placement.h"
#include "server/server.h"
#include "table/optimizer.h"

namespace fastps {

struct ClientOptions {
  int64_t chunk_bytes = 4 << 20;                 // a few MiB, as BytePS partitions
  std::chrono::milliseconds timeout{300000};     // every wait's deadline
};

struct UpdateItem {
  uint32_t tensor_id = 0;
  const float* grad = nullptr;
  int64_t grad_numel = 0;  // floats at grad: must be the tensor's numel
  int hyper_index = 0;     // into the hypers passed to update()
};

class EmbeddedClient {
 public:
  EmbeddedClient(Server& server, const ClientOptions& options);

  int64_t chunk_elems() const { return chunk_elems_; }
  int num_chunks(int64_t numel) const;

  // Binds (or re-binds) a tensor of `numel` floats at `param`. Each state
  // buffer comes with the floats it holds (`state_numel`, each must be
  // `numel`). `step` points at the float32 step counter (`step_numel` 1) that
  // update() increments before each step (torch's state['step']), or is null
  // (`step_numel` 0) for rules without one. `fresh_state` tells the rule its
  // buffers were just created (SGD copies the first gradient into its
  // momentum buffer). A wrong count or a null buffer throws InvalidArgument
  // before anything is bound.
  void register_dense(uint32_t tensor_id, float* param, int64_t numel, const std::vector<float*>& state,
                      const std::vector<int64_t>& state_numel, float* step, int64_t step_numel,
                      bool fresh_state);
  void unregister_dense(uint32_t tensor_id);
  bool is_registered(uint32_t tensor_id) const;
  // Applies one optimizer step to every item, in parallel over the shards;
  // returns when all are done. Throws TimeoutError past the deadline and
  // InvalidArgument for an unregistered tensor or a gradient whose count is
  // not the tensor's numel (before anything is changed).
  void update(const std::vector<UpdateItem>& items, const std::vector<OptimHyper>& hypers);

 private:
  struct Entry {
    ChunkLayout layout;
    float* step = nullptr;
    bool fresh = false;
    std::vector<int> shards;  // shard of each chunk
  };
  void broadcast_and_wait(std::vector<std::unique_ptr<Task>> per_shard, const char* what);

  Server& server_;
  ClientOptions options_;
  int64_t chunk_elems_;
  mutable std::mutex mu_;                          // guards the registry below
  std::unordered_map<uint32_t, Entry> entries_;
  ChunkPlacement placement_;                       // over the shards
};

}  // namespace fastps
