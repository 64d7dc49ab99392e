#include "client/ps_client.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <thread>

#include "common/error.h"
#include "protocol/keys.h"
#include "protocol/sparse_wire.h"

namespace fastps {

namespace {
// Largest leading segment of a local push that is copied while the rest is
// read in place (an optimizer config block is kOptimConfigSize bytes).
constexpr size_t kMaxLocalPrefix = 4096;
}  // namespace

void Future::wait(double timeout_s, const std::function<void()>& between,
                  std::chrono::microseconds slice) const {
  const auto deadline =
      Clock::now() + (timeout_s > 0 ? std::chrono::milliseconds(int64_t(timeout_s * 1000)) : timeout_);
  try {
    for (;;) {
      const auto until = between ? std::min(deadline, Clock::now() + slice) : deadline;
      try {
        completion_->wait(until, what_);
        return;
      } catch (const TimeoutError&) {
        // Either the request's own error (it finished with a TimeoutError), or
        // this slice ended. A request that finished as the slice ended has its
        // result: wait() on a finished completion returns it, or throws the
        // request's own error, never the slice's timeout.
        if (completion_->finished()) {
          completion_->wait(deadline, what_);
          return;
        }
        if (until == deadline) throw;
      }
      between();
    }
  } catch (...) {
    // The caller may free its buffers now (a timeout, an interrupt): close
    // the gate, waiting out a delivery under way. Harmless once finished.
    if (gate_) gate_->close();
    throw;
  }
}

PsClient::PsClient(int rank, const TransportOptions& options, int64_t chunk_bytes, const std::string& transport)
    : rank_(rank), chunk_elems_(chunk_bytes / 4), timeout_(options.timeout) {
  FASTPS_CHECK(chunk_bytes >= 4096, "chunk_bytes must be at least 4096, got ", chunk_bytes);
  transport_ = Transport::create(transport, options);
  transport_->set_handler([this](ConnId c, Message&& m) { on_message(c, std::move(m)); });
  transport_->set_disconnect_handler(
      [this](ConnId c, const std::string& why) { on_disconnect(c, why); });
  // Replies carrying values land straight in the destination tensor.
  transport_->set_payload_target([this](ConnId, const MessageHeader& h) -> uint8_t* {
    if (h.op != Op::kReply) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(h.request_id);
    if (it == pending_.end()) return nullptr;
    Pending& p = it->second;
    const ReplyTarget& t = p.to.target;
    if (!t.in_place() || uint64_t(t.count) * 4 != h.payload_len || p.receiving) return nullptr;
    if (p.to.gate && !p.to.gate->enter()) return nullptr;  // timed out: not into dst
    p.receiving = true;  // left in complete() or on_disconnect()
    return reinterpret_cast<uint8_t*>(t.dst);
  });
}

PsClient::~PsClient() {
  // Replies still on their way are let in first, for a moment: closing a
  // connection in the middle of a reply is what a peer has to recover from
  // (and UCX 1.13's TCP transport sometimes does not: docs/ucx.md, "Known
  // limits"). A dead or frozen server makes this wait its bound at most.
  const auto until = std::chrono::steady_clock::now() + std::min<std::chrono::milliseconds>(timeout_, kDrainOnClose);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (pending_.empty()) break;
    }
    if (std::chrono::steady_clock::now() >= until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  transport_.reset();  // joins the loop thread before the maps go
}

void PsClient::connect(const std::vector<ServerAddress>& servers) {
  FASTPS_CHECK(conns_.empty(), "PsClient::connect called twice");
  FASTPS_CHECK(!servers.empty(), "no parameter servers to connect to");
  std::vector<ConnId> conns;
  for (const ServerAddress& s : servers) conns.push_back(transport_->connect(s.host, s.port, rank_));
  std::lock_guard<std::mutex> lock(mu_);
  servers_ = servers;
  peers_.clear();
  for (size_t i = 0; i < servers.size(); ++i)
    peers_.push_back(std::make_shared<const std::string>(
        detail::concat("parameter server ", i, " (", servers[i].host, ":", servers[i].port, ")")));
  conns_ = conns;
  placement_ = ChunkPlacement(servers.size());
  for (size_t i = 0; i < conns.size(); ++i) conn_server_[conns[i]] = int(i);
}

std::vector<std::string> PsClient::server_paths() const {
  std::vector<std::string> paths;
  for (size_t i = 0; i < conns_.size(); ++i) {
    if (local_server_ != nullptr && int(i) == local_index_) {
      paths.push_back("local");
    } else {
      const PeerInfo info = transport_->peer_info(conns_[i]);
      paths.push_back(info.ucx ? "ucx" : info.shared_memory ? "shm" : "tcp");
    }
  }
  return paths;
}

void PsClient::attach_local(LocalEndpoint* server, int index) {
  FASTPS_CHECK(index >= 0 && index < num_servers(), "local server index ", index, " out of range");
  FASTPS_CHECK(rank_ >= 0 && rank_ < server->num_workers(), "local worker rank ", rank_, " outside the job's ",
               server->num_workers(), " workers");
  std::lock_guard<std::mutex> lock(mu_);
  local_server_ = server;
  local_index_ = index;
}

PsClient::Entry& PsClient::entry(uint32_t tensor_id) {
  auto it = entries_.find(tensor_id);
  FASTPS_CHECK(it != entries_.end(), "tensor ", tensor_id, " is not registered with the servers");
  return it->second;
}

// Note [Round clocks]
// A worker's requests carry the round they belong to: a PULL waits for the
// version (BSP) or clock bound (SSP) its aux names, a sparse pull or push
// names the table step. The counts are this client's, never mirrored in
// Python: each registered tensor counts the rounds it was sent in since its
// registration (round()), and a round ends (end_round()) whatever happened
// to it: a failed round was still sent, and the servers count it. A skip (a
// push with no gradient) is a round like any other. Each sparse table keeps
// the step of this worker's last push (sparse_step()), or of the file it
// loaded. The caller says when a round ends (an optimizer's step() waits for
// all of its requests first); this client keeps the numbers.
uint32_t PsClient::round(uint32_t tensor_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return entry(tensor_id).rounds;
}

void PsClient::end_round(const std::vector<uint32_t>& tensor_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t id : tensor_ids) entry(id);  // every one registered before any advances
  for (uint32_t id : tensor_ids) entry(id).rounds += 1;
}

