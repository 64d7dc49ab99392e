#include "server/ps_server.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>

#include "common/error.h"
#include "protocol/sparse_wire.h"
#include "table/optimizer.h"
#include "table/sparse_table.h"

namespace fastps {

// Note [Parked requests]
// A request that waits for a later round or step (a PULL, a PUSH_PULL, a
// SPARSE_PULL, a SPARSE_STATS, a BSP SPARSE_PUSH) is parked on its shard. What
// the server holds for it is bounded by what its peer sent: the payload as
// received (a sparse request's ids, which its per-shard index lists double),
// and a small fixed record. Nothing is sized by a number in the request until
// the reply is produced: a sparse pull's rows are made by the first shard that
// can fill them, a dense pull is answered from the chunk itself. So a pull of
// one id of a wide table for a step no one will reach costs its 56 bytes, not
// the 64 MiB of its eventual reply.
// Per connection, a ParkBudget counts the parked requests and their payload
// bytes across shards (atomics: the shard that parks a request takes from it,
// a Parked ticket gives back when the request is answered or dropped). A
// request that only reads (PULL, SPARSE_PULL, SPARSE_STATS) and would take
// the connection past max_parked_requests or max_parked_bytes is answered
// ERROR(LIMIT) at once and changes nothing. A push that joins a round is
// counted but never refused: its gradient is already part of the round (on
// some shards, for a sparse push), and a worker has at most one waiting per
// chunk or table and round, so the job's size bounds them.
// When a connection closes, every shard drops the requests it parked for it
// (on_disconnect), whatever the rank's other connections do; a rank whose last
// connection closed is, in addition, dead (Note [Consistency]).
struct PsServer::ParkCounters {
  std::atomic<int64_t> requests{0};
  std::atomic<int64_t> bytes{0};
};

class PsServer::ParkBudget {
 public:
  ParkBudget(int64_t max_requests, int64_t max_bytes, std::shared_ptr<ParkCounters> total)
      : max_requests_(max_requests), max_bytes_(max_bytes), total_(std::move(total)) {}

  // Any thread. Counts one more parked request holding `bytes`. With
  // `capped`, refuses instead (counting nothing) when that would take the
  // connection past a limit, and returns why; "" when counted.
  std::string take(int64_t bytes, bool capped) {
    const int64_t n = mine_.requests.fetch_add(1, std::memory_order_relaxed) + 1;
    const int64_t b = mine_.bytes.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    if (capped && (n > max_requests_ || b > max_bytes_)) {
      mine_.requests.fetch_sub(1, std::memory_order_relaxed);
      mine_.bytes.fetch_sub(bytes, std::memory_order_relaxed);
      if (n > max_requests_)
        return detail::concat("this connection has ", n - 1, " requests waiting for a later round or step, and ",
                              max_requests_, " is the most one connection may park; wait for their replies "
                              "before asking for more (docs/protocol.md, Limits)");
      return detail::concat("the requests waiting on this connection for a later round or step hold ", b - bytes,
                            " bytes; this one (", bytes, " bytes) would pass the ", max_bytes_,
                            " bytes one connection may park; wait for their replies before asking for more "
                            "(docs/protocol.md, Limits)");
    }
    total_->requests.fetch_add(1, std::memory_order_relaxed);
    total_->bytes.fetch_add(bytes, std::memory_order_relaxed);
    return std::string();
  }

  void give(int64_t bytes) {
    mine_.requests.fetch_sub(1, std::memory_order_relaxed);
    mine_.bytes.fetch_sub(bytes, std::memory_order_relaxed);
    total_->requests.fetch_sub(1, std::memory_order_relaxed);
    total_->bytes.fetch_sub(bytes, std::memory_order_relaxed);
  }

 private:
  const int64_t max_requests_;
  const int64_t max_bytes_;
  const std::shared_ptr<ParkCounters> total_;
  ParkCounters mine_;
};

namespace {

// What a parked request is answered with once it is ready.
enum class Answer : uint8_t {
  kParam,  // PULL, PUSH_PULL: the parameters (or a sum-only chunk's sum) at version `need`
  kMean,   // deferred PUSH_PULL: the round's mean gradient (Note [Deferred apply])
  kApply,  // APPLY: the parameters once the round is applied
};

using ParkBudgetPtr = std::shared_ptr<PsServer::ParkBudget>;

// One request's share of its connection's ParkBudget, given back when the
// ticket goes (Note [Parked requests]). Move-only.
class Parked {
 public:
  Parked() = default;
  Parked(ParkBudgetPtr budget, int64_t bytes) : budget_(std::move(budget)), bytes_(bytes) {}
  Parked(Parked&& other) noexcept : budget_(std::move(other.budget_)), bytes_(other.bytes_) {}
  Parked& operator=(Parked&& other) noexcept {
    if (this != &other) {
      release();
      budget_ = std::move(other.budget_);
      bytes_ = other.bytes_;
    }
    return *this;
  }
  Parked(const Parked&) = delete;
  Parked& operator=(const Parked&) = delete;
  ~Parked() { release(); }

 private:
  void release() {
    if (budget_) budget_->give(bytes_);
    budget_.reset();
  }
  ParkBudgetPtr budget_;
  int64_t bytes_ = 0;
};

// Gives a waiting list's memory back once most of it is unused: a burst of
// parked requests must not stay allocated after they went (Note [Parked
// requests]). The slack of 4x keeps the cost amortised O(1) per request.
template <typename T>
void trim_waiting(std::vector<T>& v) {
  if (v.capacity() > 64 && v.size() < v.capacity() / 4) v.shrink_to_fit();
}

struct Waiting {
  ConnId conn;
  uint64_t request_id;
  uint64_t key;
  uint32_t need;    // version (BSP/sum) or clock bound (SSP) this request waits for
  int worker;
  Answer answer = Answer::kParam;
  Parked parked;
};

struct PsChunk {
  bool sum_only = false;
  int64_t numel = 0;
  std::vector<float> param;  // parameters, or the last round's sum for sum-only chunks
  std::vector<float> state[kMaxStateBuffers];
  float step = 0.0f;          // torch's float32 state['step']
  bool fresh = true;          // SGD: momentum buffer not yet initialised
  OptimHyper hyper;
  std::vector<float> accum;   // BSP round sum
  // The round's first gradient, not yet copied (Note [Deferred first gradient]).
  const float* deferred = nullptr;
  Payload deferred_owner;     // its bytes, when they came in a frame
  int pushes = 0;             // pushes in the current round
  std::vector<uint8_t> pushed;  // which workers pushed in the current round (BSP)
  int contributors = 0;       // non-skip pushes in the current round
  uint32_t version = 0;       // completed rounds (BSP) or applied pushes (SSP/ASP)
  std::vector<uint32_t> clock;  // pushes per worker (SSP/ASP)
  std::vector<Waiting> waiting;
  // Note [Deferred apply]: the state of a round whose mean was sent back
  // and waits for every worker's APPLY.
  bool deferred_round = false;  // the round being pushed is a deferred one
  bool mean_ready = false;      // accum holds the last round's mean, not yet applied
  bool apply_open = false;      // an APPLY round is collecting contributions
  int applies = 0;              // APPLYs received in it
  std::vector<uint8_t> applied;  // which workers sent theirs
  std::vector<float> scales;    // scale contributions, one per worker that sent one
  int full = 0;                 // full-gradient contributions summed into `contrib`
  std::vector<float> contrib;
};

struct MessageTask : Task {
  std::function<void(Shard&)> fn;
  void run(Shard& shard) override { fn(shard); }
};

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
struct SparseRequest {
  ConnId conn = 0;
  int worker = -1;
  ParkBudgetPtr budget;  // its connection's (Note [Parked requests])
  MessageHeader header;
  Payload payload;
  int num_shards = 1;
  // Views into payload, set by dispatch_sparse.
  const uint8_t* ids = nullptr;  // int64 ids (possibly unaligned: memcpy'd)
  int64_t n = 0;
  const uint8_t* grads = nullptr;
  int64_t dim = 0;
  SparseOptim optim;
  SparseTableConfig config;  // SPARSE_CREATE / SPARSE_LOAD: the user's caps, spread as `spread` says
  SparseSpread spread;
  int64_t load_step = 0;
  const uint8_t* records = nullptr;  // SPARSE_LOAD
  int64_t record_bytes = 0;
  const uint8_t* pending = nullptr;
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

