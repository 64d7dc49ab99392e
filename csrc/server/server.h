// A parameter server: a set of shard threads (see Note [Shard ownership]).
//
// The same Server runs embedded in the training process (the client calls it
// directly, zero-copy) or behind a transport in a server process.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/hash.h"
#include "server/shard.h"

namespace fastps {

struct ServerOptions {
  // Number of shard threads; 0 picks one per hardware thread, capped at 8.
  int num_shards = 0;
};

class Server {
 public:
  explicit Server(const ServerOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int num_shards() const { return static_cast<int>(shards_.size()); }
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
};

}  // namespace fastps
