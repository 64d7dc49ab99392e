#include "client/embedded_client.h"

#include <algorithm>
#include <functional>
#include <string>

#include "common/error.h"
#include "server/shard_state.h"

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
    : server_(server), options_(options), placement_(size_t(server.num_shards())) {
  FASTPS_CHECK(options.chunk_bytes >= 4096, "fastps: chunk_bytes must be at least 4096, got ",
               options.chunk_bytes);
  FASTPS_CHECK(options.timeout.count() > 0, "fastps: timeout must be positive");
  chunk_elems_ = options.chunk_bytes / static_cast<int64_t>(sizeof(float));
}

int EmbeddedClient::num_chunks(int64_t numel) const { return chunk_layout(numel, chunk_elems_, 1).chunks; }

void EmbeddedClient::broadcast_and_wait(std::vector<std::unique_ptr<Task>> per_shard,
                                        const char* what) {
  server_.run_each(std::move(per_shard), Clock::now() + options_.timeout, what);
}

bool EmbeddedClient::is_registered(uint32_t tensor_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.count(tensor_id) != 0;
}

void EmbeddedClient::register_dense(uint32_t tensor_id, float* param, int64_t numel,
                                    const std::vector<float*>& state, const std::vector<int64_t>& state_numel,
                                    float* step, int64_t step_numel, bool fresh_state) {
  // The same check as the distributed client's: See Note [Buffers with their
  // counts] in client/ps_client.cc.
  FASTPS_CHECK(numel > 0, "fastps: cannot register an empty tensor");
  FASTPS_CHECK(param != nullptr, "fastps: tensor ", tensor_id, ": the parameter is a null pointer");
  FASTPS_CHECK(state.size() <= kMaxStateBuffers, "fastps: at most ", kMaxStateBuffers,
               " optimizer state buffers per tensor");
  FASTPS_CHECK(state_numel.size() == state.size(), "fastps: tensor ", tensor_id, ": ", state.size(),
               " state buffers but ", state_numel.size(), " counts");
  for (size_t i = 0; i < state.size(); ++i)
    FASTPS_CHECK(state[i] != nullptr && state_numel[i] == numel, "fastps: tensor ", tensor_id,
                 ": optimizer state buffer ", i, " holds ", state_numel[i], " floats",
                 state[i] == nullptr ? " at a null pointer" : "", " where the parameter has ", numel,
                 "; every state buffer must be a contiguous float32 tensor of the parameter's size");
  FASTPS_CHECK(step == nullptr ? step_numel == 0 : step_numel == 1, "fastps: tensor ", tensor_id,
               ": the step counter holds ", step_numel, " floats", step == nullptr ? " at a null pointer" : "",
               " where it must be one float32 (or absent: a null pointer and 0)");
  struct Bind {
    uint64_t key;
    float* param;
    int64_t numel;
    float* state[kMaxStateBuffers];
  };
  const int ns = static_cast<int>(state.size());
  const ChunkLayout layout = chunk_layout(numel, chunk_elems_, 1);
  std::vector<std::vector<Bind>> per_shard(server_.num_shards());
  {
    std::lock_guard<std::mutex> lock(mu_);
    Entry& e = entries_[tensor_id];
    if (e.layout.numel != numel || e.layout.chunks != layout.chunks) {
      // New tensor (or a new size): place each chunk on the least-loaded shard.
      placement_.release(e.layout, e.shards);
      e.shards = placement_.place(layout);
      e.layout = layout;
    }
    e.step = step;
    e.fresh = fresh_state;
    for (int c = 0; c < layout.chunks; ++c) {
      const int64_t begin = layout.begin(c);
      Bind b{chunk_key(tensor_id, c), param + begin, layout.size(c), {}};
      for (int i = 0; i < ns; ++i) b.state[i] = state[i] + begin;
      per_shard[e.shards[c]].push_back(b);
    }
  }
  std::vector<std::unique_ptr<Task>> tasks(server_.num_shards());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (per_shard[s].empty()) continue;
    auto task = std::make_unique<FunctionTask>();
    task->fn = [binds = std::move(per_shard[s]), ns](Shard& shard) {
      for (const Bind& b : binds) shard.state().borrowed.bind(b.key, b.param, b.numel, b.state, ns);
    };
    tasks[s] = std::move(task);
  }
  broadcast_and_wait(std::move(tasks), "shard registration");
}

void EmbeddedClient::unregister_dense(uint32_t tensor_id) {
  std::vector<std::vector<uint64_t>> per_shard(server_.num_shards());
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(tensor_id);
    if (it == entries_.end()) return;
    const Entry& e = it->second;
    for (size_t c = 0; c < e.shards.size(); ++c)
      per_shard[e.shards[c]].push_back(chunk_key(tensor_id, static_cast<uint32_t>(c)));
    placement_.release(e.layout, e.shards);
    entries_.erase(it);
  }
  std::vector<std::unique_ptr<Task>> tasks(server_.num_shards());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (per_shard[s].empty()) continue;
    auto task = std::make_unique<FunctionTask>();
    task->fn = [keys = std::move(per_shard[s])](Shard& shard) {
      for (uint64_t k : keys) shard.state().borrowed.erase(k);
    };
    tasks[s] = std::move(task);
  }
  broadcast_and_wait(std::move(tasks), "shard unregistration");
}

void EmbeddedClient::update(const std::vector<UpdateItem>& items,
                            const std::vector<OptimHyper>& hypers) {
  std::vector<std::vector<ChunkUpdate>> per_shard(server_.num_shards());
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Validate everything before changing anything (step counters included).
    for (const UpdateItem& it : items) {
      FASTPS_CHECK(it.hyper_index >= 0 && static_cast<size_t>(it.hyper_index) < hypers.size(),
                   "fastps: bad hyperparameter index ", it.hyper_index);
      auto e = entries_.find(it.tensor_id);
      FASTPS_CHECK(e != entries_.end(), "fastps: tensor ", it.tensor_id, " is not registered");
      FASTPS_CHECK(it.grad != nullptr && it.grad_numel == e->second.layout.numel, "fastps: tensor ", it.tensor_id,
                   ": the gradient holds ", it.grad_numel, " floats", it.grad == nullptr ? " at a null pointer" : "",
                   " where the parameter has ", e->second.layout.numel,
                   "; pass a contiguous float32 gradient of the parameter's size");
    }
    for (const UpdateItem& it : items) {
      Entry& e = entries_[it.tensor_id];
      double step = 1.0;
      if (e.step != nullptr) {
        *e.step += 1.0f;  // torch: state['step'] += 1 on a float32 tensor
        step = *e.step;
      }
      const bool first = e.fresh;
      e.fresh = false;
      for (int c = 0; c < e.layout.chunks; ++c) {
        per_shard[e.shards[size_t(c)]].push_back(ChunkUpdate{chunk_key(it.tensor_id, static_cast<uint32_t>(c)),
                                                             it.grad + e.layout.begin(c), e.layout.size(c),
                                                             &hypers[it.hyper_index], step, first});
      }
    }
  }
  std::vector<std::unique_ptr<Task>> tasks(server_.num_shards());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (per_shard[s].empty()) continue;
    auto task = std::make_unique<FunctionTask>();
    task->fn = [updates = std::move(per_shard[s])](Shard& shard) {
      for (const ChunkUpdate& u : updates)
        shard.state().borrowed.update(u.key, u.grad, u.numel, *u.hyper, u.step, u.first_step);
    };
    tasks[s] = std::move(task);
  }
  broadcast_and_wait(std::move(tasks), "optimizer step on the embedded server");
}

}  // namespace fastps
