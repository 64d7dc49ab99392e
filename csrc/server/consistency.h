// The consistency rules of the network server, for dense chunks and sparse
// tables alike: when a waiting request may be answered, who joined a round,
// which workers are dead and which waiters can therefore never be answered.
//
// Note [Consistency]
// staleness == 0 (BSP): a chunk sums the pushes of one round; when all
// num_workers workers pushed (a push may be a "skip": no gradient), the mean
// gradient (sum / num_workers) goes through the optimizer once and the chunk's
// version increments. A PULL with aux = v is answered once version >= v. The
// result equals single-process training on the concatenated global batch.
// staleness k > 0 (SSP) or -1 (ASP): each push is applied at once (gradient /
// num_workers, so one round of W pushes moves an SGD model as far as BSP). A
// PULL from a worker at clock c is answered once every worker has pushed at
// least c - k times (never waits under ASP).
// Aggregation-only chunks (REGISTER with kFlagSum) run in rounds whatever the
// staleness, and answer each PUSH_PULL of a round with the plain sum of that
// round, for DistributedOptimizer.
// Sparse tables follow the same rules with the table step as the version
// (Note [Sparse tables on the network server] in server/sparse_service.h).
// A worker whose last connection drops is marked dead: every request that
// would wait for it fails at once with an ERROR frame naming it, so survivors
// raise instead of hanging.
//
// Thread safety: a Consistency belongs to one shard (each shard learns of a
// death from its own queue, after every request the worker sent it); a
// RoundMembers to the chunk or table that holds it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastps {

// Where a chunk or sparse table stands, as the rules read it.
struct Progress {
  bool in_rounds = true;  // BSP, or an aggregation-only chunk: whole rounds only
  int64_t done = 0;       // in rounds: completed rounds (the version or table step)
  const std::vector<uint32_t>* clock = nullptr;  // otherwise: pushes per worker
};

class Consistency {
 public:
  Consistency(int server_id, int num_workers, int staleness);

  int num_workers() const { return num_workers_; }
  // BSP: requests go in rounds of one push per worker.
  bool bsp() const { return staleness_ == 0; }

  // Throws InvalidArgument unless `worker` is one of the job's ranks
  // ("<what> from rank 5 but the job has 2 workers").
  void check_worker(int worker, const char* what) const;

  // May a request waiting for `need` (a round, a step or a clock) be answered now?
  bool ready(const Progress& p, uint32_t need) const;
  // Can it never be, because a worker it waits for is dead? (Under rounds any
  // dead worker blocks the round; under SSP one whose clock stays too low.)
  bool unreachable(const Progress& p, uint32_t need) const;

  // Marks `worker` dead (its last connection closed, for `reason`); returns
  // false for a rank outside the job.
  bool worker_died(int worker, const std::string& reason);
  bool any_dead() const { return any_dead_; }
  // "server 0: worker rank 1 disconnected (reason)", naming the first dead
  // worker: the start of the error a blocked waiter gets.
  std::string dead_text() const;
  // "worker rank 1 disconnected (reason)".
  std::string describe_dead(int worker) const;

 private:
  const int server_id_;
  const int num_workers_;
  const int staleness_;  // 0 BSP, k > 0 SSP, -1 ASP
  bool any_dead_ = false;
  std::vector<bool> dead_;                // per worker
  std::vector<std::string> dead_reason_;  // per worker: why its connection ended
};

// The workers that joined the round being collected: one push (or APPLY)
// each.
class RoundMembers {
 public:
  int count() const { return count_; }
  // Starts a round of `num_workers`, nobody in it yet.
  void start(int num_workers) {
    count_ = 0;
    joined_.assign(size_t(num_workers), 0);
  }
  bool has(int worker) const { return joined_[size_t(worker)] != 0; }
  void join(int worker) {
    joined_[size_t(worker)] = 1;
    ++count_;
  }
  // Ends the round (count() == 0 again); who joined stays readable.
  void close() { count_ = 0; }
  // "0, 2": the ranks that joined, for errors.
  std::string list() const;

 private:
  int count_ = 0;
  std::vector<uint8_t> joined_;
};

}  // namespace fastps
