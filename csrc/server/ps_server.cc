#include "server/ps_server.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "common/error.h"
#include "table/optimizer.h"

namespace fastps {

namespace {

struct Waiting {
  ConnId conn;
  uint64_t request_id;
  uint64_t key;
  uint32_t need;    // version (BSP/sum) or clock bound (SSP) this request waits for
  int worker;
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
  int pushes = 0;             // pushes in the current round
  std::vector<uint8_t> pushed;  // which workers pushed in the current round (BSP)
  int contributors = 0;       // non-skip pushes in the current round
  uint32_t version = 0;       // completed rounds (BSP) or applied pushes (SSP/ASP)
  std::vector<uint32_t> clock;  // pushes per worker (SSP/ASP)
  std::vector<Waiting> waiting;
};

struct MessageTask : Task {
  std::function<void(Shard&)> fn;
  void run(Shard& shard) override { fn(shard); }
};

}  // namespace

struct PsServer::ShardState {
  std::unordered_map<uint64_t, PsChunk> chunks;
  std::vector<bool> dead;  // per worker
};

namespace {

class Handler {
 public:
  Handler(const PsServerOptions& o, Transport& t, PsServer::ShardState& s, const LocalSink& local)
      : opt_(o), tr_(t), st_(s), local_(local) {}

  void handle(ConnId conn, int worker, Message& m) {
    try {
      switch (m.header.op) {
        case Op::kRegister: return do_register(conn, m);
        case Op::kPush:
        case Op::kPushPull: return do_push(conn, worker, m);
        case Op::kPull: return do_pull(conn, worker, m);
        case Op::kStateGet: return do_state_get(conn, m);
        case Op::kStateSet: return do_state_set(conn, m);
        case Op::kPing: return reply(conn, m.header, Op::kPong, body(m), m.header.payload_len,
                                     m.header.count);
        default:
          throw InvalidArgument(detail::concat("server cannot serve op ", op_name(m.header.op)));
      }
    } catch (const Error& e) {
      error(conn, m.header.request_id, m.header.key, Status::kInvalidArgument, e.what());
    }
  }

