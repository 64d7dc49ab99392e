// Worker-side access to remote parameter servers over a Transport.
//
// Tensors are split into chunks and each chunk placed on the server with the
// fewest registered bytes at registration time, by the embedded mode's rule
// (client/chunk_placement.h; small tensors are cut over the servers).
// Placement is a pure function of the sequence of register_dense() calls, so
// every worker computes the same placement as long as all register the same
// tensors in the same order (they run the same script).
//
// Every request returns a Future; a request spanning several chunks completes
// when every chunk's reply arrived. Each server is reached through an
// endpoint (Note [Endpoints] in protocol/local_endpoint.h): a remote server's
// replies are matched by request id and copied into the destination buffer
// on the transport's loop thread; the colocated server's shard writes them
// there itself. When a server's connection drops, every request outstanding
// on it fails with ConnectionError naming the server; every wait has a
// deadline.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "client/chunk_placement.h"
#include "common/completion.h"
#include "protocol/local_endpoint.h"
#include "protocol/reply.h"
#include "protocol/sparse_wire.h"
#include "table/dense_table.h"
#include "table/optimizer.h"
#include "table/sparse_optim.h"
#include "table/sparse_table.h"
#include "transport/transport.h"

namespace fastps {

class Future {
 public:
  Future(CompletionPtr completion, std::string what, std::chrono::milliseconds timeout,
         DeliveryGatePtr gate = nullptr)
      : completion_(std::move(completion)), what_(std::move(what)), timeout_(timeout), gate_(std::move(gate)) {}
  bool done() const { return completion_->finished(); }
  // Blocks until done; timeout_s <= 0 uses the client's timeout. Throws the
  // request's error, or TimeoutError. `between`, if set, runs every
  // kWaitSlice while it waits (the bindings check for Ctrl-C there); an
  // exception it throws ends the wait. After any exception no reply of this
  // request writes into the caller's buffers any more. A request that
  // completes as a slice ends returns its result (or its own error), never
  // the slice's timeout. `slice` is kWaitSlice except in tests.
  void wait(double timeout_s = 0, const std::function<void()>& between = nullptr,
            std::chrono::microseconds slice = kWaitSlice) const;
  static constexpr std::chrono::milliseconds kWaitSlice{100};

 private:
  CompletionPtr completion_;
  std::string what_;
  std::chrono::milliseconds timeout_;
  DeliveryGatePtr gate_;
};
using FuturePtr = std::shared_ptr<Future>;

struct ServerAddress {
  std::string host;
  uint16_t port = 0;
};

class PsClient {
 public:
  // `transport` names the transport (Transport::create(): "tcp", "shm", "auto").
  PsClient(int rank, const TransportOptions& options, int64_t chunk_bytes, const std::string& transport = "tcp");
  // Waits up to kDrainOnClose (or the timeout, if shorter) for replies still
  // on their way, then closes every connection; requests still outstanding
  // are dropped (this does not complete their Futures).
  ~PsClient();
  static constexpr std::chrono::milliseconds kDrainOnClose{1000};

  // Connects to every server (index = server id). Blocking, with the deadline.
  void connect(const std::vector<ServerAddress>& servers);
  int num_servers() const { return static_cast<int>(servers_.size()); }
  // Serve requests for server `index` through `server` in this process,
  // without the transport (See Note [Local requests] in
  // protocol/local_endpoint.h). `server` must outlive this client's
  // requests; call after connect().
  void attach_local(LocalEndpoint* server, int index);
  int rank() const { return rank_; }

  // Every buffer of the dense calls comes with the number of floats it holds
  // (See Note [Buffers with their counts] in ps_client.cc): a count other than
  // what the request reads or writes throws InvalidArgument before the
  // pointer is used.
  //
  // Records the tensor's placement; if `init` is non-null (holding
  // `init_numel` == `numel` floats), also sends REGISTER frames creating the
  // chunks with these values (one worker does this).
  FuturePtr register_dense(uint32_t tensor_id, int64_t numel, bool sum_only,
                           const OptimHyper& hyper, const float* init, int64_t init_numel);
  // `grad` null (and `grad_numel` 0) = a skip (no gradient this round).
  FuturePtr push(uint32_t tensor_id, const float* grad, int64_t grad_numel, const OptimHyper& hyper,
                 uint32_t clock);
  FuturePtr pull(uint32_t tensor_id, float* dst, int64_t dst_numel, uint32_t min_version);
  // `src` null (and `src_numel` 0) = a skip. deferred: a fastps.optim chunk
  // under BSP answers with the round's mean gradient and applies nothing
  // until every worker's apply() (Note [Deferred apply] in
  // server/dense_service.cc); a deferred skip may pass no dst (null, 0).
  FuturePtr push_pull(uint32_t tensor_id, const float* src, int64_t src_numel, float* dst,
                      int64_t dst_numel, uint32_t clock, bool deferred = false);
  // This worker's contribution to the step of a deferred round (or of a round
  // with no pushed mean: full gradients or skips only): `grad` non-null = a
  // full gradient; else `skip` = none; else the round's mean times `scale`.
  // Completes with the updated parameters in dst once every worker's apply()
  // arrived.
  FuturePtr apply(uint32_t tensor_id, const OptimHyper& hyper, float* dst, int64_t dst_numel,
                  const float* grad, int64_t grad_numel, float scale, bool skip);
  // buffer: 0 = parameter, 1..kMaxStateBuffers = optimizer state (the
  // tensor's numel floats), 255 = step counter (1 float)
  FuturePtr state_get(uint32_t tensor_id, int buffer, float* dst, int64_t dst_numel);
  FuturePtr state_set(uint32_t tensor_id, int buffer, const float* src, int64_t src_numel);

