// The network server's sparse tables: SPARSE_CREATE, SPARSE_PULL,
// SPARSE_PUSH, SPARSE_STATS, SPARSE_EXPORT and SPARSE_LOAD. A SparseRouter, on
// the thread that received a request, decodes it, checks it and splits it
// into one piece per shard involved; a SparseService, on each of those shards,
// runs its piece under the rules of Note [Consistency] (server/consistency.h).
//
// Note [Sparse tables on the network server]
// A sparse table exists on every shard of every server (SPARSE_CREATE reaches
// them all); each shard owns one SparseTable with the ids routed to it (Note
// [Sparse id routing] in protocol/sparse_wire.h) and, like a chunk, is touched
// only by its shard's thread. A request is split on the thread that received
// it into one piece per shard involved (index lists into the request's
// payload, which the pieces share); each shard does its part and whichever
// finishes last sends the one reply (or the first error). Pieces of a pull
// write disjoint rows of one reply buffer; the countdown's acq_rel ordering
// publishes their writes to the finisher. No lock on this path: a mutex is
// taken only to record an error.
// Consistency, as in Note [Consistency]: under BSP every push reaches every
// shard (empty or not) and joins the round of its step, which must be the
// table's next; a shard sums the round's rows per id over all workers, and
// when all W pushed it applies the fused rule once per id with the mean
// (sum / W) at that step. Pushes are answered once their round is applied (so
// an error applying it reaches every worker), pulls once the table step is at
// least their `aux`. SSP/ASP apply each push at once (rows / W); pulls wait
// for the slowest worker's clock as chunks do.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "protocol/sparse_wire.h"
#include "server/consistency.h"
#include "server/park.h"
#include "server/responder.h"
#include "table/sparse_table.h"

namespace fastps {

// One sparse request, shared by its pieces.
struct SparseRequest {
  ConnId conn = 0;
  int worker = -1;
  ParkBudgetPtr budget;  // its connection's (Note [Parked requests])
  MessageHeader header;
  Payload payload;
  int num_shards = 1;
  // The decoded frame, the one of header.op (views into payload).
  SparseCreateRequest create;
  SparsePullRequest pull;
  SparsePushRequest push;
  SparseLoadRequest load;
  uint32_t stats_step = 0;  // SPARSE_STATS: the table step to wait for
  uint32_t export_shard = 0;  // SPARSE_EXPORT
  int64_t dim = 0;  // SPARSE_PULL, SPARSE_PUSH: the table's
  std::vector<std::vector<int64_t>> index;          // per shard: ids / records of that shard
  std::vector<std::vector<int64_t>> pending_index;  // per shard (SPARSE_LOAD)
  // The first piece that waits counts the request, once (Note [Parked requests]).
  std::once_flag park_once;
  Parked parked;
  std::string park_refused;  // why it may not wait; "" if it may
  // Results.
  std::once_flag rows_once;  // the first piece to fill makes `rows`
  std::vector<float, DefaultInitAllocator<float>> rows;  // SPARSE_PULL; every row is written by its shard
  std::vector<uint8_t> bytes;             // SPARSE_EXPORT
  std::vector<SparseTableStats> stats;    // SPARSE_STATS, per shard
  std::vector<int64_t> steps;             // SPARSE_STATS, per shard
  std::atomic<int> remaining{0};
  std::mutex error_mu;  // the error path only
  Status status = Status::kOk;
  std::string error;
};
using SparseRequestPtr = std::shared_ptr<SparseRequest>;

// Receiving thread, under PsServer's submit lock: which tables this server
// holds and their dims (so a pull's reply is sized and a push checked before
// the shards run), and the split of a request into pieces.
class SparseRouter {
 public:
  SparseRouter(int server_id, int num_shards, uint64_t max_payload)
      : server_id_(server_id), shards_(num_shards), max_payload_(max_payload) {}

  // Decodes and checks `r` (its header and payload set), and routes its ids
  // to shards; returns the shards that get a piece (none: answer at once).
  // Throws Error (CapacityError: ERROR(LIMIT)) for a request to refuse.
  std::vector<int> split(SparseRequest& r);

 private:
  int64_t dim_of(uint64_t key) const;
  void check_cap_share(const SparseTableConfig& c, const SparseSpread& spread) const;
  std::vector<int> split_create(SparseRequest& r);
  std::vector<int> split_load(SparseRequest& r);
  std::vector<int> all_shards() const;

  const int server_id_;
  const int shards_;
  const uint64_t max_payload_;
  std::unordered_map<uint64_t, int64_t> dim_;  // table id -> dim
};

// A piece of a request waiting on a table of one shard.
struct SparseWait {
  SparseRequestPtr req;
  uint32_t need;
  int shard;
  bool is_push;  // a BSP push waiting for its round (nothing to fill)
};

// One table's slice on one shard.
struct SparseSlice {
  SparseTableConfig config;  // caps as the user set them: this server takes its share (`spread`)
  SparseSpread spread;
  std::unique_ptr<SparseTable> table;
  int64_t step = 0;          // BSP: applied rounds; SSP/ASP: the largest step pushed
  // BSP round being accumulated.
  RoundMembers round;
  std::unordered_map<int64_t, int64_t> slot;  // id -> index in round_ids
  std::vector<int64_t> round_ids;
  std::vector<float> accum;
  SparseOptim optim;
  std::vector<uint32_t> clock;  // pushes per worker (SSP/ASP)
  std::vector<SparseWait> waiting;
};

using SparseTables = std::unordered_map<uint64_t, SparseSlice>;  // table id -> this shard's slice

struct ShardState;  // server/shard_state.h

class SparseService {
 public:
  // Serves `shard`'s sparse tables under its consistency rules.
  SparseService(const Responder& out, ShardState& shard);

  // Runs request `r`'s piece for shard `shard`; the last piece to finish
  // answers it. Never throws: a failure is recorded for the reply.
  void run(const SparseRequestPtr& r, int shard);
  // Forgets the pieces `conn` parked here (Note [Parked requests]).
  void drop_connection(ConnId conn);
  // After Consistency::worker_died(): fails the pieces that can no longer be
  // answered; returns how many.
  size_t fail_unreachable();

 private:
  void piece_failed(const SparseRequestPtr& r, Status status, const std::string& msg);
  void piece_done(const SparseRequestPtr& r);
  void reply_stats(const SparseRequest& r);
  SparseSlice& table(uint64_t key);
  Progress progress(const SparseSlice& t) const { return Progress{cons_.bsp(), t.step, &t.clock}; }
  void park(SparseRequest& r, bool capped);

  void create(SparseRequest& r, int shard);
  void pull(const SparseRequestPtr& r, int shard);
  void push(const SparseRequestPtr& r, int shard);
  void push_round(SparseSlice& t, const SparseRequestPtr& r, int shard);
  void load(SparseRequest& r, int shard);
  void run_or_wait(SparseSlice& t, const SparseRequestPtr& r, int shard, uint32_t need);
  void fill(SparseSlice& t, SparseRequest& r, int shard);
  void accumulate(SparseSlice& t, const SparseRequest& r, int shard);
  std::string apply_round(SparseSlice& t, int64_t step);

  void serve_waiting(SparseSlice& t);
  size_t fail_unreachable(SparseSlice& t);

  const Responder& out_;
  Consistency& cons_;
  SparseTables& tables_;
};

}  // namespace fastps
