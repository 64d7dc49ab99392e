// A parameter server behind a transport: the distributed mode's server.
//
// Frames arrive on the transport's event-loop thread; each is handed, as a
// Task, to the shard that owns its chunk (mix64(key) % shards), so all state of
// a chunk is touched by one thread (Note [Shard ownership]). Replies are sent
// from the shard thread, which never waits for a worker to read them (Note
// [Send queues] in transport/tcp.h: a worker that stops reading slows only
// itself).
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
// Aggregation-only chunks (REGISTER with kFlagSum) answer each PUSH_PULL of a
// round with the plain sum of that round, for DistributedOptimizer.
//
// Sparse tables (ops SPARSE_*): see Note [Sparse tables on the network
// server] in ps_server.cc.
//
// A worker whose connection drops is marked dead: every request that would
// wait for it fails at once with an ERROR frame naming it, so survivors raise
// instead of hanging.
//
// What a peer can make the server hold while its requests wait is bounded by
// what it sent, capped per connection, and freed when the connection closes:
// see Note [Parked requests] in ps_server.cc.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "server/server.h"
#include "transport/transport.h"

namespace fastps {

// Limits on what one connection may park (Note [Parked requests]; docs/protocol.md, "Limits").
constexpr int64_t kDefaultMaxParkedRequests = int64_t{1} << 16;
// The sparse tables one server holds (each costs memory on every shard however small its frame).
constexpr size_t kMaxSparseTables = 4096;

struct PsServerOptions {
  int server_id = 0;
  int num_workers = 1;
  int num_shards = 0;
  int staleness = 0;  // 0 BSP, k > 0 SSP, -1 ASP
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  // The transport by name (Transport::create(): "tcp", "shm", "auto") and its options.
  std::string transport_name = "tcp";
  TransportOptions transport;
  // Per connection: the most requests that may wait for a later round or
  // step, and the most payload bytes they may hold (0: twice
  // transport.max_payload). A read past either is answered ERROR(LIMIT).
  int64_t max_parked_requests = kDefaultMaxParkedRequests;
  int64_t max_parked_bytes = 0;
};

// Requests waiting for a later round or step on one server, over all its
// connections, and the payload bytes they hold.
struct ParkedStats {
  int64_t requests = 0;
  int64_t bytes = 0;
};

// A reply to an in-process requester: header (op REPLY or ERROR, request id,
// key, status, count) and payload, valid only during the call. Called on a
// shard thread.
using LocalSink = std::function<void(const MessageHeader& header, const void* data, size_t bytes)>;

// The connection id under which in-process requests are served.
constexpr ConnId kLocalConn = ~ConnId{0};

class PsServer {
 public:
  explicit PsServer(const PsServerOptions& options);
  ~PsServer();
  PsServer(const PsServer&) = delete;
  PsServer& operator=(const PsServer&) = delete;

  uint16_t port() const { return port_; }
  int server_id() const { return options_.server_id; }
  TransportStats stats() const { return transport_->stats(); }
  // Any thread.
  ParkedStats parked() const;

  // The colocated worker's shortcut (See Note [Local requests]): frames from
  // the worker in this process skip the transport; replies go to `sink`.
  // Set once, before the first submit_local().
  void set_local_sink(int worker, LocalSink sink);
  // Any thread. Serves `message` as if it came from the local worker.
  void submit_local(Message&& message);

  struct ShardState;  // per-shard chunk table; defined in ps_server.cc
  class ParkBudget;   // one connection's parked requests; defined in ps_server.cc
  struct ParkCounters;

 private:
  void on_message(ConnId conn, Message&& message);
  void on_disconnect(ConnId conn, const std::string& reason);
  std::shared_ptr<ParkBudget> make_budget() const;

  PsServerOptions options_;
  std::shared_ptr<ParkCounters> parked_;  // the whole server's (every budget adds to it)
  std::unique_ptr<Server> server_;
  std::vector<std::unique_ptr<ShardState>> shard_state_;  // index = shard
  std::unique_ptr<Transport> transport_;
  uint16_t port_ = 0;
  // Under submit_mu_: each connection's worker rank and parking budget.
  struct Conn {
    int rank = -1;
    std::shared_ptr<ParkBudget> budget;
  };
  std::unordered_map<ConnId, Conn> conns_;
  std::mutex submit_mu_;  // orders the loop thread's submits against destruction
  bool stopping_ = false;
  int local_worker_ = -1;
  LocalSink local_sink_;
  std::shared_ptr<ParkBudget> local_budget_;  // the local worker's (kLocalConn)

  // Loop thread (or a local submitter), under submit_mu_: which dim each
  // sparse table has, so a pull's reply buffer is sized before the shards run.
  std::unordered_map<uint64_t, int64_t> sparse_dim_;

  void dispatch(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget, Message&& message);
  void dispatch_sparse(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget, Message&& message);
};

}  // namespace fastps
