#include "client/embedded_client.h"

#include <algorithm>
#include <functional>
#include <string>

#include "common/error.h"

namespace fastps {

namespace {

struct FunctionTask : Task {
  std::function<void(Shard&)> fn;
  void run(Shard& shard) override { fn(shard); }
};

struct ChunkUpdate {
  uint64_t key;
  const float* grad;
  int64_t numel;
  const OptimHyper* hyper;
  double step;
  bool first_step;
};

}  // namespace

EmbeddedClient::EmbeddedClient(Server& server, const ClientOptions& options)
    : server_(server), options_(options) {
  FASTPS_CHECK(options.chunk_bytes >= 4096, "fastps: chunk_bytes must be at least 4096, got ",
               options.chunk_bytes);
  FASTPS_CHECK(options.timeout.count() > 0, "fastps: timeout must be positive");
  chunk_elems_ = options.chunk_bytes / static_cast<int64_t>(sizeof(float));
}

int EmbeddedClient::num_chunks(int64_t numel) const {
  int64_t n = (numel + chunk_elems_ - 1) / chunk_elems_;
  FASTPS_CHECK(n < (int64_t{1} << kChunkIndexBits), "fastps: tensor of ", numel,
               " elements needs ", n, " chunks, more than ", (1 << kChunkIndexBits),
               "; raise chunk_bytes");
  return static_cast<int>(std::max<int64_t>(n, 1));
}

int EmbeddedClient::shard_of(uint32_t tensor_id, uint32_t chunk) const {
  // Consecutive chunks of one tensor go round-robin from a hashed start, so a
  // large tensor spreads evenly over the shards.
  return static_cast<int>((mix64(tensor_id) + chunk) % static_cast<uint64_t>(server_.num_shards()));
}

void EmbeddedClient::broadcast_and_wait(std::vector<std::unique_ptr<Task>> per_shard,
                                        const char* what) {
  uint32_t pieces = 0;
  for (auto& t : per_shard) pieces += t != nullptr;
  if (pieces == 0) return;
  auto completion = std::make_shared<Completion>(pieces);
  auto deadline = Clock::now() + options_.timeout;
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (!per_shard[s]) continue;
    per_shard[s]->completion = completion;
    server_.submit(static_cast<int>(s), std::move(per_shard[s]));
  }
  completion->wait(deadline, what);
}

void EmbeddedClient::register_dense(uint32_t tensor_id, float* param, int64_t numel,
                                    const std::vector<float*>& state) {
  FASTPS_CHECK(numel > 0, "fastps: cannot register an empty tensor");
  FASTPS_CHECK(state.size() <= kMaxStateBuffers, "fastps: at most ", kMaxStateBuffers,
               " optimizer state buffers per tensor");
  struct Bind {
    uint64_t key;
    float* param;
    int64_t numel;
    float* state[kMaxStateBuffers];
  };
  const int ns = static_cast<int>(state.size());
  std::vector<std::vector<Bind>> per_shard(server_.num_shards());
  for (int c = 0, chunks = num_chunks(numel); c < chunks; ++c) {
    const int64_t begin = c * chunk_elems_;
    Bind b{chunk_key(tensor_id, c), param + begin, std::min(chunk_elems_, numel - begin), {}};
    for (int i = 0; i < ns; ++i) b.state[i] = state[i] + begin;
    per_shard[shard_of(tensor_id, c)].push_back(b);
  }
  std::vector<std::unique_ptr<Task>> tasks(server_.num_shards());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (per_shard[s].empty()) continue;
    auto task = std::make_unique<FunctionTask>();
    task->fn = [binds = std::move(per_shard[s]), ns](Shard& shard) {
      for (const Bind& b : binds) shard.dense().bind(b.key, b.param, b.numel, b.state, ns);
    };
    tasks[s] = std::move(task);
  }
  broadcast_and_wait(std::move(tasks), "shard registration");
}

void EmbeddedClient::unregister_dense(uint32_t tensor_id, int64_t numel) {
  const int chunks = num_chunks(numel);
  std::vector<std::unique_ptr<Task>> tasks(server_.num_shards());
  for (int s = 0; s < server_.num_shards(); ++s) {
    auto task = std::make_unique<FunctionTask>();
    task->fn = [this, tensor_id, chunks](Shard& shard) {
      for (int c = 0; c < chunks; ++c)
        if (shard_of(tensor_id, c) == shard.index()) shard.dense().erase(chunk_key(tensor_id, c));
    };
    tasks[s] = std::move(task);
  }
  broadcast_and_wait(std::move(tasks), "shard unregistration");
}

void EmbeddedClient::update(const std::vector<UpdateItem>& items,
                            const std::vector<OptimHyper>& hypers) {
  std::vector<std::vector<ChunkUpdate>> per_shard(server_.num_shards());
  for (const UpdateItem& it : items) {
    FASTPS_CHECK(it.hyper_index >= 0 && static_cast<size_t>(it.hyper_index) < hypers.size(),
                 "fastps: bad hyperparameter index ", it.hyper_index);
    const int chunks = num_chunks(it.numel);
    for (int c = 0; c < chunks; ++c) {
      const int64_t begin = c * chunk_elems_;
      const int64_t n = std::min(chunk_elems_, it.numel - begin);
      per_shard[shard_of(it.tensor_id, c)].push_back(ChunkUpdate{
          chunk_key(it.tensor_id, c), it.grad + begin, n, &hypers[it.hyper_index], it.step,
          it.first_step});
    }
  }
  std::vector<std::unique_ptr<Task>> tasks(server_.num_shards());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (per_shard[s].empty()) continue;
    auto task = std::make_unique<FunctionTask>();
    task->fn = [updates = std::move(per_shard[s])](Shard& shard) {
      for (const ChunkUpdate& u : updates)
        shard.dense().update(u.key, u.grad, u.numel, *u.hyper, u.step, u.first_step);
    };
    tasks[s] = std::move(task);
  }
  broadcast_and_wait(std::move(tasks), "optimizer step on the embedded server");
}

}  // namespace fastps
