// The network server's dense chunks: REGISTER, PUSH, PUSH_PULL, APPLY (Note
// [Deferred apply]), PULL, STATE_GET and STATE_SET, run on the shard that
// owns the chunk (Note [Shard ownership] in server/shard.h) under the rules of
// Note [Consistency] (server/consistency.h).
//
// Thread safety: a DenseService and the chunks it serves belong to one shard
// thread (they are the shard's ShardState: Note [One shard state] in
// server/shard_state.h).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "protocol/message.h"
#include "server/consistency.h"
#include "server/park.h"
#include "server/responder.h"
#include "table/dense_table.h"
#include "table/optimizer.h"

namespace fastps {

// What a parked dense request is answered with once it is ready.
enum class DenseAnswer : uint8_t {
  kParam,  // PULL, PUSH_PULL: the parameters (or a sum-only chunk's sum) at version `need`
  kMean,   // deferred PUSH_PULL: the round's mean gradient (Note [Deferred apply])
  kApply,  // APPLY: the parameters once the round is applied
};

struct DenseWaiting {
  ConnId conn;
  uint64_t request_id;
  uint64_t key;
  uint32_t need;  // version (BSP/sum) or clock bound (SSP) this request waits for
  int worker;
  DenseAnswer answer = DenseAnswer::kParam;
  Parked parked;
};

// A chunk the network server owns (OwnedDenseChunk: parameters, or the last
// round's sum for sum-only chunks; optimizer state; step counter) and its
// rounds.
struct PsChunk : OwnedDenseChunk {
  bool sum_only = false;
  OptimHyper hyper;
  std::vector<float> accum;   // BSP round sum
  // The round's first gradient, not yet copied (Note [Deferred first gradient]).
  const float* deferred = nullptr;
  Payload deferred_owner;     // its bytes, when they came in a frame
  RoundMembers round;         // who pushed in the current round (BSP, sum-only)
  int contributors = 0;       // non-skip pushes in the current round
  uint32_t version = 0;       // completed rounds (BSP) or applied pushes (SSP/ASP)
  std::vector<uint32_t> clock;  // pushes per worker (SSP/ASP)
  std::vector<DenseWaiting> waiting;
  // Note [Deferred apply]: the state of a round whose mean was sent back
  // and waits for every worker's APPLY.
  bool deferred_round = false;  // the round being pushed is a deferred one
  bool mean_ready = false;      // accum holds the last round's mean, not yet applied
  bool apply_open = false;      // an APPLY round is collecting contributions
  RoundMembers applied;         // who sent theirs in it
  std::vector<float> scales;    // scale contributions, one per worker that sent one
  int full = 0;                 // full-gradient contributions summed into `contrib`
  std::vector<float> contrib;
};

using DenseChunks = std::unordered_map<uint64_t, PsChunk>;

struct ShardState;  // server/shard_state.h

class DenseService {
 public:
  // Serves `shard`'s owned chunks under its consistency rules.
  DenseService(const Responder& out, ShardState& shard);

  // Serves a dense request from `worker` on connection `conn` (whose parking
  // budget is `budget`); answers it now, or parks it. Never throws: a failure
  // is an ERROR frame to the requester.
  void handle(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m);
  // Forgets the requests `conn` parked here (Note [Parked requests]).
  void drop_connection(ConnId conn);
  // After Consistency::worker_died(): fails the requests that can no longer
  // be answered; returns how many.
  size_t fail_unreachable();

 private:
  PsChunk& chunk(uint64_t key);
  Progress progress(const PsChunk& c) const;
  bool ready(const PsChunk& c, uint32_t need) const { return cons_.ready(progress(c), need); }

  void do_register(ConnId conn, Message& m);
  void do_push(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m);
  void join_round(PsChunk& c, int worker, Message& m, const float* g, bool deferred);
  void complete_round(PsChunk& c);
  void do_apply(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m);
  void finish_apply(PsChunk& c);
  void close_unapplied_round(PsChunk& c, int worker);
  void do_pull(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m);
  void do_state_get(ConnId conn, Message& m);
  void do_state_set(ConnId conn, Message& m);

  void serve_waiting(PsChunk& c);
  size_t fail_unreachable(PsChunk& c);

  const Responder& out_;
  Consistency& cons_;
  DenseChunks& chunks_;
};

}  // namespace fastps
