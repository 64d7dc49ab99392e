// A parameter server behind a transport: the distributed mode's server.
//
// Frames arrive on the transport's event-loop thread; each is handed, as a
// Task, to the shard that owns its chunk (mix64(key) % shards), so all state of
// a chunk is touched by one thread (Note [Shard ownership]; the shard keeps it
// in its ShardState, Note [One shard state]). Replies are sent
// from the shard thread, which never waits for a worker to read them (Note
// [Send queues] in transport/tcp.h: a worker that stops reading slows only
// itself).
//
// The rules of rounds and staleness, and what happens when a worker dies, are
// Note [Consistency] in server/consistency.h. Dense chunks are served by
// server/dense_service.h, sparse tables (ops SPARSE_*) by
// server/sparse_service.h (Note [Sparse tables on the network server]).
//
// What a peer can make the server hold while its requests wait is bounded by
// what it sent, capped per connection, and freed when the connection closes:
// see Note [Parked requests] in server/park.h.
//
// The colocated worker's requests skip the transport: PsServer is that
// worker's LocalEndpoint (Note [Local requests] in protocol/local_endpoint.h).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "protocol/local_endpoint.h"
#include "server/ps_options.h"
#include "server/responder.h"
#include "server/server.h"
#include "transport/transport.h"

namespace fastps {

class ParkBudget;  // server/park.h
struct ParkCounters;
class SparseRouter;  // server/sparse_service.h

class PsServer : public LocalEndpoint {
 public:
  explicit PsServer(const PsServerOptions& options);
  ~PsServer() override;
  PsServer(const PsServer&) = delete;
  PsServer& operator=(const PsServer&) = delete;

  uint16_t port() const { return port_; }
  int server_id() const { return options_.server_id; }
  TransportStats stats() const { return transport_->stats(); }
  // Any thread.
  ParkedStats parked() const;

  // LocalEndpoint: the colocated worker's requests (See Note [Local
  // requests]), served under kLocalConn with one parking budget.
  void submit(int worker, Message&& message, ReplyTo reply) override;
  int num_workers() const override { return options_.num_workers; }

 private:
  void on_message(ConnId conn, Message&& message);
  void on_disconnect(ConnId conn, const std::string& reason);
  std::shared_ptr<ParkBudget> make_budget() const;

  PsServerOptions options_;
  std::shared_ptr<ParkCounters> parked_;  // the whole server's (every budget adds to it)
  std::unique_ptr<Server> server_;
  std::unique_ptr<Transport> transport_;
  LocalReplies local_replies_;      // where the local worker's replies go
  std::unique_ptr<Responder> out_;  // replies through transport_ or local_replies_
  uint16_t port_ = 0;
  // Under submit_mu_: each connection's worker rank and parking budget.
  struct Conn {
    int rank = -1;
    std::shared_ptr<ParkBudget> budget;
  };
  std::unordered_map<ConnId, Conn> conns_;
  std::mutex submit_mu_;  // orders the loop thread's submits against destruction
  bool stopping_ = false;
  std::shared_ptr<ParkBudget> local_budget_;  // the local worker's (kLocalConn)

  // Loop thread (or a local submitter), under submit_mu_: the sparse tables
  // this server holds, and the split of their requests over the shards.
  std::unique_ptr<SparseRouter> sparse_router_;

  void dispatch(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget, Message&& message);
  void dispatch_sparse(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget, Message&& message);
};

}  // namespace fastps