  int64_t id(int64_t k) const {
    int64_t v;
    std::memcpy(&v, ids + 8 * k, 8);
    return v;
  }
};
using SparseRequestPtr = std::shared_ptr<SparseRequest>;

struct SparseWait {
  SparseRequestPtr req;
  uint32_t need;
  int shard;
  bool is_push;  // a BSP push waiting for its round (nothing to fill)
};

struct PsSparse {
  SparseTableConfig config;  // caps as the user set them: this server takes its share (`spread`)
  SparseSpread spread;
  std::unique_ptr<SparseTable> table;
  int64_t step = 0;          // BSP: applied rounds; SSP/ASP: the largest step pushed
  // BSP round being accumulated.
  int pushes = 0;
  std::vector<uint8_t> pushed;
  std::unordered_map<int64_t, int64_t> slot;  // id -> index in round_ids
  std::vector<int64_t> round_ids;
  std::vector<float> accum;
  SparseOptim optim;
  std::vector<uint32_t> clock;  // pushes per worker (SSP/ASP)
  std::vector<SparseWait> waiting;
};

}  // namespace

struct PsServer::ShardState {
  std::unordered_map<uint64_t, PsChunk> chunks;
  std::unordered_map<uint64_t, PsSparse> sparse;  // table id -> this shard's slice
  std::vector<bool> dead;  // per worker
  std::vector<std::string> dead_reason;  // per worker: why its connection ended (for the survivors' errors)
};

namespace {

// Sends a reply frame (or hands it to the local sink). Any thread; never
// waits for the requester to read (Note [Send queues] in transport/tcp.h).
// A reply to a connection that closed is dropped quietly: the transport
// logged the close, and the disconnect handler deals with the worker.
void send_reply(const PsServerOptions& o, Transport& tr, const LocalSink& local, ConnId conn,
                const MessageHeader& req, Op op, const void* data, size_t bytes, uint32_t count) {
  MessageHeader h;
  h.op = op;
  h.request_id = req.request_id;
  h.key = req.key;
  h.count = count;
  if (conn == kLocalConn) {
    local(h, data, bytes);
    return;
  }
  ConstBuffer seg{data, bytes};
  try {
    // A reply larger than the peer accepts would be refused by send(): the
    // requester gets an error instead of waiting for its deadline.
    uint64_t peer_max = 0;
    if (bytes > kMinMaxPayload && bytes > (peer_max = tr.peer_info(conn).max_payload)) {
      tr.send_error(conn, req.request_id, Status::kLimit,
                    detail::concat("server ", o.server_id, ": the reply of ", bytes,
                                   " bytes exceeds the largest payload this client accepts (", peer_max,
                                   "); ask for fewer ids or values per call, or spread the table over "
                                   "more shards or servers"),
                    req.key);
      return;
    }
    tr.send(conn, h, bytes ? &seg : nullptr, bytes ? 1 : 0);
  } catch (const ConnectionError&) {
  } catch (const Error& e) {
    transport_log(detail::concat("server ", o.server_id, ": reply dropped: ", e.what()));
  }
}

void send_error_to(const PsServerOptions& o, Transport& tr, const LocalSink& local, ConnId conn,
                   uint64_t rid, uint64_t key, Status status, const std::string& msg) {
  if (conn == kLocalConn) {
    MessageHeader h;
    h.op = Op::kError;
    h.status = uint32_t(status);
    h.request_id = rid;
    h.key = key;
    local(h, msg.data(), msg.size());
    return;
  }
  try {
    tr.send_error(conn, rid, status, msg, key);
  } catch (const ConnectionError&) {
  } catch (const Error& e) {
    transport_log(detail::concat("server ", o.server_id, ": error reply dropped: ", e.what()));
  }
}

class Handler {
 public:
  Handler(const PsServerOptions& o, Transport& t, PsServer::ShardState& s, const LocalSink& local)
      : opt_(o), tr_(t), st_(s), local_(local) {}

  void handle(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
    try {
      switch (m.header.op) {
        case Op::kRegister: return do_register(conn, m);
        case Op::kPush:
        case Op::kPushPull: return do_push(conn, worker, budget, m);
        case Op::kPull: return do_pull(conn, worker, budget, m);
        case Op::kStateGet: return do_state_get(conn, m);
        case Op::kStateSet: return do_state_set(conn, m);
        case Op::kApply: return do_apply(conn, worker, budget, m);
        case Op::kPing: return reply(conn, m.header, Op::kPong, body(m), m.header.payload_len,
                                     m.header.count);
        default:
          throw InvalidArgument(detail::concat("server cannot serve op ", op_name(m.header.op)));
      }
    } catch (const CapacityError& e) {
      error(conn, m.header.request_id, m.header.key, Status::kLimit, e.what());
    } catch (const Error& e) {
      error(conn, m.header.request_id, m.header.key, Status::kInvalidArgument, e.what());
    } catch (const std::exception& e) {  // bad_alloc and the like: the requester still gets an answer
      error(conn, m.header.request_id, m.header.key, Status::kInternal, internal_error_text(e));
    }
  }

  std::string internal_error_text(const std::exception& e) const {
    return detail::concat("server ", opt_.server_id, ": internal error (", e.what(),
                          "); the request may be partly applied, restart the job from a checkpoint");
  }

  // Forgets the requests `conn` parked on this shard: its peer is gone, and
  // nothing may stay for it (Note [Parked requests]). A push it made stays in
  // its round.
  void drop_connection(ConnId conn) {
    for (auto& kv : st_.chunks) {
      std::vector<Waiting>& w = kv.second.waiting;
      w.erase(std::remove_if(w.begin(), w.end(), [&](const Waiting& x) { return x.conn == conn; }), w.end());
      trim_waiting(w);
    }
    for (auto& kv : st_.sparse) take_waiting(kv.second, [&](const SparseWait& x) { return x.req->conn == conn; });
  }

  // "worker rank 1 disconnected (peer ... sent nothing for 30 s ...)": the reason reaches the survivors.
  std::string describe_dead(int worker) const {
    const std::string& why = st_.dead_reason[worker];
    return why.empty() ? detail::concat("worker rank ", worker, " disconnected")
                       : detail::concat("worker rank ", worker, " disconnected (", why, ")");
  }

  void worker_died(int worker, const std::string& reason) {
    if (worker < 0 || worker >= opt_.num_workers) return;
    st_.dead[worker] = true;
    st_.dead_reason[worker] = reason;
    size_t failed = 0;
    for (auto& kv : st_.chunks) failed += fail_unreachable(kv.first, kv.second, reason);
    for (auto& kv : st_.sparse) failed += fail_unreachable_sparse(kv.second);
    // A clean exit leaves nothing waiting; only a loss worth knowing about is logged.
    if (failed > 0)
      transport_log(detail::concat("server ", opt_.server_id, ": worker rank ", worker,
                                   " disconnected (", reason, "); failed ", failed,
                                   " request(s) waiting for it"));
  }

 private:
  PsChunk& chunk(uint64_t key) {
    auto it = st_.chunks.find(key);
    FASTPS_CHECK(it != st_.chunks.end(), "server ", opt_.server_id, " has no chunk with key ", key,
                 " (tensor ", key >> 16, " chunk ", key & 0xffff, "); was it registered?");
    return it->second;
  }

  // A frame's payload: its own buffer, or (a local request, Note [Local
  // requests]) the worker's memory, valid until the request completes; a
  // local request may keep its first in_place_offset bytes (a config block)
  // in its own buffer and the rest in place (Message::in_place_offset).
  static const uint8_t* body(const Message& m) {
    return m.in_place && m.in_place_offset == 0 ? m.in_place : m.payload.data();
  }
  // Bytes of the payload readable at body(m).
  static size_t body_len(const Message& m) {
    return m.in_place && m.in_place_offset != 0 ? m.in_place_offset : m.header.payload_len;
  }

  const float* floats(const Message& m, size_t offset, int64_t n) {
    FASTPS_CHECK(m.header.payload_len == offset + size_t(n) * 4, op_name(m.header.op), " payload of ",
                 m.header.payload_len, " bytes, expected ", offset + size_t(n) * 4);
    if (m.in_place && m.in_place_offset != 0) {
      FASTPS_CHECK(offset == m.in_place_offset, op_name(m.header.op), ": values at byte ", offset,
                   " of a request split at byte ", m.in_place_offset);
      return reinterpret_cast<const float*>(m.in_place);
    }
    return reinterpret_cast<const float*>(body(m) + offset);
  }

