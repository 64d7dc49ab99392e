// A parameter server behind a transport: the distributed mode's server.
//
// Frames arrive on the transport's event-loop thread; each is handed, as a
// Task, to the shard that owns its chunk (mix64(key) % shards), so all state of
// a chunk is touched by one thread (Note [Shard ownership]). Replies are sent
// from the shard thread.
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
// A worker whose connection drops is marked dead: every request that would
// wait for it fails at once with an ERROR frame naming it, so survivors raise
// instead of hanging.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "server/server.h"
#include "transport/transport.h"

namespace fastps {

struct PsServerOptions {
  int server_id = 0;
  int num_workers = 1;
  int num_shards = 0;
  int staleness = 0;  // 0 BSP, k > 0 SSP, -1 ASP
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  TransportOptions transport;
};

class PsServer {
 public:
  explicit PsServer(const PsServerOptions& options);
  ~PsServer();
  PsServer(const PsServer&) = delete;
  PsServer& operator=(const PsServer&) = delete;

  uint16_t port() const { return port_; }
  int server_id() const { return options_.server_id; }
  TransportStats stats() const { return transport_->stats(); }

  struct ShardState;  // per-shard chunk table; defined in ps_server.cc

 private:
  void on_message(ConnId conn, Message&& message);
  void on_disconnect(ConnId conn, const std::string& reason);

  PsServerOptions options_;
  std::unique_ptr<Server> server_;
  std::vector<std::unique_ptr<ShardState>> shard_state_;  // index = shard
  std::unique_ptr<Transport> transport_;
  uint16_t port_ = 0;
  // Loop thread only: which worker rank each connection belongs to.
  std::unordered_map<ConnId, int> conn_rank_;
  std::mutex submit_mu_;  // orders the loop thread's submits against destruction
  bool stopping_ = false;
};

}  // namespace fastps