uint32_t PsClient::advance_round(uint32_t tensor_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return ++entry(tensor_id).rounds;
}

int64_t PsClient::sparse_step(uint64_t table) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sparse_steps_.find(table);
  return it == sparse_steps_.end() ? 0 : it->second;
}

// Note [Buffers with their counts]
// A dense request reads or writes as many floats as its tensor was
// registered with, at a caller's address. The caller's buffer may be of
// another size (a stale pointer, an optimizer state loaded from another
// model): reading past it crashes this process, or, through the
// shared-memory transport, makes the server read this process's memory on
// its behalf. So every pointer comes with the number of floats the caller
// knows it holds, and the two are compared before the request is built. The
// Python layer checks first, with messages in the user's terms; this is the
// check no caller can skip.
int64_t PsClient::registered_numel(uint32_t tensor_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return entry(tensor_id).layout.numel;
}

void PsClient::check_buffer(const char* op, uint32_t tensor_id, const char* buffer, const void* p,
                            int64_t count, int64_t expected) {
  FASTPS_CHECK(p != nullptr, "fastps: ", op, " of tensor ", tensor_id, ": the ", buffer, " is a null pointer");
  FASTPS_CHECK(count == expected, "fastps: ", op, " of tensor ", tensor_id, ": the ", buffer, " holds ", count,
               " floats where the request reads or writes ", expected,
               "; pass a contiguous float32 buffer of that size");
}