  size_t read_config(const Message& m, OptimHyper* hyper) {
    if (!(m.header.flags & kFlagConfig)) return 0;
    size_t used = 0;
    *hyper = decode_optim_config(body(m), body_len(m), &used);
    return used;
  }

  void ensure_state(PsChunk& c) {
    const int need = optim_state_count(c.hyper);
    for (int i = 0; i < need; ++i) {
      if (c.state[i].size() == size_t(c.numel)) continue;
      const float init =
          c.hyper.kind == OptimKind::kAdagrad ? float(c.hyper.initial_accumulator_value) : 0.0f;
      c.state[i].assign(c.numel, init);
    }
  }

  void do_register(ConnId conn, Message& m) {
    // Everything is checked before the key is touched: a bad REGISTER must
    // leave no half-made chunk behind (its clock vector would be empty).
    OptimHyper hyper;
    size_t off = read_config(m, &hyper);
    const int64_t n = m.header.count;
    FASTPS_CHECK(n > 0, "REGISTER of an empty chunk");
    const float* init = floats(m, off, n);
    PsChunk& c = st_.chunks[m.header.key];
    // A registration replaces the chunk: requests still waiting on the old one
    // can never be answered by it (a worker re-registering while others wait).
    for (const Waiting& w : c.waiting)
      error(w.conn, w.request_id, w.key, Status::kInvalidArgument,
            detail::concat("server ", opt_.server_id, ": key ", w.key,
                           " was registered again while this request waited; re-register only "
                           "between rounds"));
    c = PsChunk();
    c.sum_only = (m.header.flags & kFlagSum) != 0;
    c.numel = n;
    c.hyper = hyper;
    c.param.assign(init, init + n);
    c.clock.assign(opt_.num_workers, 0);
    if (!c.sum_only) ensure_state(c);
    reply(conn, m.header, Op::kReply, nullptr, 0, 0);
  }

  void do_push(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
    FASTPS_CHECK(worker >= 0 && worker < opt_.num_workers, "PUSH from rank ", worker,
                 " but the job has ", opt_.num_workers, " workers");
    PsChunk& c = chunk(m.header.key);
    OptimHyper hyper = c.hyper;
    size_t off = read_config(m, &hyper);
    const bool skip = (m.header.flags & kFlagSkip) != 0;
    const float* g = skip ? nullptr : floats(m, off, c.numel);
    const bool push_pull = m.header.op == Op::kPushPull;
    const bool deferred = (m.header.flags & kFlagDeferred) != 0;
    FASTPS_CHECK(!deferred || (push_pull && !c.sum_only && opt_.staleness == 0),
                 "a deferred push must be a PUSH_PULL to an optimizer chunk under BSP (staleness 0)");
    if (!c.sum_only) c.hyper = hyper;
    if (c.sum_only || opt_.staleness == 0) {
      // One round at a time (Note [Consistency]).
      if (c.pushes == 0) {
        if (c.mean_ready || c.apply_open) close_unapplied_round(c, worker);
        c.deferred_round = deferred;
        c.contributors = 0;
        c.pushed.assign(opt_.num_workers, 0);
      }
      FASTPS_CHECK(c.deferred_round == deferred, "worker rank ", worker, " mixed deferred and immediate ",
                   "pushes of key ", m.header.key, " in one round (every rank must run the same mode)");
      FASTPS_CHECK(!c.pushed[worker], "worker rank ", worker, " pushed key ", m.header.key,
                   " twice in round ", c.version + 1,
                   " (accumulating gradients over several backward passes needs no_sync())");
      c.pushed[worker] = 1;
      if (g) {
        // Note [Deferred first gradient]
        // Copying the round's first gradient into the sum and adding the
        // second to it are two passes over memory; keeping the first where it
        // is and writing first + second into the sum is one (the same
        // float32 additions in the same order). The first stays valid: a
        // frame's payload moves into the chunk; a local request's tensor is
        // the caller's until its PUSH_PULL is answered at the end of the
        // round (a local PUSH is answered at once, so it is added now).
        if (c.contributors == 0 && (m.in_place == nullptr || push_pull)) {
          if (m.in_place == nullptr) {
            c.deferred_owner = std::move(m.payload);  // the buffer moves, `g` stays valid
          }
          c.deferred = g;
        } else if (c.contributors == 0) {
          c.accum.assign(g, g + c.numel);
        } else if (c.deferred != nullptr) {
          c.accum.resize(c.numel);
          float* a = c.accum.data();
          const float* d = c.deferred;
          for (int64_t i = 0; i < c.numel; ++i) a[i] = d[i] + g[i];
          drop_deferred(c);
        } else {
          float* a = c.accum.data();
          for (int64_t i = 0; i < c.numel; ++i) a[i] += g[i];
        }
        ++c.contributors;
      }
      ++c.pushes;
      const uint32_t round = c.version + 1;
      if (push_pull) {  // counted, never refused: it is in the round already
        c.waiting.push_back(Waiting{conn, m.header.request_id, m.header.key, round, worker,
                                    deferred ? Answer::kMean : Answer::kParam, park(budget, 0, false)});
      } else {
        reply(conn, m.header, Op::kReply, nullptr, 0, 0);
      }
      if (c.pushes == opt_.num_workers) {
        complete_round(c);
      } else {
        fail_unreachable(m.header.key, c, "");
      }
      return;
    }
    // SSP / ASP: apply at once.
    c.clock[worker] += 1;
    if (g) {
      std::vector<float> mean(g, g + c.numel);
      const float w = float(opt_.num_workers);
      for (float& x : mean) x /= w;
      apply(c, mean.data());
    }
    c.version += 1;
    reply(conn, m.header, Op::kReply, nullptr, 0, 0);
    serve_waiting(m.header.key, c);
  }

  static void drop_deferred(PsChunk& c) {
    c.deferred = nullptr;
    c.deferred_owner = Payload();
  }

  void complete_round(PsChunk& c) {
    if (c.deferred != nullptr) {  // a single contributor
      c.accum.assign(c.deferred, c.deferred + c.numel);
      drop_deferred(c);
    }
    if (c.contributors == 0) c.accum.assign(c.numel, 0.0f);  // every worker skipped
    if (c.deferred_round) {  // Note [Deferred apply]: the mean goes back, the step waits
      if (c.contributors > 0) {
        const float w = float(opt_.num_workers);
        for (float& x : c.accum) x /= w;
      }
      c.pushes = 0;
      c.mean_ready = true;
      serve_waiting(0, c);
      return;
    }
    if (c.sum_only) {
      c.param.swap(c.accum);
    } else if (c.contributors > 0) {
      const float w = float(opt_.num_workers);
      for (float& x : c.accum) x /= w;
      apply(c, c.accum.data());
    }
    c.pushes = 0;
    c.version += 1;
    serve_waiting(0, c);
  }