  void worker_died(int worker, const std::string& reason) {
    if (worker < 0 || worker >= opt_.num_workers) return;
    st_.dead[worker] = true;
    size_t failed = 0;
    for (auto& kv : st_.chunks) failed += fail_unreachable(kv.first, kv.second, reason);
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
  // requests]) the worker's memory, valid until the request completes.
  static const uint8_t* body(const Message& m) { return m.in_place ? m.in_place : m.payload.data(); }

  const float* floats(const Message& m, size_t offset, int64_t n) {
    FASTPS_CHECK(m.header.payload_len == offset + size_t(n) * 4, op_name(m.header.op), " payload of ",
                 m.header.payload_len, " bytes, expected ", offset + size_t(n) * 4);
    return reinterpret_cast<const float*>(body(m) + offset);
  }

  size_t read_config(const Message& m, OptimHyper* hyper) {
    if (!(m.header.flags & kFlagConfig)) return 0;
    size_t used = 0;
    *hyper = decode_optim_config(body(m), m.header.payload_len, &used);
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
    PsChunk& c = st_.chunks[m.header.key];
    OptimHyper hyper;
    size_t off = read_config(m, &hyper);
    const int64_t n = m.header.count;
    FASTPS_CHECK(n > 0, "REGISTER of an empty chunk");
    const float* init = floats(m, off, n);
    c = PsChunk();
    c.sum_only = (m.header.flags & kFlagSum) != 0;
    c.numel = n;
    c.hyper = hyper;
    c.param.assign(init, init + n);
    c.clock.assign(opt_.num_workers, 0);
    if (!c.sum_only) ensure_state(c);
    reply(conn, m.header, Op::kReply, nullptr, 0, 0);
  }

  void do_push(ConnId conn, int worker, Message& m) {
    FASTPS_CHECK(worker >= 0 && worker < opt_.num_workers, "PUSH from rank ", worker,
                 " but the job has ", opt_.num_workers, " workers");
    PsChunk& c = chunk(m.header.key);
    OptimHyper hyper = c.hyper;
    size_t off = read_config(m, &hyper);
    const bool skip = (m.header.flags & kFlagSkip) != 0;
    const float* g = skip ? nullptr : floats(m, off, c.numel);
    const bool push_pull = m.header.op == Op::kPushPull;
    if (!c.sum_only) c.hyper = hyper;
    if (c.sum_only || opt_.staleness == 0) {
      // One round at a time (Note [Consistency]).
      if (c.pushes == 0) {
        c.contributors = 0;
        c.pushed.assign(opt_.num_workers, 0);
      }
      FASTPS_CHECK(!c.pushed[worker], "worker rank ", worker, " pushed key ", m.header.key,
                   " twice in round ", c.version + 1,
                   " (accumulating gradients over several backward passes needs no_sync())");
      c.pushed[worker] = 1;
      if (g) {
        if (c.contributors == 0) {
          c.accum.assign(g, g + c.numel);  // the round's first gradient: one pass, not two
        } else {
          float* a = c.accum.data();
          for (int64_t i = 0; i < c.numel; ++i) a[i] += g[i];
        }
        ++c.contributors;
      }
      ++c.pushes;
      const uint32_t round = c.version + 1;
      if (push_pull) {
        c.waiting.push_back(Waiting{conn, m.header.request_id, m.header.key, round, worker});
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

  void complete_round(PsChunk& c) {
    if (c.contributors == 0) c.accum.assign(c.numel, 0.0f);  // every worker skipped
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

  void do_pull(ConnId conn, int worker, Message& m) {
    PsChunk& c = chunk(m.header.key);
    FASTPS_CHECK(m.header.count == 0 || int64_t(m.header.count) == c.numel, "PULL of ",
                 m.header.count, " values from a chunk of ", c.numel);
    const uint32_t need = m.header.aux;
    if (ready(c, need)) {
      reply(conn, m.header, Op::kReply, c.param.data(), c.numel * 4, uint32_t(c.numel));
      return;
    }
    c.waiting.push_back(Waiting{conn, m.header.request_id, m.header.key, need, worker});
    fail_unreachable(m.header.key, c, "");
  }

  void serve_waiting(uint64_t, PsChunk& c) {
    auto keep = c.waiting.begin();
    for (auto it = c.waiting.begin(); it != c.waiting.end(); ++it) {
      if (ready(c, it->need)) {
        MessageHeader h;
        h.request_id = it->request_id;
        h.key = it->key;
        reply(it->conn, h, Op::kReply, c.param.data(), c.numel * 4, uint32_t(c.numel));
      } else {
        *keep++ = *it;
      }
    }
    c.waiting.erase(keep, c.waiting.end());
  }

  // Fails the waiting requests of `c` that can no longer be answered because a
  // worker they depend on is dead.
  // Returns how many requests it failed.
  size_t fail_unreachable(uint64_t, PsChunk& c, const std::string&) {
    std::vector<int> dead;
    for (int w = 0; w < opt_.num_workers; ++w)
      if (st_.dead[w]) dead.push_back(w);
    if (dead.empty() || c.waiting.empty()) return 0;
    const size_t before = c.waiting.size();
    std::string who = detail::concat("worker rank ", dead[0]);
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
                             " disconnected; this round can never complete"));
      } else {
        *keep++ = *it;
      }
    }
    c.waiting.erase(keep, c.waiting.end());
    return before - c.waiting.size();
  }

  void do_state_get(ConnId conn, Message& m) {
    PsChunk& c = chunk(m.header.key);
    const uint32_t buf = m.header.aux;
    if (buf == 255) {
      reply(conn, m.header, Op::kReply, &c.step, 4, 1);
      return;
    }
    const std::vector<float>& v = buffer(c, buf);
    reply(conn, m.header, Op::kReply, v.data(), v.size() * 4, uint32_t(v.size()));
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
    MessageHeader h;
    h.op = op;
    h.request_id = req.request_id;
    h.key = req.key;
    h.count = count;
    if (conn == kLocalConn) {
      local_(h, data, bytes);
      return;
    }
    ConstBuffer seg{data, bytes};
    try {
      tr_.send(conn, h, bytes ? &seg : nullptr, bytes ? 1 : 0);
    } catch (const Error& e) {
      transport_log(detail::concat("server ", opt_.server_id, ": reply dropped: ", e.what()));
    }
  }

  void error(ConnId conn, uint64_t rid, uint64_t key, Status status, const std::string& msg) {
    if (conn == kLocalConn) {
      MessageHeader h;
      h.op = Op::kError;
      h.status = uint32_t(status);
      h.request_id = rid;
      h.key = key;
      local_(h, msg.data(), msg.size());
      return;
    }
    try {
      tr_.send_error(conn, rid, status, msg, key);
    } catch (const Error& e) {
      transport_log(detail::concat("server ", opt_.server_id, ": error reply dropped: ", e.what()));
    }
  }

  const PsServerOptions& opt_;
  Transport& tr_;
  PsServer::ShardState& st_;
  const LocalSink& local_;
};

}  // namespace

PsServer::PsServer(const PsServerOptions& options) : options_(options) {
  FASTPS_CHECK(options.num_workers >= 1, "num_workers must be >= 1, got ", options.num_workers);
  FASTPS_CHECK(options.staleness >= -1, "staleness must be -1 (ASP), 0 (BSP) or k > 0 (SSP), got ",
               options.staleness);
  ServerOptions so;
  so.num_shards = options.num_shards;
  server_ = std::make_unique<Server>(so);
  for (int i = 0; i < server_->num_shards(); ++i) {
    auto s = std::make_unique<ShardState>();
    s->dead.assign(options.num_workers, false);
    shard_state_.push_back(std::move(s));
  }
  transport_ = Transport::create("tcp", options.transport);
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

void PsServer::on_message(ConnId conn, Message&& message) {
  std::lock_guard<std::mutex> lock(submit_mu_);  // See ~PsServer
  if (stopping_) return;
  auto it = conn_rank_.find(conn);
  if (it == conn_rank_.end()) it = conn_rank_.emplace(conn, transport_->peer_info(conn).rank).first;
  dispatch(conn, it->second, std::move(message));
}

// Note [Local requests]
// A colocated worker and its server live in one process; sending their frames
// through the loopback socket would copy every byte twice through the kernel.
// The worker's client hands such frames to submit_local() instead, and the
// shard replies through the LocalSink, which copies the values straight into
// the destination tensor. Everything else (routing to the owning shard,
// rounds, errors) is the same code as for a remote worker.
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
  dispatch(kLocalConn, local_worker_, std::move(message));
}

void PsServer::dispatch(ConnId conn, int worker, Message&& message) {
  const int shard = static_cast<int>(mix64(message.header.key) % uint64_t(server_->num_shards()));
  auto task = std::make_unique<MessageTask>();
  ShardState* st = shard_state_[shard].get();
  task->fn = [this, st, conn, worker, m = std::move(message)](Shard&) mutable {
    Handler(options_, *transport_, *st, local_sink_).handle(conn, worker, m);
  };
  server_->submit(shard, std::move(task));
}

void PsServer::on_disconnect(ConnId conn, const std::string& reason) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  if (stopping_) return;
  auto it = conn_rank_.find(conn);
  if (it == conn_rank_.end()) return;
  const int worker = it->second;
  conn_rank_.erase(it);
  for (int s = 0; s < server_->num_shards(); ++s) {
    auto task = std::make_unique<MessageTask>();
    ShardState* st = shard_state_[s].get();
    task->fn = [this, st, worker, reason](Shard&) {
      Handler(options_, *transport_, *st, local_sink_).worker_died(worker, reason);
    };
    server_->submit(s, std::move(task));
  }
}

}  // namespace fastps