FuturePtr PsClient::register_dense(uint32_t tensor_id, int64_t numel, bool sum_only,
                                   const OptimHyper& hyper, const float* init, int64_t init_numel) {
  FASTPS_CHECK(numel > 0, "cannot register an empty tensor");
  FASTPS_CHECK(!conns_.empty(), "PsClient is not connected");
  if (init != nullptr) check_buffer("REGISTER", tensor_id, "initial value", init, init_numel, numel);
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(!entries_.count(tensor_id), "tensor ", tensor_id, " is already registered");
    // Small tensors are cut over the servers: Note [Splitting small tensors].
    const ChunkLayout layout = chunk_layout(numel, chunk_elems_, int64_t(conns_.size()));
    Entry& e = entries_[tensor_id];
    e.layout = layout;
    e.servers = placement_.place(layout);
  }
  if (init == nullptr) {
    return std::make_shared<Future>(std::make_shared<Completion>(0), "registration", timeout_);
  }
  auto block = std::make_shared<std::vector<uint8_t>>(kOptimConfigSize);
  encode_optim_config(hyper, block->data());
  return request(
      tensor_id, Op::kRegister, nullptr, false, 0,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.flags = kFlagConfig | (sum_only ? kFlagSum : 0);
        segs.push_back({block->data(), block->size()});
        segs.push_back({init + begin, size_t(n) * 4});
      },
      "REGISTER");
}

FuturePtr PsClient::push(uint32_t tensor_id, const float* grad, int64_t grad_numel, const OptimHyper& hyper,
                         uint32_t clock) {
  const int64_t numel = registered_numel(tensor_id);
  if (grad != nullptr || grad_numel != 0) check_buffer("PUSH", tensor_id, "gradient", grad, grad_numel, numel);
  uint8_t block[kOptimConfigSize];
  encode_optim_config(hyper, block);
  return request(
      tensor_id, Op::kPush, nullptr, false, 0,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.flags = kFlagConfig | (grad ? 0 : kFlagSkip);
        h.aux = clock;
        segs.push_back({block, sizeof(block)});
        if (grad) segs.push_back({grad + begin, size_t(n) * 4});
      },
      "PUSH");
}

FuturePtr PsClient::pull(uint32_t tensor_id, float* dst, int64_t dst_numel, uint32_t min_version) {
  check_buffer("PULL", tensor_id, "destination", dst, dst_numel, registered_numel(tensor_id));
  return request(
      tensor_id, Op::kPull, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>&, int64_t, int64_t n) {
        h.aux = min_version;
        h.count = uint32_t(n);
      },
      "PULL");
}

FuturePtr PsClient::push_pull(uint32_t tensor_id, const float* src, int64_t src_numel, float* dst,
                             int64_t dst_numel, uint32_t clock, bool deferred) {
  const int64_t numel = registered_numel(tensor_id);
  if (src != nullptr || src_numel != 0) check_buffer("PUSH_PULL", tensor_id, "source", src, src_numel, numel);
  // A deferred skip may leave the round's mean unread (Note [Deferred apply]).
  if (!(deferred && src == nullptr && dst == nullptr && dst_numel == 0))
    check_buffer("PUSH_PULL", tensor_id, "destination", dst, dst_numel, numel);
  return request(
      tensor_id, Op::kPushPull, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.aux = clock;
        if (src) {
          segs.push_back({src + begin, size_t(n) * 4});
        } else {
          h.flags = kFlagSkip;
        }
        if (deferred) h.flags |= kFlagDeferred;
      },
      "PUSH_PULL");
}

FuturePtr PsClient::apply(uint32_t tensor_id, const OptimHyper& hyper, float* dst, int64_t dst_numel,
                          const float* grad, int64_t grad_numel, float scale, bool skip) {
  const int64_t numel = registered_numel(tensor_id);
  check_buffer("APPLY", tensor_id, "destination", dst, dst_numel, numel);
  if (grad != nullptr || grad_numel != 0) check_buffer("APPLY", tensor_id, "gradient", grad, grad_numel, numel);
  auto block = std::make_shared<std::vector<uint8_t>>(kOptimConfigSize + 4);
  encode_optim_config(hyper, block->data());
  std::memcpy(block->data() + kOptimConfigSize, &scale, 4);  // little-endian hosts only, as the floats
  return request(
      tensor_id, Op::kApply, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.flags = kFlagConfig;
        if (grad != nullptr) {
          segs.push_back({block->data(), kOptimConfigSize});
          segs.push_back({grad + begin, size_t(n) * 4});
        } else if (skip) {
          h.flags |= kFlagSkip;
          segs.push_back({block->data(), kOptimConfigSize});
        } else {
          h.flags |= kFlagScale;
          segs.push_back({block->data(), kOptimConfigSize + 4});
        }
      },
      "APPLY");
}