  // --- Round clocks (Note [Round clocks] in ps_client.cc) ---
  // Rounds tensor `tensor_id` was sent in since it was registered (completed
  // or failed): its next round's clock is round(tensor_id) + 1.
  // InvalidArgument for a tensor not registered.
  uint32_t round(uint32_t tensor_id);
  // Ends a round of every tensor of `tensor_ids`, whatever happened to it
  // (checked first: InvalidArgument changes nothing).
  void end_round(const std::vector<uint32_t>& tensor_ids);
  // Ends a round of one tensor and returns its new count (the clock of a
  // push sent now, for callers whose round is a single push).
  uint32_t advance_round(uint32_t tensor_id);
  // The step of sparse table `table` on this worker: of its last push (or
  // of the file sparse_load() read); 0 before either.
  int64_t sparse_step(uint64_t table);

  // --- Sparse tables (docs/protocol.md "Sparse tables", docs/sparse.md) ---
  // Ids are split over the servers (Note [Sparse id routing] in
  // protocol/sparse_wire.h), one frame per server; rows come back in the
  // caller's order. `config` is the whole table's (this client gives each
  // server its share of max_rows and max_pending). Buffers passed to the
  // async calls must stay valid until the future is done (pull's `out`);
  // push and create copy or send what they need before returning.
  //
  // Creates the table on every server; idempotent for an identical config.
  // replace: a table of another config is replaced by an empty one.
  FuturePtr sparse_create(uint64_t table, const SparseTableConfig& config, bool replace);
  // Rows of ids (any order, duplicates allowed) into out (n x dim), once the
  // table step is at least min_step.
  FuturePtr sparse_pull(uint64_t table, const int64_t* ids, int64_t n, int64_t dim, float* out,
                        uint32_t min_step);
  // This worker's gradient rows (n x dim, ids unique) for table step `step`;
  // sent to every server (an empty push still counts towards a BSP round).
  FuturePtr sparse_push(uint64_t table, const int64_t* ids, int64_t n, int64_t dim, const float* grads,
                        const SparseOptim& optim, uint32_t step);
  // Blocking, with the deadline. Counters summed over servers: rows,
  // admitted, evicted, expired, rejected, pending, memory_bytes, then the
  // largest step; once every server's table step is at least min_step.
  SparseStatsSum sparse_stats(uint64_t table, uint32_t min_step);
  // Blocking. Fetches every shard's rows (after the table reached min_step)
  // and writes the table file (docs/sparse.md) atomically at `path`.
  void sparse_save(uint64_t table, const SparseTableConfig& config, uint32_t min_step,
                   const std::string& path);
  // Blocking. Reads and verifies the file, then replaces every server's rows
  // with it (and the table's config with `config`). Returns the file's step.
  int64_t sparse_load(uint64_t table, const SparseTableConfig& config, const std::string& path);

  TransportStats stats() const { return transport_->stats(); }
  // How each server is reached: "local" (in-process, Note [Local requests]),
  // "shm" (shared-memory rings), "ucx" (frames over UCX) or "tcp". Call after
  // connect().
  std::vector<std::string> server_paths() const;

 private:
  struct Entry {
    ChunkLayout layout;
    uint32_t rounds = 0;       // Note [Round clocks]
    std::vector<int> servers;  // per chunk
  };
  // A request to a remote server, waiting for its reply.
  struct Pending {
    ReplyTo to;
    bool receiving = false;  // the transport is reading the reply into to.target.dst (gate entered)
  };
  struct OutFrame {
    int server = -1;
    MessageHeader header;
    std::vector<ConstBuffer> segs;
    ReplyTarget target;  // where the reply goes
  };
  // Registers and sends frames (request ids assigned here); one future for all.
  FuturePtr submit(std::vector<OutFrame>& frames, const std::string& what);
  // Hands a frame to the local endpoint (Note [Local requests]).
  void submit_local(const MessageHeader& header, const std::vector<ConstBuffer>& segs, ReplyTo to);
  // Where server `server` stands among this job's servers (the config block of SPARSE_CREATE / SPARSE_LOAD).
  SparseSpread sparse_spread(int server) const;
  using FrameFn = std::function<void(MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin,
                                     int64_t n)>;
  FuturePtr request(uint32_t tensor_id, Op op, float* dst, bool dst_per_chunk, int64_t reply_count,
                    const FrameFn& fill, const char* what);
  void on_message(ConnId conn, Message&& m);
  void complete(const MessageHeader& h, const void* data, size_t bytes);
  void on_disconnect(ConnId conn, const std::string& reason);
  Entry& entry(uint32_t tensor_id);
  // The registered numel of a tensor (InvalidArgument if it is not registered).
  int64_t registered_numel(uint32_t tensor_id);
  // Throws InvalidArgument unless `count` == `expected` and `p` is non-null.
  static void check_buffer(const char* op, uint32_t tensor_id, const char* buffer, const void* p,
                           int64_t count, int64_t expected);

  const int rank_;
  const int64_t chunk_elems_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Transport> transport_;
  std::vector<ServerAddress> servers_;
  std::vector<std::shared_ptr<const std::string>> peers_;  // "parameter server 0 (host:port)"
  std::vector<ConnId> conns_;
  ChunkPlacement placement_;  // over the servers
  std::mutex mu_;  // guards entries_, sparse_steps_, pending_, next_id_, conn_server_
  std::unordered_map<uint32_t, Entry> entries_;
  std::unordered_map<uint64_t, int64_t> sparse_steps_;  // table -> its step (Note [Round clocks])
  std::unordered_map<uint64_t, Pending> pending_;
  std::unordered_map<ConnId, int> conn_server_;
  uint64_t next_id_ = 1;
  LocalEndpoint* local_server_ = nullptr;
  int local_index_ = -1;
};

}  // namespace fastps
