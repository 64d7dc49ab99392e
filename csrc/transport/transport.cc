#include "transport/transport.h"

#include <cstdio>
#include <exception>
#include <mutex>

#include "common/error.h"
#include "transport/shm.h"
#include "transport/shm_transport.h"
#include "transport/tcp.h"
#include "transport/ucx_transport.h"

namespace fastps {

namespace {

void validate_options(const TransportOptions& o) {
  FASTPS_CHECK(o.connections_per_peer >= 1 && o.connections_per_peer <= 64,
               "fastps: connections_per_peer must be in [1, 64], got ", o.connections_per_peer);
  FASTPS_CHECK(o.max_payload >= kMinMaxPayload && o.max_payload <= kMaxMaxPayload,
               "fastps: max_payload must be in [", kMinMaxPayload, ", ", kMaxMaxPayload, "] bytes, got ",
               o.max_payload);
  FASTPS_CHECK(o.timeout.count() > 0, "fastps: timeout must be positive, got ", o.timeout.count(),
               " ms");
  FASTPS_CHECK(o.handshake_timeout.count() > 0, "fastps: handshake_timeout must be positive, got ",
               o.handshake_timeout.count(), " ms");
  FASTPS_CHECK(o.liveness_timeout.count() == 0 || o.liveness_timeout.count() >= 100,
               "fastps: liveness_timeout must be 0 (off) or at least 100 ms, got ", o.liveness_timeout.count(),
               " ms");
  FASTPS_CHECK(o.send_queue_limit >= kMinSendQueueLimit, "fastps: send_queue_limit must be at least ",
               kMinSendQueueLimit, " bytes, got ", o.send_queue_limit);
  FASTPS_CHECK(o.socket_buffer_bytes >= 0, "fastps: socket_buffer_bytes must be >= 0, got ",
               o.socket_buffer_bytes);
  FASTPS_CHECK(o.shm_ring_bytes >= kShmMinRingBytes && o.shm_ring_bytes <= kShmMaxRingBytes,
               "fastps: shm_ring_bytes must be in [", kShmMinRingBytes, ", ", kShmMaxRingBytes,
               "], got ", o.shm_ring_bytes);
  FASTPS_CHECK(o.shm_spin_us >= -1 && o.shm_spin_us <= kShmMaxWaitUs, "fastps: shm_spin_us must be -1 (default) or in [0, ",
               kShmMaxWaitUs, "] microseconds, got ", o.shm_spin_us);
  FASTPS_CHECK(o.shm_yield_us >= -1 && o.shm_yield_us <= kShmMaxWaitUs, "fastps: shm_yield_us must be -1 (default) or in [0, ",
               kShmMaxWaitUs, "] microseconds, got ", o.shm_yield_us);
}

}  // namespace

void transport_log(const std::string& line) {
  // One fprintf per line: stderr is unbuffered, and a single call keeps lines
  // from different threads whole.
  std::fprintf(stderr, "fastps: %s\n", line.c_str());
}

std::unique_ptr<Transport> Transport::create(const std::string& kind,
                                             const TransportOptions& options) {
  validate_options(options);
  if (kind == "tcp") return std::make_unique<TcpTransport>("tcp", options);
  // Both accept shared-memory offers as servers; as clients "shm" insists
  // on shared memory, "auto" falls back to TCP for peers on other hosts.
  if (kind == "shm") return std::make_unique<ShmTransport>("shm", options, true);
  std::string why;
  if (kind == "ucx") {
    const ucx::Plugin* plugin = load_ucx_plugin(&why);
    if (plugin == nullptr) {
      throw TransportUnavailable(detail::concat("fastps: FASTPS_TRANSPORT=ucx is not available here: ", why));
    }
    return std::make_unique<UcxTransport>("ucx", options, plugin, true);
  }
  if (kind == "auto") {
    // UCX between hosts only where it can use RDMA; between processes of
    // one host shared memory is faster, and TCP is TCP either way.
    if (host_has_rdma_device()) {
      if (const ucx::Plugin* plugin = load_ucx_plugin(&why))
        return std::make_unique<UcxTransport>("auto", options, plugin, false);
      static std::once_flag logged;
      std::call_once(logged, [&] {
        transport_log(detail::concat("this host has an RDMA device but UCX is not available (", why,
                                     "); FASTPS_TRANSPORT=auto uses TCP between hosts"));
      });
    }
    return std::make_unique<ShmTransport>("auto", options, false);
  }
  throw InvalidArgument(detail::concat("fastps: unknown transport '", kind,
                                       "': it must be 'auto' (shared memory with processes on this host, UCX "
                                       "between hosts with RDMA devices, TCP otherwise), 'tcp', 'shm' or 'ucx'"));
}

Transport::Transport(std::string kind, const TransportOptions& options)
    : kind_(std::move(kind)), options_(options) {
  validate_options(options_);
}

Transport::~Transport() = default;

void Transport::freeze_handlers(const char* what) {
  FASTPS_CHECK(handler_ != nullptr, "fastps: call set_handler() before ", what, "()");
  started_.store(true, std::memory_order_release);
}

void Transport::set_handler(MessageHandler handler) {
  FASTPS_CHECK(!started_.load(std::memory_order_acquire),
               "fastps: set_handler() must be called before listen()/connect()");
  FASTPS_CHECK(handler != nullptr, "fastps: set_handler() needs a callable");
  handler_ = std::move(handler);
}

void Transport::set_disconnect_handler(DisconnectHandler handler) {
  FASTPS_CHECK(!started_.load(std::memory_order_acquire),
               "fastps: set_disconnect_handler() must be called before listen()/connect()");
  disconnect_handler_ = std::move(handler);
}

void Transport::set_payload_target(PayloadTarget target) {
  FASTPS_CHECK(!started_.load(std::memory_order_acquire),
               "fastps: set_payload_target() must be called before listen()/connect()");
  payload_target_ = std::move(target);
}

uint16_t Transport::listen(const std::string& host, uint16_t port) {
  freeze_handlers("listen");
  return do_listen(host, port);
}

ConnId Transport::connect(const std::string& host, uint16_t port, int rank) {
  FASTPS_CHECK(!host.empty(), "fastps: connect() needs a host");
  FASTPS_CHECK(port != 0, "fastps: connect() needs a non-zero port");
  freeze_handlers("connect");
  return do_connect(host, port, rank);
}

void Transport::send(ConnId conn, const MessageHeader& header, const ConstBuffer* segments,
                     size_t nsegments) {
  FASTPS_CHECK(nsegments == 0 || segments != nullptr, "fastps: send() with ", nsegments,
               " segments but no segment array");
  uint64_t payload_len = 0;
  for (size_t i = 0; i < nsegments; ++i) {
    FASTPS_CHECK(segments[i].data != nullptr || segments[i].size == 0,
                 "fastps: send() payload segment ", i, " has a null pointer");
    payload_len += segments[i].size;
  }
  MessageHeader h = header;
  h.magic = kProtocolMagic;
  h.version = kProtocolVersion;
  h.payload_len = payload_len;
  std::string problem = header_problem(h, options_.max_payload);
  FASTPS_CHECK(problem.empty(), "fastps: cannot send: ", problem);
  FASTPS_CHECK(!is_transport_op(h.op), "fastps: cannot send: ", op_name(h.op),
               " is used by the transport itself");
  uint8_t bytes[kHeaderSize];
  encode_header(h, bytes);
  do_send(conn, bytes, segments, nsegments, payload_len);
  bytes_sent_.fetch_add(kHeaderSize + payload_len, std::memory_order_relaxed);
  messages_sent_.fetch_add(1, std::memory_order_relaxed);
}

void Transport::send_error(ConnId conn, uint64_t request_id, Status status,
                           const std::string& message, uint64_t key) {
  FASTPS_CHECK(status != Status::kOk, "fastps: send_error() needs a non-zero status");
  std::string text = truncate_utf8(message, kMaxErrorMessage);
  MessageHeader h;
  h.op = Op::kError;
  h.status = static_cast<uint32_t>(status);
  h.request_id = request_id;
  h.key = key;
  ConstBuffer segment{text.data(), text.size()};
  send(conn, h, &segment, text.empty() ? 0 : 1);
}

void Transport::close(ConnId conn) { do_close(conn, "closed locally"); }

PeerInfo Transport::peer_info(ConnId conn) const { return do_peer_info(conn); }

TransportStats Transport::stats() const {
  TransportStats s;
  s.bytes_sent = bytes_sent_.load(std::memory_order_relaxed);
  s.messages_sent = messages_sent_.load(std::memory_order_relaxed);
  s.bytes_received = bytes_received_.load(std::memory_order_relaxed);
  s.messages_received = messages_received_.load(std::memory_order_relaxed);
  s.queued_bytes = queued_bytes_.load(std::memory_order_relaxed);
  s.queued_peak = queued_peak_.load(std::memory_order_relaxed);
  s.frames_queued = frames_queued_.load(std::memory_order_relaxed);
  s.connections_opened = connections_opened_.load(std::memory_order_relaxed);
  s.connections_closed = connections_closed_.load(std::memory_order_relaxed);
  s.handshakes_failed = handshakes_failed_.load(std::memory_order_relaxed);
  add_stats(&s);
  return s;
}

void Transport::note_queued(uint64_t bytes, bool frame) {
  const uint64_t now = queued_bytes_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  uint64_t peak = queued_peak_.load(std::memory_order_relaxed);
  while (now > peak && !queued_peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  if (frame) frames_queued_.fetch_add(1, std::memory_order_relaxed);
}

bool Transport::deliver(ConnId conn, Message&& message) {
  bytes_received_.fetch_add(kHeaderSize + message.header.payload_len, std::memory_order_relaxed);
  messages_received_.fetch_add(1, std::memory_order_relaxed);
  try {
    handler_(conn, std::move(message));
    return true;
  } catch (const std::exception& e) {
    transport_log(detail::concat("message handler threw on connection ", conn, ": ", e.what(),
                                 "; closing the connection"));
  } catch (...) {
    transport_log(detail::concat("message handler threw a non-standard exception on connection ",
                                 conn, "; closing the connection"));
  }
  return false;
}

void Transport::notify_disconnect(ConnId conn, const std::string& reason) {
  if (!disconnect_handler_) return;
  try {
    disconnect_handler_(conn, reason);
  } catch (const std::exception& e) {
    transport_log(detail::concat("disconnect handler threw on connection ", conn, ": ", e.what()));
  } catch (...) {
    transport_log(detail::concat("disconnect handler threw on connection ", conn));
  }
}

}  // namespace fastps