namespace {
void check_state_buffer(const char* op, uint32_t tensor_id, int buffer) {
  FASTPS_CHECK((buffer >= 0 && buffer <= kMaxStateBuffers) || buffer == int(kStepCounterBuffer), "fastps: ", op,
               " of tensor ", tensor_id, ": buffer ", buffer, " does not exist (0: parameter, 1..", kMaxStateBuffers,
               ": optimizer state, ", kStepCounterBuffer, ": step counter)");
}
}  // namespace

FuturePtr PsClient::state_get(uint32_t tensor_id, int buffer, float* dst, int64_t dst_numel) {
  check_state_buffer("STATE_GET", tensor_id, buffer);
  const bool step_counter = buffer == int(kStepCounterBuffer);
  check_buffer("STATE_GET", tensor_id, step_counter ? "step counter" : "destination", dst, dst_numel,
               step_counter ? 1 : registered_numel(tensor_id));
  if (step_counter) {
    // One float per chunk; the caller reads the first chunk's (all agree).
    return request(
        tensor_id, Op::kStateGet, dst, false, 1,
        [&](MessageHeader& h, std::vector<ConstBuffer>&, int64_t, int64_t) { h.aux = kStepCounterBuffer; },
        "STATE_GET");
  }
  return request(
      tensor_id, Op::kStateGet, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>&, int64_t, int64_t) { h.aux = uint32_t(buffer); },
      "STATE_GET");
}

FuturePtr PsClient::state_set(uint32_t tensor_id, int buffer, const float* src, int64_t src_numel) {
  check_state_buffer("STATE_SET", tensor_id, buffer);
  check_buffer("STATE_SET", tensor_id, buffer == int(kStepCounterBuffer) ? "step counter" : "source", src, src_numel,
               buffer == int(kStepCounterBuffer) ? 1 : registered_numel(tensor_id));
  return request(
      tensor_id, Op::kStateSet, nullptr, false, 0,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.aux = uint32_t(buffer);
        if (buffer == int(kStepCounterBuffer)) {
          segs.push_back({src, 4});
        } else {
          segs.push_back({src + begin, size_t(n) * 4});
        }
      },
      "STATE_SET");
}

FuturePtr PsClient::request(uint32_t tensor_id, Op op, float* dst, bool dst_per_chunk,
                            int64_t reply_count, const FrameFn& fill, const char* what) {
  std::vector<OutFrame> frames;
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(!conns_.empty(), "PsClient is not connected");
    Entry& e = entry(tensor_id);
    for (int c = 0; c < e.layout.chunks; ++c) {
      const int64_t begin = e.layout.begin(c);
      const int64_t n = e.layout.size(c);
      OutFrame f;
      f.header.op = op;
      f.header.key = chunk_key(tensor_id, uint32_t(c));
      f.header.count = uint32_t(n);
      f.server = e.servers[size_t(c)];
      fill(f.header, f.segs, begin, n);
      if (dst != nullptr) {
        f.target.dst = dst_per_chunk ? dst + begin : dst;
        f.target.count = reply_count < 0 ? n : reply_count;
      }
      frames.push_back(std::move(f));
    }
  }
  return submit(frames, detail::concat(what, " of tensor ", tensor_id));
}

