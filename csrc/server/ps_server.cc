#include "server/ps_server.h"

#include <functional>

#include "common/error.h"
#include "protocol/sparse_wire.h"
#include "server/consistency.h"
#include "server/dense_service.h"
#include "server/park.h"
#include "server/responder.h"
#include "server/shard_state.h"
#include "server/sparse_service.h"

namespace fastps {

namespace {

struct MessageTask : Task {
  std::function<void(Shard&)> fn;
  void run(Shard& shard) override { fn(shard); }
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
  so.server_id = options.server_id;
  so.num_workers = options.num_workers;
  so.staleness = options.staleness;
  server_ = std::make_unique<Server>(so);
  sparse_router_ = std::make_unique<SparseRouter>(options.server_id, server_->num_shards(),
                                                  options.transport.max_payload);
  transport_ = Transport::create(options.transport_name, options.transport);
  out_ = std::make_unique<Responder>(options_, *transport_, local_replies_);
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

std::shared_ptr<ParkBudget> PsServer::make_budget() const {
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

void PsServer::submit(int worker, Message&& message, ReplyTo reply) {
  FASTPS_CHECK(worker >= 0 && worker < options_.num_workers, "local worker rank ", worker,
               " outside the job's ", options_.num_workers, " workers");
  std::lock_guard<std::mutex> lock(submit_mu_);
  FASTPS_CHECK_TYPED(ConnectionError, !stopping_, "fastps: the local parameter server is stopping");
  message.header.request_id = local_replies_.add(std::move(reply));
  dispatch(kLocalConn, worker, local_budget_, std::move(message));
}

void PsServer::dispatch(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget, Message&& message) {
  if (is_sparse_op(message.header.op)) return dispatch_sparse(conn, worker, budget, std::move(message));
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
  t->fn = [this, conn, worker, budget, m = std::move(message)](Shard& sh) mutable {
    DenseService(*out_, sh.state()).handle(conn, worker, budget, m);
  };
  std::unique_ptr<Task> task = std::move(t);
  if (small && server_->run_inline(shard, task)) return;
  server_->submit(shard, std::move(task));
}

// Decodes, checks and splits a sparse request into per-shard pieces and
// submits them (See Note [Sparse tables on the network server] in
// server/sparse_service.h). Runs on the thread that received the request,
// under submit_mu_.
void PsServer::dispatch_sparse(ConnId conn, int worker, const std::shared_ptr<ParkBudget>& budget,
                               Message&& message) {
  auto r = std::make_shared<SparseRequest>();
  r->conn = conn;
  r->worker = worker;
  r->budget = budget;
  r->header = message.header;
  r->payload = std::move(message.payload);
  std::vector<int> targets;  // shards that get a piece
  try {
    targets = sparse_router_->split(*r);
  } catch (const Error& e) {
    const Status status = dynamic_cast<const CapacityError*>(&e) ? Status::kLimit : Status::kInvalidArgument;
    out_->error(conn, r->header.request_id, r->header.key, status, e.what());
    return;
  }
  if (targets.empty()) {  // e.g. a pull of no ids
    out_->reply(conn, r->header, Op::kReply, nullptr, 0, 0);
    return;
  }
  r->remaining.store(int(targets.size()), std::memory_order_relaxed);
  for (int s : targets) {
    auto task = std::make_unique<MessageTask>();
    task->fn = [this, r, s](Shard& sh) { SparseService(*out_, sh.state()).run(r, s); };
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
    task->fn = [this, conn, last, worker, reason](Shard& sh) {
      DenseService dense(*out_, sh.state());
      SparseService sparse(*out_, sh.state());
      dense.drop_connection(conn);
      sparse.drop_connection(conn);
      if (!last || !sh.state().consistency.worker_died(worker, reason)) return;
      const size_t failed = dense.fail_unreachable() + sparse.fail_unreachable();
      // A clean exit leaves nothing waiting; only a loss worth knowing about is logged.
      if (failed > 0)
        transport_log(detail::concat("server ", options_.server_id, ": worker rank ", worker, " disconnected (",
                                     reason, "); failed ", failed, " request(s) waiting for it"));
    };
    server_->submit(s, std::move(task));
  }
}

}  // namespace fastps
