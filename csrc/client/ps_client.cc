#include "client/ps_client.h"

#include <algorithm>
#include <cstring>

#include "client/embedded_client.h"  // chunk_key
#include "common/error.h"

namespace fastps {

void Future::wait(double timeout_s) const {
  auto timeout = timeout_s > 0 ? std::chrono::milliseconds(int64_t(timeout_s * 1000)) : timeout_;
  completion_->wait(Clock::now() + timeout, what_);
}

PsClient::PsClient(int rank, const TransportOptions& options, int64_t chunk_bytes)
    : rank_(rank), chunk_elems_(chunk_bytes / 4), timeout_(options.timeout) {
  FASTPS_CHECK(chunk_bytes >= 4096, "chunk_bytes must be at least 4096, got ", chunk_bytes);
  transport_ = Transport::create("tcp", options);
  transport_->set_handler([this](ConnId c, Message&& m) { on_message(c, std::move(m)); });
  transport_->set_disconnect_handler(
      [this](ConnId c, const std::string& why) { on_disconnect(c, why); });
  // Replies carrying values land straight in the destination tensor.
  transport_->set_payload_target([this](ConnId, const MessageHeader& h) -> uint8_t* {
    if (h.op != Op::kReply) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(h.request_id);
    if (it == pending_.end() || it->second.dst == nullptr ||
        uint64_t(it->second.count) * 4 != h.payload_len)
      return nullptr;
    return reinterpret_cast<uint8_t*>(it->second.dst);
  });
}

PsClient::~PsClient() {
  transport_.reset();  // joins the loop thread before the maps go
}

void PsClient::connect(const std::vector<ServerAddress>& servers) {
  FASTPS_CHECK(conns_.empty(), "PsClient::connect called twice");
  FASTPS_CHECK(!servers.empty(), "no parameter servers to connect to");
  std::vector<ConnId> conns;
  for (const ServerAddress& s : servers) conns.push_back(transport_->connect(s.host, s.port, rank_));
  std::lock_guard<std::mutex> lock(mu_);
  servers_ = servers;
  conns_ = conns;
  server_bytes_.assign(servers.size(), 0);
  for (size_t i = 0; i < conns.size(); ++i) conn_server_[conns[i]] = int(i);
}

std::vector<std::string> PsClient::server_paths() const {
  std::vector<std::string> paths;
  for (size_t i = 0; i < conns_.size(); ++i) {
    if (local_server_ != nullptr && int(i) == local_index_) {
      paths.push_back("local");
    } else {
      paths.push_back(transport_->peer_info(conns_[i]).shared_memory ? "shm" : "tcp");
    }
  }
  return paths;
}

void PsClient::attach_local(PsServer* server, int index) {
  FASTPS_CHECK(index >= 0 && index < num_servers(), "local server index ", index, " out of range");
  server->set_local_sink(rank_, [this](const MessageHeader& h, const void* data, size_t bytes) {
    complete(h, data, bytes);
  });
  std::lock_guard<std::mutex> lock(mu_);
  local_server_ = server;
  local_index_ = index;
}

PsClient::Entry& PsClient::entry(uint32_t tensor_id) {
  auto it = entries_.find(tensor_id);
  FASTPS_CHECK(it != entries_.end(), "tensor ", tensor_id, " is not registered with the servers");
  return it->second;
}

FuturePtr PsClient::register_dense(uint32_t tensor_id, int64_t numel, bool sum_only,
                                   const OptimHyper& hyper, const float* init) {
  FASTPS_CHECK(numel > 0, "cannot register an empty tensor");
  FASTPS_CHECK(!conns_.empty(), "PsClient is not connected");
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(!entries_.count(tensor_id), "tensor ", tensor_id, " is already registered");
    const int64_t chunks = (numel + chunk_elems_ - 1) / chunk_elems_;
    FASTPS_CHECK(chunks < (int64_t{1} << kChunkIndexBits), "tensor of ", numel,
                 " elements needs too many chunks; raise chunk_bytes");
    Entry& e = entries_[tensor_id];
    e.numel = numel;
    for (int64_t c = 0; c < chunks; ++c) {
      const int s = int(std::min_element(server_bytes_.begin(), server_bytes_.end()) -
                        server_bytes_.begin());
      e.servers.push_back(s);
      server_bytes_[s] += std::min(chunk_elems_, numel - c * chunk_elems_) * 4;
    }
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

FuturePtr PsClient::push(uint32_t tensor_id, const float* grad, const OptimHyper& hyper,
                         uint32_t clock) {
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

FuturePtr PsClient::pull(uint32_t tensor_id, float* dst, uint32_t min_version) {
  return request(
      tensor_id, Op::kPull, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>&, int64_t, int64_t n) {
        h.aux = min_version;
        h.count = uint32_t(n);
      },
      "PULL");
}

FuturePtr PsClient::push_pull(uint32_t tensor_id, const float* src, float* dst, uint32_t clock) {
  return request(
      tensor_id, Op::kPushPull, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.aux = clock;
        if (src) {
          segs.push_back({src + begin, size_t(n) * 4});
        } else {
          h.flags = kFlagSkip;
        }
      },
      "PUSH_PULL");
}

FuturePtr PsClient::state_get(uint32_t tensor_id, int buffer, float* dst) {
  if (buffer == 255) {
    // One float per chunk; the caller reads the first chunk's (all agree).
    return request(
        tensor_id, Op::kStateGet, dst, false, 1,
        [&](MessageHeader& h, std::vector<ConstBuffer>&, int64_t, int64_t) { h.aux = 255; },
        "STATE_GET");
  }
  return request(
      tensor_id, Op::kStateGet, dst, true, -1,
      [&](MessageHeader& h, std::vector<ConstBuffer>&, int64_t, int64_t) { h.aux = uint32_t(buffer); },
      "STATE_GET");
}

FuturePtr PsClient::state_set(uint32_t tensor_id, int buffer, const float* src) {
  return request(
      tensor_id, Op::kStateSet, nullptr, false, 0,
      [&](MessageHeader& h, std::vector<ConstBuffer>& segs, int64_t begin, int64_t n) {
        h.aux = uint32_t(buffer);
        if (buffer == 255) {
          segs.push_back({src, 4});
        } else {
          segs.push_back({src + begin, size_t(n) * 4});
        }
      },
      "STATE_SET");
}

FuturePtr PsClient::request(uint32_t tensor_id, Op op, float* dst, bool dst_per_chunk,
                            int64_t reply_count, const FrameFn& fill, const char* what) {
  struct Frame {
    MessageHeader header;
    std::vector<ConstBuffer> segs;
    int server;
  };
  std::vector<Frame> frames;
  CompletionPtr completion;
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(!conns_.empty(), "PsClient is not connected");
    Entry& e = entry(tensor_id);
    completion = std::make_shared<Completion>(uint32_t(e.servers.size()));
    for (size_t c = 0; c < e.servers.size(); ++c) {
      const int64_t begin = int64_t(c) * chunk_elems_;
      const int64_t n = std::min(chunk_elems_, e.numel - begin);
      Frame f;
      f.header.op = op;
      f.header.key = chunk_key(tensor_id, uint32_t(c));
      f.header.request_id = next_id_++;
      f.header.count = uint32_t(n);
      f.server = e.servers[c];
      fill(f.header, f.segs, begin, n);
      Pending p;
      p.completion = completion;
      p.dst = dst ? (dst_per_chunk ? dst + begin : dst) : nullptr;
      p.count = reply_count < 0 ? n : reply_count;
      if (!dst) p.count = 0;
      p.server = f.server;
      pending_[f.header.request_id] = p;
      frames.push_back(std::move(f));
    }
  }
  auto future = std::make_shared<Future>(
      completion, detail::concat(what, " of tensor ", tensor_id), timeout_);
  for (Frame& f : frames) {
    try {
      if (f.server == local_index_) {
        Message m;
        m.header = f.header;
        size_t total = 0;
        for (const ConstBuffer& b : f.segs) total += b.size;
        m.header.payload_len = total;
        if (f.segs.size() == 1) {
          // The shard reads the caller's tensor in place: it stays valid until
          // this request completes (the Future's contract), and the shard is
          // done reading before it replies.
          m.in_place = const_cast<uint8_t*>(static_cast<const uint8_t*>(f.segs[0].data));
        } else {
          m.payload.resize(total);
          size_t at = 0;
          for (const ConstBuffer& b : f.segs) {
            if (b.size) std::memcpy(m.payload.data() + at, b.data, b.size);
            at += b.size;
          }
        }
        local_server_->submit_local(std::move(m));
        continue;
      }
      transport_->send(conns_[f.server], f.header, f.segs.data(), f.segs.size());
    } catch (const Error& e) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(f.header.request_id);
      if (it != pending_.end()) {
        it->second.completion->done(std::make_exception_ptr(ConnectionError(detail::concat(
            "fastps: cannot reach parameter server ", f.server, " at ", servers_[f.server].host, ":",
            servers_[f.server].port, ": ", e.what()))));
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
    p = it->second;
    pending_.erase(it);
  }
  if (h.op == Op::kError) {
    std::string msg = sanitize_error_text(static_cast<const uint8_t*>(data), bytes);
    const std::string where = detail::concat("parameter server ", p.server, " (",
                                             servers_[p.server].host, ":", servers_[p.server].port, "): ");
    std::exception_ptr e;
    if (h.status == uint32_t(Status::kTimeout))
      e = std::make_exception_ptr(ConnectionError("fastps: " + where + msg));
    else
      e = std::make_exception_ptr(InvalidArgument("fastps: " + where + msg));
    p.completion->done(e);
    return;
  }
  if (p.count > 0) {
    if (bytes != size_t(p.count) * 4) {
      p.completion->done(std::make_exception_ptr(ProtocolError(detail::concat(
          "fastps: parameter server ", p.server, " replied with ", bytes, " bytes where ",
          p.count * 4, " were expected"))));
      return;
    }
    if (data != p.dst) std::memcpy(p.dst, data, bytes);
  }
  p.completion->done();
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
      if (it->second.server == server) {
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
  for (Pending& p : failed) p.completion->done(std::make_exception_ptr(ConnectionError(msg)));
}

}  // namespace fastps