void PsClient::submit_local(const MessageHeader& header, const std::vector<ConstBuffer>& segs, ReplyTo to) {
  Message m;
  m.header = header;
  size_t total = 0;
  for (const ConstBuffer& b : segs) total += b.size;
  m.header.payload_len = total;
  // Only a gradient is read in place. A PUSH's optimizer config block (and
  // a skip PUSH is nothing else) lives on the caller's stack: copied.
  const bool gradient = header.op == Op::kPush || header.op == Op::kPushPull;
  const bool config = (header.flags & kFlagConfig) != 0;
  if (gradient && !config && segs.size() == 1) {
    // A gradient is read in place: it stays valid until this request
    // completes (the Future's contract), and the shard is done reading it
    // before it replies.
    m.in_place = const_cast<uint8_t*>(static_cast<const uint8_t*>(segs[0].data));
  } else if (gradient && config && segs.size() == 2 && segs[0].size <= kMaxLocalPrefix) {
    // fastps.optim's push: an optimizer config block, then the gradient.
    // The block is copied, the gradient read in place.
    m.payload.assign(static_cast<const uint8_t*>(segs[0].data),
                     static_cast<const uint8_t*>(segs[0].data) + segs[0].size);
    m.in_place = const_cast<uint8_t*>(static_cast<const uint8_t*>(segs[1].data));
    m.in_place_offset = segs[0].size;
  } else {
    m.payload.resize(total);
    size_t at = 0;
    for (const ConstBuffer& b : segs) {
      if (b.size) std::memcpy(m.payload.data() + at, b.data, b.size);
      at += b.size;
    }
  }
  local_server_->submit(rank_, std::move(m), std::move(to));
}

FuturePtr PsClient::submit(std::vector<OutFrame>& frames, const std::string& what) {
  auto completion = std::make_shared<Completion>(uint32_t(frames.size()));
  DeliveryGatePtr gate;  // only requests whose replies write into the caller's memory
  for (const OutFrame& f : frames)
    if (f.target.dst != nullptr || f.target.raw) gate = std::make_shared<DeliveryGate>();
  std::vector<ReplyTo> to(frames.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(!conns_.empty(), "PsClient is not connected");
    for (size_t i = 0; i < frames.size(); ++i) {
      OutFrame& f = frames[i];
      f.header.request_id = next_id_++;
      to[i] = ReplyTo{completion, gate, std::move(f.target), f.server, peers_[size_t(f.server)]};
      // A remote server's reply finds its request here; a local one carries it.
      if (f.server != local_index_) pending_[f.header.request_id] = Pending{to[i], false};
    }
  }
  auto future = std::make_shared<Future>(completion, what, timeout_, gate);
  for (size_t i = 0; i < frames.size(); ++i) {
    OutFrame& f = frames[i];
    try {
      if (f.server == local_index_) {
        submit_local(f.header, f.segs, std::move(to[i]));
        continue;
      }
      transport_->send(conns_[f.server], f.header, f.segs.data(), f.segs.size());
    } catch (const Error& e) {
      const auto failure = std::make_exception_ptr(ConnectionError(detail::concat(
          "fastps: cannot reach parameter server ", f.server, " at ", servers_[f.server].host, ":",
          servers_[f.server].port, ": ", e.what())));
      if (f.server == local_index_) {
        completion->done(failure);  // the endpoint refused it: no reply will come
        continue;
      }
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(f.header.request_id);
      if (it != pending_.end()) {
        it->second.to.completion->done(failure);
        pending_.erase(it);
      }
    }
  }
  return future;
}

void PsClient::on_message(ConnId, Message&& m) {
  if (m.in_place != nullptr) {
    complete(m.header, m.in_place, m.header.payload_len);  // already in place: no copy
  } else {
    complete(m.header, m.payload.data(), m.payload.size());
  }
}

void PsClient::complete(const MessageHeader& h, const void* data, size_t bytes) {
  Pending p;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(h.request_id);
    if (it == pending_.end()) return;  // a reply to a request that already failed
    p = std::move(it->second);
    pending_.erase(it);
  }
  deliver_reply(p.to, p.receiving, h, data, bytes);
}

void PsClient::on_disconnect(ConnId conn, const std::string& reason) {
  std::vector<Pending> failed;
  int server = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto cs = conn_server_.find(conn);
    if (cs == conn_server_.end()) return;
    server = cs->second;
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.to.server == server) {
        if (it->second.receiving && it->second.to.gate) it->second.to.gate->leave();  // the receive died
        failed.push_back(it->second);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  const std::string msg = detail::concat("fastps: lost parameter server ", server, " at ",
                                         servers_[server].host, ":", servers_[server].port, " (",
                                         reason, ")");
  if (!failed.empty()) transport_log(msg.substr(8));  // quiet when nothing was lost (shutdown)
  for (Pending& p : failed) p.to.completion->done(std::make_exception_ptr(ConnectionError(msg)));
}

}  // namespace fastps