  // Note [Deferred apply]
  // Under BSP, fastps.optim pushes gradients during backward as deferred
  // PUSH_PULLs: the round's mean (sum / W) is computed as for an immediate
  // round but sent back to every worker instead of being applied, so that
  // after backward each rank's .grad holds what DDP's all-reduce leaves there
  // and a script may clip, unscale or log it. In optimizer.step() every worker
  // sends one APPLY per chunk with its contribution: SKIP (none: no gradient,
  // or another rank's turn), SCALE (the mean times one float32 factor, as
  // clip_grad_norm_ or GradScaler.unscale_ leave it: 4 bytes instead of a
  // gradient), or a full gradient (any other edit). When all W arrived, the
  // step's gradient is the average of the contributions (exactly mean * s
  // when every contribution is the same scale s; nothing is applied when all
  // abstain), the optimizer runs once with the APPLYs' hyperparameters, and
  // each APPLY is answered with the new parameters. An APPLY round may also
  // open without a pushed mean (full or SKIP contributions only): a model
  // kept in DistributedDataParallel has its gradients averaged already, and
  // one rank per tensor sends them. A round whose mean nobody applied (every
  // rank skipped step(), as GradScaler does on an overflow) is dropped when
  // the next round's first push arrives; one that only some ranks applied is
  // an error for all of them.
  void do_apply(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
    FASTPS_CHECK(worker >= 0 && worker < opt_.num_workers, "APPLY from rank ", worker,
                 " but the job has ", opt_.num_workers, " workers");
    PsChunk& c = chunk(m.header.key);
    FASTPS_CHECK(!c.sum_only && opt_.staleness == 0,
                 "APPLY needs an optimizer chunk under BSP (staleness 0); key ", m.header.key, " is not one");
    FASTPS_CHECK(c.pushes == 0, "APPLY of key ", m.header.key, " while its round still collects pushes (",
                 c.pushes, " of ", opt_.num_workers, "): a round's pushes all come before its APPLYs");
    OptimHyper hyper = c.hyper;
    const size_t off = read_config(m, &hyper);
    const bool skip = (m.header.flags & kFlagSkip) != 0;
    const bool scaled = (m.header.flags & kFlagScale) != 0;
    FASTPS_CHECK(!(skip && scaled), "APPLY with both SKIP and SCALE");
    FASTPS_CHECK(!scaled || c.mean_ready, "APPLY with a SCALE of key ", m.header.key,
                 " but no round mean to scale (push the round's gradients first)");
    const float* scale = scaled ? floats(m, off, 1) : nullptr;
    const float* g = skip || scaled ? nullptr : floats(m, off, c.numel);
    if (!c.apply_open) {
      c.apply_open = true;
      c.applies = 0;
      c.applied.assign(opt_.num_workers, 0);
      c.scales.clear();
      c.full = 0;
    }
    FASTPS_CHECK(!c.applied[worker], "worker rank ", worker, " sent APPLY twice for key ", m.header.key,
                 " in one round");
    c.applied[worker] = 1;
    ++c.applies;
    c.hyper = hyper;
    if (scale != nullptr) {
      c.scales.push_back(*scale);
    } else if (g != nullptr) {
      if (c.full == 0) {
        c.contrib.assign(g, g + c.numel);
      } else {
        float* a = c.contrib.data();
        for (int64_t i = 0; i < c.numel; ++i) a[i] += g[i];
      }
      ++c.full;
    }
    // Counted, never refused: its contribution is in the round already.
    c.waiting.push_back(Waiting{conn, m.header.request_id, m.header.key, 0, worker, Answer::kApply,
                                park(budget, 0, false)});
    if (c.applies == opt_.num_workers) {
      finish_apply(c);
    } else {
      fail_unreachable(m.header.key, c, "");
    }
  }

  void finish_apply(PsChunk& c) {
    const int k = c.full + int(c.scales.size());
    if (k > 0) {
      const bool uniform = c.full == 0 && std::all_of(c.scales.begin(), c.scales.end(),
                                                      [&](float s) { return s == c.scales[0]; });
      const float* grad;
      if (uniform) {  // exactly fl(mean * s), as the workers' .grad holds it
        const float s = c.scales[0];
        if (s != 1.0f)
          for (float& x : c.accum) x *= s;
        grad = c.accum.data();
      } else {
        if (c.full == 0) c.contrib.assign(c.numel, 0.0f);
        float* a = c.contrib.data();
        const float* mean = c.accum.data();
        for (float s : c.scales)
          for (int64_t i = 0; i < c.numel; ++i) a[i] += mean[i] * s;
        if (k > 1) {
          const float kf = float(k);
          for (int64_t i = 0; i < c.numel; ++i) a[i] /= kf;
        }
        grad = a;
      }
      apply(c, grad);
    }
    c.version += 1;
    c.apply_open = false;
    c.mean_ready = false;
    serve_waiting(0, c);
  }

  // A push opens a new round while the last deferred one was not applied:
  // dropped if no rank applied it (all skipped step()); an error for every
  // rank involved if only some did.
  void close_unapplied_round(PsChunk& c, int worker) {
    if (c.apply_open && c.applies > 0) {
      std::string who;
      for (int w = 0; w < opt_.num_workers; ++w)
        if (c.applied[w]) who += detail::concat(who.empty() ? "" : ", ", w);
      const std::string msg = detail::concat(
          "server ", opt_.server_id, ": worker rank ", worker,
          " pushed the next round's gradient while rank(s) ", who,
          " ran optimizer.step() for the last one; every rank must call step() after the same "
          "backward passes, or every rank skip it (GradScaler skips on every rank alike)");
      auto keep = c.waiting.begin();
      for (auto it = c.waiting.begin(); it != c.waiting.end(); ++it) {
        if (it->answer == Answer::kApply) {
          error(it->conn, it->request_id, it->key, Status::kInvalidArgument, msg);
        } else {
          *keep++ = std::move(*it);
        }
      }
      c.waiting.erase(keep, c.waiting.end());
      c.apply_open = false;
      c.mean_ready = false;
      c.version += 1;
      throw InvalidArgument(msg);
    }
    c.apply_open = false;
    c.mean_ready = false;
    c.version += 1;  // the dropped round
  }

  void apply(PsChunk& c, const float* grad) {
    ensure_state(c);
    float* st[kMaxStateBuffers] = {c.state[0].data(), c.state[1].data(), c.state[2].data()};
    double step = 1.0;
    if (c.hyper.kind != OptimKind::kSGD) {
      c.step += 1.0f;
      step = c.step;
    }
    optim_update(c.hyper, step, c.fresh, c.param.data(), grad, st, c.numel);
    c.fresh = false;
  }

  // SSP bound: the slowest live worker's clock.
  uint32_t min_clock(const PsChunk& c) const {
    uint32_t m = UINT32_MAX;
    for (int w = 0; w < opt_.num_workers; ++w) m = std::min(m, c.clock[w]);
    return m;
  }

  bool ready(const PsChunk& c, uint32_t need) const {
    if (c.sum_only || opt_.staleness == 0) return c.version >= need;
    if (opt_.staleness < 0) return true;
    return uint64_t(min_clock(c)) + uint64_t(opt_.staleness) >= need;
  }

  void do_pull(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
    PsChunk& c = chunk(m.header.key);
    FASTPS_CHECK(m.header.count == 0 || int64_t(m.header.count) == c.numel, "PULL of ",
                 m.header.count, " values from a chunk of ", c.numel);
    const uint32_t need = m.header.aux;
    if (ready(c, need)) {
      reply(conn, m.header, Op::kReply, c.param.data(), c.numel * 4, uint32_t(c.numel));
      return;
    }
    c.waiting.push_back(
        Waiting{conn, m.header.request_id, m.header.key, need, worker, Answer::kParam, park(budget, 0, true)});
    fail_unreachable(m.header.key, c, "");
  }

  void serve_waiting(uint64_t, PsChunk& c) {
    auto keep = c.waiting.begin();
    for (auto it = c.waiting.begin(); it != c.waiting.end(); ++it) {
      bool now = false;
      const float* values = c.param.data();
      switch (it->answer) {
        case Answer::kParam: now = ready(c, it->need); break;
        case Answer::kMean:
          now = c.mean_ready;
          values = c.accum.data();
          break;
        case Answer::kApply: now = !c.apply_open; break;
      }
      if (now) {
        MessageHeader h;
        h.request_id = it->request_id;
        h.key = it->key;
        reply(it->conn, h, Op::kReply, values, c.numel * 4, uint32_t(c.numel));
      } else {
        if (keep != it) *keep = std::move(*it);
        ++keep;
      }
    }
    c.waiting.erase(keep, c.waiting.end());
    trim_waiting(c.waiting);
  }

  // Fails the waiting requests of `c` that can no longer be answered because a
  // worker they depend on is dead.
  // Returns how many requests it failed.
  size_t fail_unreachable(uint64_t, PsChunk& c, const std::string&) {
    std::vector<int> dead;
    for (int w = 0; w < opt_.num_workers; ++w)
      if (st_.dead[w]) dead.push_back(w);
    if (dead.empty() || c.waiting.empty()) return 0;
    // A deferred first gradient may be a waiting local request's tensor, which
    // its owner may free once the request fails: into the sum with it first,
    // so later pushes of this (doomed) round still find a complete sum.
    if (c.deferred != nullptr) {
      c.accum.assign(c.deferred, c.deferred + c.numel);
      drop_deferred(c);
    }
    const size_t before = c.waiting.size();
    std::string who = describe_dead(dead[0]);
    auto keep = c.waiting.begin();
    for (auto it = c.waiting.begin(); it != c.waiting.end(); ++it) {
      bool blocked;
      if (c.sum_only || opt_.staleness == 0) {
        blocked = true;  // the round needs every worker's push
      } else {
        blocked = false;
        for (int w : dead) blocked |= uint64_t(c.clock[w]) + uint64_t(std::max(opt_.staleness, 0)) < it->need;
      }
      if (blocked) {
        error(it->conn, it->request_id, it->key, Status::kTimeout,
              detail::concat("server ", opt_.server_id, ": ", who,
                             "; this round can never complete"));
      } else {
        if (keep != it) *keep = std::move(*it);
        ++keep;
      }
    }
    c.waiting.erase(keep, c.waiting.end());
    trim_waiting(c.waiting);
    return before - c.waiting.size();
  }

