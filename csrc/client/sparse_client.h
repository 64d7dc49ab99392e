// ShardedSparseTable: an in-process sparse embedding table spread over the
// shards of a Server, one SparseTable per shard (see table/sparse_table.h).
// Each shard keeps its SparseTable in its own state, under this table's id
// (Note [One shard state] in server/shard_state.h).
//
// Routing: id -> shard sparse_shard_of(id, num_shards), the network server's
// rule (Note [Sparse id routing] in protocol/sparse_wire.h). Every call splits its ids into
// one Task per shard (index lists into the caller's arrays, no copies of
// values), submits them and waits on one Completion with a deadline
// (TimeoutError past it). Each SparseTable is touched only by its shard's
// thread, through those Tasks (see Note [Shard ownership] in server/shard.h).
//
// Memory contract: pull() writes out[i * dim ...] for every i < n and push()
// reads ids and grads only until the call returns.
//
// Thread safety: any thread may call any method. push(), save() and load()
// are serialised with each other by a mutex (so a capacity check and the push
// it guards see the same table); pull(), size() and stats() are not, and see
// each shard either before or after a concurrent push's part on that shard.
// A save() taken while another thread pushes is consistent per shard, not
// across shards.
//
// Capacity: max_rows is split over the shards (shard s gets max_rows / S, plus
// one for s < max_rows % S: sparse_shard_table(), as on a network server).
// With eviction off, push() first asks every shard whether its new rows fit
// and throws CapacityError before any shard changes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "server/server.h"
#include "table/sparse_optim.h"
#include "table/sparse_table.h"

namespace fastps {

class ShardedSparseTable {
 public:
  // `server` must outlive the table. Validates `config` (InvalidArgument).
  ShardedSparseTable(Server& server, const SparseTableConfig& config,
                     std::chrono::milliseconds timeout = std::chrono::milliseconds(300000));
  ~ShardedSparseTable();
  ShardedSparseTable(const ShardedSparseTable&) = delete;
  ShardedSparseTable& operator=(const ShardedSparseTable&) = delete;

  const SparseTableConfig& config() const { return config_; }
  int64_t dim() const { return config_.dim; }
  int num_shards() const { return shards_; }
  int shard_of(int64_t id) const;  // Note [Sparse id routing] in protocol/sparse_wire.h

  // out: n x dim floats. Ids without a row read as their initial value; no
  // row is created.
  void pull(const int64_t* ids, int64_t n, float* out);
  // pull() straight into a batch's output: the row of ids[i] goes to rows
  // first[i], next[first[i]], ... of out (see SparseTable::pull_scatter;
  // embedding_chains() in table/embedding_ops.h builds first and next).
  void pull_scatter(const int64_t* ids, int64_t n, const int64_t* first, const int64_t* next, float* out);
  // One optimizer step on the rows of `ids` (unique; duplicates are applied
  // one after the other) with gradients `grads` (n x dim). `rule.rule` must be
  // the table's rule. `step` (>= 1) is the table-wide step of this push; it
  // becomes the table's step().
  void push(const int64_t* ids, int64_t n, const float* grads, const SparseOptim& rule, int64_t step);

  int64_t size();
  SparseTableStats stats();

  // Atomic write of every row with its optimizer state and metadata, the
  // pending admission counts, the step and the config (docs/sparse.md).
  void save(const std::string& path);
  // Reads `path` into new tables, checks it completely (checksum included),
  // then swaps them in. On any error the live table is unchanged. The file
  // must have this table's dim, rule, initialiser and seed (InvalidArgument
  // otherwise); caps, eviction and admission come from this table.
  void load(const std::string& path);

  // The table-wide step that pulls record as the access time (TTL).
  void set_step(int64_t step);
  int64_t step() const { return step_.load(std::memory_order_acquire); }

 private:
  using ShardFn = std::function<void(SparseTable&)>;
  // Runs per_shard[s] (if set) on shard s, all in parallel; waits.
  void run(std::vector<ShardFn> per_shard, const char* what);
  // Makes per_shard[s] shard s's slice of this table (replacing the old one); waits.
  void install(std::vector<std::unique_ptr<SparseTable>> per_shard, const char* what);
  // Has every shard drop its slice of this table, after what is queued there; does not wait.
  void drop_slices();
  // Runs body(table, index, m, step) on every shard holding some of ids[0, n)
  // (index: their positions, null with one shard) at the table's current step.
  template <typename F>
  void each_shard(const int64_t* ids, int64_t n, const char* what, F body);
  std::shared_ptr<std::vector<std::vector<int64_t>>> route(const int64_t* ids, int64_t n) const;
  SparseTable make_table(int shard) const;

  Server& server_;
  const uint64_t id_;  // this table's key in every shard's state
  const int shards_;
  SparseTableConfig config_;
  std::chrono::milliseconds timeout_;
  std::atomic<int64_t> step_{0};
  std::mutex write_mu_;  // serialises push, save and load
};

}  // namespace fastps
