// A parameter server: a set of shard threads (see Note [Shard ownership]).
//
// The same Server runs embedded in the training process (the client calls it
// directly, zero-copy) or behind a transport in a server process.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/hash.h"
#include "server/shard.h"

namespace fastps {

struct ServerOptions {
  // Number of shard threads; 0 picks one per hardware thread, capped at 8.
  int num_shards = 0;
  // The network server's consistency rules (Note [Consistency]), kept by
  // every shard; the embedded server keeps these defaults.
  int server_id = 0;
  int num_workers = 1;
  int staleness = 0;
};

class Server {
 public:
  explicit Server(const ServerOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int num_shards() const { return static_cast<int>(shards_.size()); }
  // Any thread: a sparse table id no other table of this server has (the
  // embedded tables' key in each shard's state).
  uint64_t new_table_id() { return next_table_id_.fetch_add(1, std::memory_order_relaxed); }
  // Any thread. Takes ownership of the task; its completion is signalled
  // after it ran on shard `shard`.
  void submit(int shard, std::unique_ptr<Task> task);
  // Any thread: Shard::run_inline() on shard `shard` (Note [Inline tasks]).
  bool run_inline(int shard, std::unique_ptr<Task>& task);
  // Any thread: runs per_shard[s] (where set) on shard s, all in parallel,
  // and returns when every one is done. The caller's thread takes part: it
  // runs the last piece itself when that shard is idle (Note [Inline tasks])
  // and drains the queues of shards whose threads have not started yet
  // (Note [Helping a shard]). Throws the first error a piece threw, or
  // TimeoutError naming `what` when `deadline` passes first.
  void run_each(std::vector<std::unique_ptr<Task>> per_shard, Clock::time_point deadline, const char* what);

 private:
  std::vector<std::unique_ptr<Shard>> shards_;
  std::atomic<uint64_t> next_table_id_{1};
};

}  // namespace fastps