  void do_state_get(ConnId conn, Message& m) {
    PsChunk& c = chunk(m.header.key);
    const uint32_t buf = m.header.aux;
    if (buf == 255) {
      reply(conn, m.header, Op::kReply, &c.step, 4, 1);
      return;
    }
    FASTPS_CHECK(buf <= kMaxStateBuffers, "state buffer ", buf, " does not exist");
    if (buf == 0 || c.state[buf - 1].size() == size_t(c.numel)) {
      const std::vector<float>& v = buf == 0 ? c.param : c.state[buf - 1];
      reply(conn, m.header, Op::kReply, v.data(), v.size() * 4, uint32_t(v.size()));
      return;
    }
    // A buffer the chunk's optimizer does not use reads as zeros; a read does
    // not make it (that would keep numel floats per request's few bytes).
    const std::vector<float> zeros(size_t(c.numel), 0.0f);
    reply(conn, m.header, Op::kReply, zeros.data(), zeros.size() * 4, uint32_t(zeros.size()));
  }

  void do_state_set(ConnId conn, Message& m) {
    PsChunk& c = chunk(m.header.key);
    const uint32_t buf = m.header.aux;
    if (buf == 255) {
      c.step = *floats(m, 0, 1);
    } else {
      const float* v = floats(m, 0, c.numel);
      std::vector<float>& dst = buffer(c, buf);
      std::copy(v, v + c.numel, dst.begin());
      if (buf == 1 && c.hyper.kind == OptimKind::kSGD) c.fresh = false;
    }
    reply(conn, m.header, Op::kReply, nullptr, 0, 0);
  }

  std::vector<float>& buffer(PsChunk& c, uint32_t buf) {
    if (buf == 0) return c.param;
    FASTPS_CHECK(buf <= kMaxStateBuffers, "state buffer ", buf, " does not exist");
    if (c.state[buf - 1].size() != size_t(c.numel)) c.state[buf - 1].assign(c.numel, 0.0f);
    return c.state[buf - 1];
  }

  void reply(ConnId conn, const MessageHeader& req, Op op, const void* data, size_t bytes,
             uint32_t count) {
    send_reply(opt_, tr_, local_, conn, req, op, data, bytes, count);
  }

  void error(ConnId conn, uint64_t rid, uint64_t key, Status status, const std::string& msg) {
    send_error_to(opt_, tr_, local_, conn, rid, key, status, msg);
  }

  // A ticket for a request that is about to wait, holding `bytes` of payload;
  // throws CapacityError instead when `capped` and the connection's budget is
  // spent (Note [Parked requests]).
  Parked park(const ParkBudgetPtr& budget, int64_t bytes, bool capped) {
    const std::string why = budget->take(bytes, capped);
    FASTPS_CHECK_TYPED(CapacityError, why.empty(), "server ", opt_.server_id, ": ", why);
    return Parked(budget, bytes);
  }

  // park() for a sparse request, whose pieces may wait on several shards: the
  // first that waits counts the whole request (its payload), once; the others
  // share that decision.
  void park_sparse(SparseRequest& r, bool capped) {
    std::call_once(r.park_once, [&] {
      const int64_t bytes = int64_t(r.payload.size());
      const std::string why = r.budget->take(bytes, capped);
      if (why.empty()) {
        r.parked = Parked(r.budget, bytes);
      } else {
        r.park_refused = detail::concat("server ", opt_.server_id, ": ", why);
      }
    });
    FASTPS_CHECK_TYPED(CapacityError, r.park_refused.empty(), r.park_refused);
  }

  // ------------------------------------------------------------ sparse tables
  // See Note [Sparse tables on the network server].
 public:
  void sparse(const SparseRequestPtr& r, int shard) {
    try {
      switch (r->header.op) {
        case Op::kSparseCreate: sparse_create(*r, shard); break;
        case Op::kSparsePull: return sparse_pull(r, shard);    // may wait: finishes itself
        case Op::kSparsePush: return sparse_push(r, shard);    // likewise
        case Op::kSparseStats: return sparse_stats(r, shard);  // likewise
        case Op::kSparseExport: sparse_table(r->header.key).table->append_section(r->bytes); break;
        case Op::kSparseLoad: sparse_load(*r, shard); break;
        default: FASTPS_ASSERT(false);
      }
      piece_done(r);
    } catch (const CapacityError& e) {
      piece_failed(r, Status::kLimit, e.what());
    } catch (const Error& e) {
      piece_failed(r, Status::kInvalidArgument, e.what());
    } catch (const std::exception& e) {  // bad_alloc and the like: the requester still gets an answer
      piece_failed(r, Status::kInternal, internal_error_text(e));
    }
  }

 private:
  void piece_failed(const SparseRequestPtr& r, Status status, const std::string& msg) {
    {
      std::lock_guard<std::mutex> lock(r->error_mu);
      if (r->status == Status::kOk) {
        r->status = status;
        r->error = msg;
      }
    }
    piece_done(r);
  }

