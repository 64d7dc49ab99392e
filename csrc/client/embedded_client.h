// Worker-side access to an in-process (embedded) Server: splits tensors into
// chunks, routes chunks to shards, batches one task per shard per call and
// waits for all of them with a deadline.
//
// Memory contract: register_dense() binds the caller's buffers (parameter and
// optimizer state) without copying. The caller keeps them alive and calls
// register_dense() again if any pointer changes. update() reads the gradient
// buffers only until it returns.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "server/server.h"
#include "table/optimizer.h"

namespace fastps {

struct ClientOptions {
  int64_t chunk_bytes = 4 << 20;                 // a few MiB, as BytePS partitions
  std::chrono::milliseconds timeout{300000};     // every wait's deadline
};

// Chunk key of chunk `index` of tensor `tensor_id`. See DESIGN.md "Keys".
constexpr int kChunkIndexBits = 16;
inline uint64_t chunk_key(uint32_t tensor_id, uint32_t index) {
  return (static_cast<uint64_t>(tensor_id) << kChunkIndexBits) | index;
}

struct UpdateItem {
  uint32_t tensor_id = 0;
  const float* grad = nullptr;
  int64_t numel = 0;
  int hyper_index = 0;     // into the hypers passed to update()
  double step = 1.0;       // step number after increment
  bool first_step = false;
};

class EmbeddedClient {
 public:
  EmbeddedClient(Server& server, const ClientOptions& options);

  int64_t chunk_elems() const { return chunk_elems_; }
  int num_chunks(int64_t numel) const;

  void register_dense(uint32_t tensor_id, float* param, int64_t numel,
                      const std::vector<float*>& state);
  void unregister_dense(uint32_t tensor_id, int64_t numel);
  // Applies one optimizer step to every item, in parallel over the shards;
  // returns when all are done. Throws TimeoutError past the deadline.
  void update(const std::vector<UpdateItem>& items, const std::vector<OptimHyper>& hypers);

 private:
  int shard_of(uint32_t tensor_id, uint32_t chunk) const;
  void broadcast_and_wait(std::vector<std::unique_ptr<Task>> per_shard, const char* what);

  Server& server_;
  ClientOptions options_;
  int64_t chunk_elems_;
};

}  // namespace fastps