  // The last piece of a request sends its reply.
  void piece_done(const SparseRequestPtr& r) {
    if (r->remaining.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (r->status != Status::kOk) {
      error(r->conn, r->header.request_id, r->header.key, r->status, r->error);
      return;
    }
    switch (r->header.op) {
      case Op::kSparsePull:
        reply(r->conn, r->header, Op::kReply, r->rows.data(), r->rows.size() * 4, uint32_t(r->n));
        return;
      case Op::kSparseExport:
        reply(r->conn, r->header, Op::kReply, r->bytes.data(), r->bytes.size(), uint32_t(r->num_shards));
        return;
      case Op::kSparseStats: {
        SparseTableStats t;
        int64_t step = 0;
        for (size_t s = 0; s < r->stats.size(); ++s) {
          t += r->stats[s];
          step = std::max(step, r->steps[s]);
        }
        const int64_t v[kSparseStatsCount] = {t.rows,     t.admitted, t.evicted,      t.expired,
                                              t.rejected, t.pending,  t.memory_bytes, step};
        uint8_t out[8 * kSparseStatsCount];
        for (uint32_t i = 0; i < kSparseStatsCount; ++i) store_le64(out + 8 * i, uint64_t(v[i]));
        reply(r->conn, r->header, Op::kReply, out, sizeof(out), kSparseStatsCount);
        return;
      }
      default:
        reply(r->conn, r->header, Op::kReply, nullptr, 0, 0);
    }
  }

  PsSparse& sparse_table(uint64_t key) {
    auto it = st_.sparse.find(key);
    FASTPS_CHECK(it != st_.sparse.end(), "server ", opt_.server_id, " has no sparse table ", key,
                 "; create it first (SPARSE_CREATE)");
    return it->second;
  }

  // This shard's share of this server's share of the caps.
  static std::unique_ptr<SparseTable> make_shard_table(const SparseTableConfig& c, const SparseSpread& spread,
                                                       int shard, int shards) {
    return std::make_unique<SparseTable>(sparse_server_shard_table(c, spread, shard, shards));
  }

  void reset_round(PsSparse& t) {
    t.pushes = 0;
    t.slot.clear();
    t.round_ids.clear();
    t.accum.clear();
  }

  void sparse_create(SparseRequest& r, int shard) {
    auto it = st_.sparse.find(r.header.key);
    if (it != st_.sparse.end()) {
      PsSparse& t = it->second;
      if (same_sparse_config(t.config, r.config) && t.spread == r.spread) return;  // every worker creates every table
      FASTPS_CHECK(r.header.aux == 1, "sparse table ", r.header.key, " exists on server ", opt_.server_id,
                   " with another spec (", describe_sparse_config(t.config), ") than this worker's (",
                   describe_sparse_config(r.config),
                   "); every worker must build its embeddings with the same arguments, in the same order");
      for (SparseWait& w : t.waiting)
        piece_failed(w.req, Status::kInvalidArgument,
                     detail::concat("sparse table ", r.header.key, " was replaced while this request waited"));
      t.waiting.clear();
      trim_waiting(t.waiting);
      t.table = make_shard_table(r.config, r.spread, shard, r.num_shards);
      t.config = r.config;
      t.spread = r.spread;
      t.step = 0;
      reset_round(t);
      return;
    }
    PsSparse t;
    t.table = make_shard_table(r.config, r.spread, shard, r.num_shards);
    t.config = r.config;
    t.spread = r.spread;
    t.clock.assign(opt_.num_workers, 0);
    st_.sparse.emplace(r.header.key, std::move(t));
  }

  bool sparse_ready(const PsSparse& t, uint32_t need) const {
    if (opt_.staleness == 0) return t.step >= int64_t(need);
    if (opt_.staleness < 0) return true;
    uint32_t m = UINT32_MAX;
    for (int w = 0; w < opt_.num_workers; ++w) m = std::min(m, t.clock[w]);
    return uint64_t(m) + uint64_t(opt_.staleness) >= need;
  }

  // Runs the piece's work once the table is ready for it, or parks it.
  void run_or_wait(PsSparse& t, const SparseRequestPtr& r, int shard, uint32_t need) {
    if (sparse_ready(t, need)) {
      fill(t, *r, shard);
      piece_done(r);
      return;
    }
    park_sparse(*r, true);  // throws CapacityError: refused, nothing waits
    t.waiting.push_back(SparseWait{r, need, shard, false});
    fail_unreachable_sparse(t);
  }

  void fill(PsSparse& t, SparseRequest& r, int shard) {
    if (r.header.op == Op::kSparsePull) {
      // A pull's ids start the payload, whose buffer is heap-allocated (aligned).
      const std::vector<int64_t>& idx = r.index[shard];
      // The reply's rows are made now, by the first piece to fill them, not
      // when the request arrived or waited (Note [Parked requests]).
      std::call_once(r.rows_once, [&] { r.rows.resize(size_t(r.n) * size_t(r.dim)); });
      t.table->pull(reinterpret_cast<const int64_t*>(r.ids), idx.data(), int64_t(idx.size()), r.rows.data(),
                    t.step);
    } else {  // stats
      r.stats[shard] = t.table->stats();
      r.steps[shard] = t.step;
    }
  }

  void sparse_pull(const SparseRequestPtr& r, int shard) {
    PsSparse& t = sparse_table(r->header.key);
    FASTPS_CHECK(t.config.dim == r->dim, "SPARSE_PULL for dim ", r->dim, " from a table of dim ", t.config.dim);
    run_or_wait(t, r, shard, r->header.aux);
  }

  void sparse_stats(const SparseRequestPtr& r, int shard) {
    run_or_wait(sparse_table(r->header.key), r, shard, r->header.aux);
  }

  // Adds this shard's rows of push `r` into the round sum (duplicates sum too).
  void accumulate(PsSparse& t, const SparseRequest& r, int shard) {
    const int64_t dim = t.config.dim;
    for (int64_t k : r.index[shard]) {
      const int64_t id = r.id(k);
      const uint8_t* g = r.grads + size_t(k) * size_t(dim) * 4;
      auto ins = t.slot.emplace(id, int64_t(t.round_ids.size()));
      if (ins.second) {
        t.round_ids.push_back(id);
        const size_t at = t.accum.size();
        t.accum.resize(at + size_t(dim));
        std::memcpy(t.accum.data() + at, g, size_t(dim) * 4);
      } else {
        float* a = t.accum.data() + size_t(ins.first->second) * size_t(dim);
        for (int64_t d = 0; d < dim; ++d) {
          float x;
          std::memcpy(&x, g + 4 * d, 4);
          a[d] += x;
        }
      }
    }
  }

  // Mean over the W workers, then one fused update per id. Returns the error
  // text ("" if none); the table is unchanged on a CapacityError.
  std::string apply_round(PsSparse& t, int64_t step) {
    std::string err;
    if (!t.round_ids.empty()) {
      const float w = float(opt_.num_workers);
      for (float& x : t.accum) x /= w;
      try {
        t.table->push(t.round_ids.data(), nullptr, int64_t(t.round_ids.size()), t.accum.data(), t.optim, step);
      } catch (const Error& e) {
        err = e.what();
      }
    }
    reset_round(t);
    return err;
  }

  void sparse_push(const SparseRequestPtr& r, int shard) {
    PsSparse& t = sparse_table(r->header.key);
    const int worker = r->worker;
    FASTPS_CHECK(worker >= 0 && worker < opt_.num_workers, "SPARSE_PUSH from rank ", worker,
                 " but the job has ", opt_.num_workers, " workers");
    FASTPS_CHECK(r->n == 0 || r->dim == t.config.dim, "SPARSE_PUSH of rows of dim ", r->dim,
                 " to a table of dim ", t.config.dim);
    FASTPS_CHECK(r->optim.rule == t.config.rule, "push with rule '", sparse_rule_name(r->optim.rule),
                 "' to sparse table ", r->header.key, " created for '", sparse_rule_name(t.config.rule), "'");
    const int64_t step = r->header.aux;
    FASTPS_CHECK(step >= 1, "SPARSE_PUSH at step ", step, "; steps start at 1");
    if (opt_.staleness == 0) {
      FASTPS_CHECK(step == t.step + 1, "worker rank ", worker, " pushed step ", step, " to sparse table ",
                   r->header.key, ", whose next step is ", t.step + 1,
                   " (under BSP every worker steps every embedding once per optimizer step)");
      if (t.pushes == 0) t.pushed.assign(opt_.num_workers, 0);
      FASTPS_CHECK(!t.pushed[worker], "worker rank ", worker, " pushed sparse table ", r->header.key,
                   " twice in step ", step);
      park_sparse(*r, false);  // counted, never refused (Note [Parked requests])
      t.pushed[worker] = 1;
      t.optim = r->optim;
      accumulate(t, *r, shard);
      ++t.pushes;
      t.waiting.push_back(SparseWait{r, uint32_t(step), shard, true});
      if (t.pushes < opt_.num_workers) {
        fail_unreachable_sparse(t);
        return;
      }
      const std::string err = apply_round(t, step);
      t.step = step;  // a failed round still counts, so every worker stays in step
      if (!err.empty()) {
        for (SparseWait& w : take_waiting(t, [](const SparseWait& w) { return w.is_push; }))
          piece_failed(w.req, Status::kLimit, err + " (this step's rows were not applied on this shard)");
      }
      serve_sparse_waiting(t);
      return;
    }
    // SSP / ASP: apply at once.
    t.clock[worker] += 1;
    t.optim = r->optim;
    accumulate(t, *r, shard);
    const std::string err = apply_round(t, step);
    t.step = std::max(t.step, step);
    if (err.empty()) {
      piece_done(r);
    } else {
      piece_failed(r, Status::kLimit, err);
    }
    serve_sparse_waiting(t);
  }

  // Takes the waiters `pred` selects out of t.waiting, in their order.
  template <typename Pred>
  static std::vector<SparseWait> take_waiting(PsSparse& t, Pred pred) {
    std::vector<SparseWait> taken;
    auto keep = t.waiting.begin();
    for (auto it = t.waiting.begin(); it != t.waiting.end(); ++it) {
      if (pred(*it)) {
        taken.push_back(*it);
      } else {
        *keep++ = *it;
      }
    }
    t.waiting.erase(keep, t.waiting.end());
    trim_waiting(t.waiting);
    return taken;
  }

  void serve_sparse_waiting(PsSparse& t) {
    const auto ready = take_waiting(t, [&](const SparseWait& w) { return sparse_ready(t, w.need); });
    for (const SparseWait& w : ready) {
      if (!w.is_push) fill(t, *w.req, w.shard);
      piece_done(w.req);
    }
  }

  // See fail_unreachable(): the same rule for a sparse table's waiters.
  size_t fail_unreachable_sparse(PsSparse& t) {
    std::vector<int> dead;
    for (int w = 0; w < opt_.num_workers; ++w)
      if (st_.dead[w]) dead.push_back(w);
    if (dead.empty() || t.waiting.empty()) return 0;
    const auto failed = take_waiting(t, [&](const SparseWait& w) {
      bool blocked = opt_.staleness == 0;  // a round needs every worker's push
      if (!blocked)
        for (int d : dead) blocked |= uint64_t(t.clock[d]) + uint64_t(std::max(opt_.staleness, 0)) < w.need;
      return blocked;
    });
    for (const SparseWait& w : failed)
      piece_failed(w.req, Status::kTimeout,
                   detail::concat("server ", opt_.server_id, ": ", describe_dead(dead[0]),
                                  "; this step of sparse table ", w.req->header.key,
                                  " can never complete"));
    return failed.size();
  }

  void sparse_load(SparseRequest& r, int shard) {
    PsSparse& t = sparse_table(r.header.key);
    FASTPS_CHECK(r.config.dim == t.config.dim, "SPARSE_LOAD of rows of dim ", r.config.dim,
                 " into a table of dim ", t.config.dim);
    std::unique_ptr<SparseTable> fresh = make_shard_table(r.config, r.spread, shard, r.num_shards);
    std::vector<float> values(size_t(r.record_bytes - int64_t(sizeof(RowHeader))) / 4);
    for (int64_t k : r.index[shard]) {
      const uint8_t* rec = r.records + size_t(k) * size_t(r.record_bytes);
      RowHeader h;
      std::memcpy(&h, rec, sizeof(h));
      std::memcpy(values.data(), rec + sizeof(h), values.size() * 4);
      fresh->load_row(h, values.data());
    }
    for (int64_t k : r.pending_index[shard]) {
      int64_t id;
      uint64_t count;
      std::memcpy(&id, r.pending + 16 * size_t(k), 8);
      std::memcpy(&count, r.pending + 16 * size_t(k) + 8, 8);
      fresh->load_pending(id, count);
    }
    // The round being accumulated stays: a worker that loaded first may
    // already have pushed the next step (See docs/protocol.md SPARSE_LOAD).
    t.table = std::move(fresh);
    t.config = r.config;
    t.spread = r.spread;
    t.step = r.load_step;
    serve_sparse_waiting(t);
  }

 private:

  const PsServerOptions& opt_;
  Transport& tr_;
  PsServer::ShardState& st_;
  const LocalSink& local_;
};

}  // namespace

PsServer::PsServer(const PsServerOptions& options)
    : options_(options), parked_(std::make_shared<ParkCounters>()) {
  FASTPS_CHECK(options.num_workers >= 1, "num_workers must be >= 1, got ", options.num_workers);
  FASTPS_CHECK(options.staleness >= -1, "staleness must be -1 (ASP), 0 (BSP) or k > 0 (SSP), got ",
               options.staleness);
  FASTPS_CHECK(options.max_parked_requests >= 1, "max_parked_requests must be >= 1, got ",
               options.max_parked_requests);
  FASTPS_CHECK(options.max_parked_bytes >= 0, "max_parked_bytes must be >= 0 (0: twice max_payload), got ",
               options.max_parked_bytes);
  if (options_.max_parked_bytes == 0) options_.max_parked_bytes = 2 * int64_t(options.transport.max_payload);
  local_budget_ = make_budget();
  ServerOptions so;
  so.num_shards = options.num_shards;
  server_ = std::make_unique<Server>(so);
  for (int i = 0; i < server_->num_shards(); ++i) {
    auto s = std::make_unique<ShardState>();
    s->dead.assign(options.num_workers, false);
    s->dead_reason.assign(options.num_workers, std::string());
    shard_state_.push_back(std::move(s));
  }
  transport_ = Transport::create(options.transport_name, options.transport);
  transport_->set_handler([this](ConnId c, Message&& m) { on_message(c, std::move(m)); });
  transport_->set_disconnect_handler(
      [this](ConnId c, const std::string& why) { on_disconnect(c, why); });
  port_ = transport_->listen(options.host, options.port);
}

PsServer::~PsServer() {
  {
    // The loop thread stops submitting; shard tasks already queued still run
    // and may still reply, so the shards go before the transport.
    std::lock_guard<std::mutex> lock(submit_mu_);
    stopping_ = true;
  }
  server_.reset();
  transport_.reset();
}

std::shared_ptr<PsServer::ParkBudget> PsServer::make_budget() const {
  return std::make_shared<ParkBudget>(options_.max_parked_requests, options_.max_parked_bytes, parked_);
}

ParkedStats PsServer::parked() const {
  return ParkedStats{parked_->requests.load(std::memory_order_relaxed),
                     parked_->bytes.load(std::memory_order_relaxed)};
}

void PsServer::on_message(ConnId conn, Message&& message) {
  std::lock_guard<std::mutex> lock(submit_mu_);  // See ~PsServer
  if (stopping_) return;
  auto it = conns_.find(conn);
  if (it == conns_.end()) it = conns_.emplace(conn, Conn{transport_->peer_info(conn).rank, make_budget()}).first;
  dispatch(conn, it->second.rank, it->second.budget, std::move(message));
}

// Note [Local requests]
// A colocated worker and its server live in one process; sending their frames
// through the loopback socket would copy every byte twice through the kernel.
// The worker's client hands such frames to submit_local() instead, and the
// shard replies through the LocalSink, which copies the values straight into
// the destination tensor. A pushed gradient is not copied either: the shard
// reads it in the worker's tensor (Message::in_place; a leading optimizer
// config block is the one part copied). Everything else (routing to the
// owning shard, rounds, errors) is the same code as for a remote worker.
void PsServer::set_local_sink(int worker, LocalSink sink) {
  FASTPS_CHECK(worker >= 0 && worker < options_.num_workers, "local worker rank ", worker,
               " outside the job's ", options_.num_workers, " workers");
  std::lock_guard<std::mutex> lock(submit_mu_);
  local_worker_ = worker;
  local_sink_ = std::move(sink);
}

void PsServer::submit_local(Message&& message) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  FASTPS_CHECK(local_sink_ != nullptr, "PsServer::submit_local before set_local_sink");
  FASTPS_CHECK_TYPED(ConnectionError, !stopping_, "fastps: the local parameter server is stopping");
  dispatch(kLocalConn, local_worker_, local_budget_, std::move(message));
}

void PsServer::dispatch(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget, Message&& message) {
  const uint8_t op = uint8_t(message.header.op);
  if (op >= 32 && op <= 63) return dispatch_sparse(conn, worker, budget, std::move(message));
  const int shard = static_cast<int>(mix64(message.header.key) % uint64_t(server_->num_shards()));
  // Small dense requests (and so small replies) may run on this thread when
  // the shard sleeps (Note [Inline tasks] in server/shard.h): one context
  // switch less per round trip. Large ones stay on the shard thread, which
  // keeps this (transport or caller) thread free.
  constexpr uint32_t kInlineMaxCount = 16384;  // 64 KiB of float32
  const Op o = message.header.op;
  // count 0 means "every value" to a PULL: not small. The payload is checked
  // too: a frame's count and payload are only validated by the handler.
  const bool small = (o == Op::kPush || o == Op::kPushPull || o == Op::kPull) &&
                     message.header.count > 0 && message.header.count <= kInlineMaxCount &&
                     message.header.payload_len <= uint64_t(kInlineMaxCount) * 4 + kOptimConfigSize;
  auto t = std::make_unique<MessageTask>();
  ShardState* st = shard_state_[shard].get();
  t->fn = [this, st, conn, worker, budget, m = std::move(message)](Shard&) mutable {
    Handler(options_, *transport_, *st, local_sink_).handle(conn, worker, budget, m);
  };
  std::unique_ptr<Task> task = std::move(t);
  if (small && server_->run_inline(shard, task)) return;
  server_->submit(shard, std::move(task));
}

// Parses and checks a sparse request, splits it into per-shard pieces and
// submits them (See Note [Sparse tables on the network server]). Runs on the
// thread that received the request, under submit_mu_.
void PsServer::dispatch_sparse(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget,
                               Message&& message) {
  auto r = std::make_shared<SparseRequest>();
  r->conn = conn;
  r->worker = worker;
  r->budget = budget;
  r->header = message.header;
  r->payload = std::move(message.payload);
  const int shards = server_->num_shards();
  r->num_shards = shards;
  const uint8_t* p = r->payload.data();
  const size_t len = r->payload.size();
  const uint64_t key = r->header.key;
  std::vector<int> targets;  // shards that get a piece
  auto all_shards = [&] {
    for (int s = 0; s < shards; ++s) targets.push_back(s);
  };
  // Per shard, the indices k < count of the ids stored at base + k * stride.
  auto route = [&](const uint8_t* base, size_t stride, uint64_t count) {
    std::vector<std::vector<int64_t>> out(static_cast<size_t>(shards));
    for (uint64_t k = 0; k < count; ++k) {
      int64_t id;
      std::memcpy(&id, base + k * stride, 8);
      out[size_t(sparse_shard_of(id, shards))].push_back(int64_t(k));
    }
    return out;
  };
  auto route_ids = [&] { r->index = route(r->ids, 8, uint64_t(r->n)); };
  auto dim_of = [&]() -> int64_t {
    auto it = sparse_dim_.find(key);
    FASTPS_CHECK(it != sparse_dim_.end(), "server ", options_.server_id, " has no sparse table ", key,
                 "; create it first (SPARSE_CREATE)");
    return it->second;
  };
  // Every shard needs a row of the server's cap share (0: no cap).
  auto check_cap_share = [&](const SparseTableConfig& c, const SparseSpread& spread) {
    const int64_t share = sparse_server_rows(c, spread);
    FASTPS_CHECK(c.max_rows == 0 || share >= shards, "max_rows=", c.max_rows, " over ", spread.servers,
                 " server(s) gives server ", options_.server_id, " a share of ", share,
                 " row(s), below its number of shards (", shards, "); raise max_rows or use fewer shards");
  };
  try {
    switch (r->header.op) {
      case Op::kSparseCreate: {
        FASTPS_CHECK(len == kSparseConfigSize, "SPARSE_CREATE payload of ", len, " bytes, expected ",
                     kSparseConfigSize);
        r->config = decode_sparse_config(p, len, &r->spread);
        check_cap_share(r->config, r->spread);
        auto it = sparse_dim_.find(key);
        FASTPS_CHECK_TYPED(CapacityError, it != sparse_dim_.end() || sparse_dim_.size() < kMaxSparseTables,
                           "server ", options_.server_id, " holds ", sparse_dim_.size(),
                           " sparse tables, the most one server may hold; use fewer embedding tables "
                           "(docs/protocol.md, Limits)");
        if (it == sparse_dim_.end() || r->header.aux == 1) sparse_dim_[key] = r->config.dim;
        all_shards();
        break;
      }
      case Op::kSparsePull: {
        r->n = r->header.count;
        FASTPS_CHECK(len == size_t(r->n) * 8, "SPARSE_PULL payload of ", len, " bytes for ", r->n, " ids");
        r->dim = dim_of();
        FASTPS_CHECK(uint64_t(r->n) * uint64_t(r->dim) * 4 <= options_.transport.max_payload,
                     "SPARSE_PULL of ", r->n, " rows of dim ", r->dim, " exceeds the reply limit");
        r->ids = p;  // the reply's rows are made when a shard fills them (Note [Parked requests])
        route_ids();
        for (int s = 0; s < shards; ++s)
          if (!r->index[size_t(s)].empty()) targets.push_back(s);
        break;
      }
      case Op::kSparsePush: {
        FASTPS_CHECK(len >= kSparseOptimSize, "SPARSE_PUSH payload of ", len, " bytes has no optimizer block");
        r->optim = decode_sparse_optim(p, len);
        r->n = r->header.count;
        const uint64_t rest = len - kSparseOptimSize;
        FASTPS_CHECK(rest >= uint64_t(r->n) * 8, "SPARSE_PUSH payload too short for ", r->n, " ids");
        const uint64_t values = rest - uint64_t(r->n) * 8;
        const int64_t dim = dim_of();
        FASTPS_CHECK(values == uint64_t(r->n) * uint64_t(dim) * 4, "SPARSE_PUSH of ", r->n, " ids carries ",
                     values, " bytes of gradients; the table's rows have dim ", dim);
        r->dim = dim;
        r->ids = p + kSparseOptimSize;
        r->grads = r->ids + size_t(r->n) * 8;
        route_ids();
        all_shards();  // every shard counts every push (Note [Sparse tables on the network server])
        break;
      }
      case Op::kSparseStats:
        FASTPS_CHECK(len == 0, "SPARSE_STATS carries no payload");
        r->stats.resize(size_t(shards));
        r->steps.assign(size_t(shards), 0);
        all_shards();
        break;
      case Op::kSparseExport:
        FASTPS_CHECK(len == 0, "SPARSE_EXPORT carries no payload");
        FASTPS_CHECK(r->header.aux < uint32_t(shards), "SPARSE_EXPORT of shard ", r->header.aux,
                     "; server ", options_.server_id, " has ", shards);
        targets.push_back(int(r->header.aux));
        break;
      case Op::kSparseLoad: {
        FASTPS_CHECK(len >= kSparseConfigSize + 24, "SPARSE_LOAD payload of ", len, " bytes is too short");
        r->config = decode_sparse_config(p, kSparseConfigSize, &r->spread);
        check_cap_share(r->config, r->spread);
        // Checked here, not only by the shards: a load the shards refuse must
        // not change the dim this server accepts for the table's pulls and pushes.
        const int64_t table_dim = dim_of();
        FASTPS_CHECK(r->config.dim == table_dim, "SPARSE_LOAD of rows of dim ", r->config.dim,
                     " into sparse table ", key, " of dim ", table_dim, " on server ", options_.server_id,
                     "; load the file into a table of its dim");
        r->load_step = int64_t(load_le64(p + kSparseConfigSize));
        const uint64_t rows = load_le64(p + kSparseConfigSize + 8);
        const uint64_t pending = load_le64(p + kSparseConfigSize + 16);
        FASTPS_CHECK(r->load_step >= 0, "SPARSE_LOAD with a negative step");
        r->record_bytes = int64_t(sizeof(RowHeader)) +
                          4 * (r->config.dim + sparse_state_floats(r->config.rule, r->config.dim));
        const uint64_t body = len - kSparseConfigSize - 24;
        FASTPS_CHECK(rows <= body / uint64_t(r->record_bytes) && pending <= body / 16 &&
                         rows * uint64_t(r->record_bytes) + pending * 16 == body,
                     "SPARSE_LOAD payload of ", len, " bytes does not hold ", rows, " rows and ", pending,
                     " pending ids");
        r->records = p + kSparseConfigSize + 24;
        r->pending = r->records + rows * uint64_t(r->record_bytes);
        r->index = route(r->records, size_t(r->record_bytes), rows);  // a record starts with its id
        r->pending_index = route(r->pending, 16, pending);            // (id, count) pairs
        // Every shard checks nothing it cannot undo: the caps are checked here,
        // before any shard replaces its rows.
        const SparseTableConfig& c = r->config;
        const int64_t server_cap = sparse_server_rows(c, r->spread);
        for (int s = 0; s < shards; ++s) {
          const int64_t cap = sparse_cap_share(server_cap, s, shards);
          FASTPS_CHECK_TYPED(CapacityError, cap == 0 || int64_t(r->index[size_t(s)].size()) <= cap,
                             "fastps: the file holds more rows than this table's cap (max_rows=", c.max_rows,
                             " on server ", options_.server_id, "); load it into a table with a larger max_rows");
        }
        all_shards();
        break;
      }
      default:
        throw InvalidArgument(detail::concat("server cannot serve op ", op_name(r->header.op)));
    }
  } catch (const Error& e) {
    const Status status = dynamic_cast<const CapacityError*>(&e) ? Status::kLimit : Status::kInvalidArgument;
    send_error_to(options_, *transport_, local_sink_, conn, r->header.request_id, key, status, e.what());
    return;
  }
  if (targets.empty()) {  // e.g. a pull of no ids
    send_reply(options_, *transport_, local_sink_, conn, r->header, Op::kReply, nullptr, 0, 0);
    return;
  }
  r->remaining.store(int(targets.size()), std::memory_order_relaxed);
  for (int s : targets) {
    auto task = std::make_unique<MessageTask>();
    ShardState* st = shard_state_[size_t(s)].get();
    task->fn = [this, st, r, s](Shard&) { Handler(options_, *transport_, *st, local_sink_).sparse(r, s); };
    server_->submit(s, std::move(task));
  }
}

void PsServer::on_disconnect(ConnId conn, const std::string& reason) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  if (stopping_) return;
  auto it = conns_.find(conn);
  if (it == conns_.end()) return;
  const int worker = it->second.rank;
  conns_.erase(it);
  // A worker is gone when its last connection is: a second connection
  // claiming the same rank (several per peer, a stray tool, a restarted
  // process) closing must not fail the rounds of the live one. Its parked
  // requests go in any case (Note [Parked requests]). Each shard runs this
  // after every request of `conn` it was given (one queue per shard, filled
  // under submit_mu_).
  bool last = true;
  for (const auto& kv : conns_)
    if (kv.second.rank == worker) last = false;
  for (int s = 0; s < server_->num_shards(); ++s) {
    auto task = std::make_unique<MessageTask>();
    ShardState* st = shard_state_[s].get();
    task->fn = [this, st, conn, last, worker, reason](Shard&) {
      Handler h(options_, *transport_, *st, local_sink_);
      h.drop_connection(conn);
      if (last) h.worker_died(worker, reason);
    };
    server_->submit(s, std::move(task));
  }
}

}  // namespace fastps
