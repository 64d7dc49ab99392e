// Transport: authenticated, framed, bidirectional connections between fastps
// processes (docs/protocol.md). One interface, several implementations chosen
// by name through Transport::create(), the one place that maps names to
// implementations: "tcp" (sockets; transport/tcp.h), "shm" and "auto"
// (connections between processes of one host switch to shared-memory rings
// after the handshake; transport/shm_transport.h), "ucx" (frames over UCX,
// RDMA where the fabric has it, loaded at run time; transport/ucx_transport.h;
// "auto" uses it between hosts that have RDMA devices).
//
// Design note (the ps-lite Van pattern): the public methods are non-virtual;
// they validate arguments, enforce the frame limits and keep the byte/message
// counters, then call the protected do_*() virtuals. An implementation calls
// deliver() for each received frame and notify_disconnect() when an
// established connection ends, both from its event-loop thread.
//
// One Transport object can be a server (listen()), a client (connect()), or
// both. Frames received on *any* of its connections, accepted or connected,
// go to the one handler set with set_handler(); the ConnId says which
// connection it came from, and a reply is sent on that same ConnId.
//
// Threading contract:
//  * set_handler() and set_disconnect_handler() are called before the first
//    listen() or connect(); later calls throw InvalidArgument.
//  * The handlers run on the transport's event-loop thread, one call at a
//    time, except that the frames of a shared-memory connection are
//    delivered by that connection's own reader thread, and those of a UCX
//    connection by the UCX progress thread (or, for frames that arrived
//    before connect() registered the connection, by connect()'s caller):
//    handlers that keep
//    state across connections must lock it (frames of one connection always
//    arrive in order, one at a time; its disconnect handler runs after its
//    last frame was delivered). While a handler runs, its connection (and,
//    on the loop thread, every socket) is not read, so handlers should hand
//    work off quickly. A handler may call send() to reply: on an accepted
//    connection send() does not wait for the peer (see send()).
//  * An exception thrown by the message handler is logged and closes the
//    connection whose frame it was handling; it does not stop the loop.
//  * listen(), connect(), send(), close(), peer_info() and stats() may be
//    called from any thread, concurrently.
//  * Destruction stops the loop and closes every connection without calling
//    the disconnect handler; no other thread may be inside a method then.
//    Destroy the transport before anything its handlers use (the loop thread
//    may run a handler until the destructor has joined it).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "protocol/message.h"
#include "transport/shm.h"  // kShm*RingBytes

namespace fastps {

// Identifies one logical connection of a Transport; never reused by it.
using ConnId = uint64_t;
constexpr ConnId kInvalidConnId = 0;

// Called with each complete, authenticated, validated frame.
using MessageHandler = std::function<void(ConnId conn, Message&& message)>;
// Zero-copy receive: called on the delivering thread (the loop, or a
// shared-memory connection's reader) with each established frame's
// header before its payload is read; a non-null return is where the
// payload_len bytes are received instead of a new buffer (the frame then
// arrives with Message::in_place set). The memory must stay valid until the
// frame reaches the handler.
using PayloadTarget = std::function<uint8_t*(ConnId conn, const MessageHeader& header)>;
// Called once for each established connection that ends (peer closed, reset,
// protocol violation, send failure, or a local close()), with a short reason.
using DisconnectHandler = std::function<void(ConnId conn, const std::string& reason)>;

constexpr uint64_t kDefaultSendQueueLimit = uint64_t{4} << 30;  // 4 GiB
constexpr uint64_t kMinSendQueueLimit = 64 << 10;

struct TransportOptions {
  // The per-job secret of the HMAC handshake; never sent. Empty = no
  // protection (tests only).
  std::string secret;
  // Connections that connect() opens to one server; frames are spread over
  // them (1-64).
  int connections_per_peer = 1;
  // Largest payload this side accepts (and sends); see docs/protocol.md.
  size_t max_payload = kDefaultMaxPayload;
  // Deadline of connect() (including the handshake) and of each send() on a
  // connection this side opened.
  std::chrono::milliseconds timeout{30000};
  // Deadline of an accepted connection's handshake (HELLO to AUTH_OK): a
  // peer that connects and then stays silent is closed after it.
  std::chrono::milliseconds handshake_timeout{30000};
  // Liveness window (Note [Liveness] in transport/tcp.h): a connection on
  // which nothing at all arrived for this long is closed, naming the peer;
  // a socket this side sent nothing on for a quarter of it (at most a
  // second) carries a HEARTBEAT. 0 turns the check off (heartbeats go on,
  // once a second, for peers that check). 0 or at least 100 ms.
  std::chrono::milliseconds liveness_timeout{30000};
  // Most bytes of replies an accepted connection may hold for a peer that
  // does not read them (Note [Send queues] in transport/tcp.h); past it the
  // connection is closed.
  uint64_t send_queue_limit = kDefaultSendQueueLimit;
  // SO_SNDBUF / SO_RCVBUF of every socket; 0 keeps the system default.
  int socket_buffer_bytes = 4 << 20;
  // Bytes of each of a shared-memory connection's two rings ("shm", "auto").
  uint64_t shm_ring_bytes = kShmDefaultRingBytes;
  // Microseconds a shared-memory waiter spins, then yields its core, before
  // it sleeps (Note [Shm rings] in transport/shm.h). -1 picks the default
  // (shm_wait(): spin 20 us with more than 4 hardware threads, else 0; yield 0).
  int64_t shm_spin_us = -1;
  int64_t shm_yield_us = -1;
};

struct PeerInfo {
  std::string address;  // "host:port" of the peer
  int rank = -1;        // the rank the client sent in HELLO; -1 for connect()ed peers
  bool outgoing = false;  // true if this side called connect()
  bool shared_memory = false;  // frames travel through shared-memory rings
  // ... and large payloads are copied once, straight between the processes,
  // in both directions (Note [Single copy] in transport/shm.h).
  bool single_copy = false;
  uint64_t max_payload = 0;  // the largest payload the peer accepts (announced in the handshake)
  bool ucx = false;  // frames travel over UCX (transport/ucx_transport.h)
  // ... through these UCX transports ("tcp/lo", "rc_mlx5/mlx5_0:1"), as UCX
  // reports them; empty when not over UCX or before UCX has said.
  std::string ucx_transports;
};

struct TransportStats {
  // Established-connection frames only (headers included); handshakes are
  // not counted.
  uint64_t bytes_sent = 0;
  uint64_t messages_sent = 0;
  uint64_t bytes_received = 0;
  uint64_t messages_received = 0;
  // Note [Send queues]: bytes waiting in this transport's send queues now,
  // the most that ever waited at once, and how many frames (or rests of
  // frames) had to wait in a queue instead of going out at once.
  uint64_t queued_bytes = 0;
  uint64_t queued_peak = 0;
  uint64_t frames_queued = 0;
  // Established connections whose frames travel over UCX now, and which UCX
  // transports they use ("UCX 1.13.1: tcp/lo"; empty without UCX).
  uint64_t ucx_connections = 0;
  std::string ucx;
  // Connections that completed the handshake, how many of them have ended
  // since, and accepted connections that ended before completing it (a wrong
  // secret, a peer that is not fastps, a handshake that timed out).
  uint64_t connections_opened = 0;
  uint64_t connections_closed = 0;
  uint64_t handshakes_failed = 0;
};

class Transport {
 public:
  // Builds a transport by name: "tcp" (sockets only; as a server it
  // declines shared memory and UCX), "shm" (a client connects through shared
  // memory or fails with ConnectionError), "ucx" (every connection's frames
  // over UCX, or ConnectionError) or "auto" (shared memory with peers on
  // this host; UCX with the others where this host has an RDMA device and
  // UCX loads; TCP otherwise); as servers "shm" and "auto" accept shared
  // memory from clients that offer it, "ucx" (and "auto" where it uses UCX)
  // accept both. Throws InvalidArgument for an unknown name or invalid
  // options, TransportUnavailable for "ucx" where UCX cannot be loaded. The
  // event loop starts here.
  static std::unique_ptr<Transport> create(const std::string& kind,
                                           const TransportOptions& options = TransportOptions());

  virtual ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  const std::string& kind() const { return kind_; }
  const TransportOptions& options() const { return options_; }

  void set_handler(MessageHandler handler);
  void set_disconnect_handler(DisconnectHandler handler);
  void set_payload_target(PayloadTarget target);

  // Server side: starts accepting connections on host:port (port 0 picks an
  // ephemeral port) and returns the bound port. Binds to loopback unless told
  // otherwise ("0.0.0.0" or "::" for all interfaces). At most once per
  // transport. Throws ConnectionError if the address cannot be bound.
  uint16_t listen(const std::string& host = "127.0.0.1", uint16_t port = 0);

  // Client side: opens options().connections_per_peer connections to
  // host:port and performs the handshake on each, announcing `rank`. Blocks
  // until done or until options().timeout passes. Throws TimeoutError,
  // ConnectionError (unreachable, refused, closed, authentication failed) or
  // ProtocolError (not a fastps server, version mismatch), each naming
  // host:port. Frames the server sends afterwards reach the handler (a frame
  // the server sends unprompted may reach it before connect() returns).
  // Name resolution (getaddrinfo) is not bounded by the deadline.
  ConnId connect(const std::string& host, uint16_t port, int rank);

  // Sends one frame: `header` followed by the concatenation of the payload
  // segments, which are written in place (scatter/gather) when the peer can
  // take them. magic, version and payload_len are filled in here; the caller
  // sets op, status, count, request_id, key, aux. The segments may be reused
  // once send() returns.
  //  * On a connection this side opened (connect()): blocks until the whole
  //    frame is written or options().timeout passes (TimeoutError).
  //  * On an accepted connection (a server's replies): never waits for the
  //    peer beyond a few milliseconds; what the peer cannot take at once is
  //    copied into the connection's send queue and written as the peer reads
  //    (Note [Send queues] in transport/tcp.h). A connection whose queue
  //    would pass options().send_queue_limit is closed (ConnectionError).
  // Throws InvalidArgument for a header that breaks the protocol (handshake
  // op, status/op mismatch, a limit exceeded locally or by the peer's
  // announced max_payload), ConnectionError if the connection is closed or
  // breaks. After a failure in the middle of a frame the connection is
  // closed (the stream can no longer be framed).
  // Thread-safe: frames from concurrent callers never interleave.
  void send(ConnId conn, const MessageHeader& header, const ConstBuffer* segments = nullptr,
            size_t nsegments = 0);
  // Sends an ERROR frame (message truncated to kMaxErrorMessage bytes).
  void send_error(ConnId conn, uint64_t request_id, Status status, const std::string& message,
                  uint64_t key = 0);

  // Closes a connection from this side. Returns at once; the disconnect
  // handler then runs on the loop thread with reason "closed locally".
  // Unknown or already closed ids are ignored.
  void close(ConnId conn);

  // Throws ConnectionError for an unknown or closed connection.
  PeerInfo peer_info(ConnId conn) const;
  TransportStats stats() const;

 protected:
  Transport(std::string kind, const TransportOptions& options);

  virtual uint16_t do_listen(const std::string& host, uint16_t port) = 0;
  virtual ConnId do_connect(const std::string& host, uint16_t port, int rank) = 0;
  // `header` holds the kHeaderSize encoded bytes; `payload_len` is the sum of
  // the segment sizes (already checked against options().max_payload).
  virtual void do_send(ConnId conn, const uint8_t* header, const ConstBuffer* segments,
                       size_t nsegments, uint64_t payload_len) = 0;
  virtual void do_close(ConnId conn, const std::string& reason) = 0;
  virtual PeerInfo do_peer_info(ConnId conn) const = 0;
  // Adds what an implementation knows beyond the counters (UCX).
  virtual void add_stats(TransportStats*) const {}

  // For implementations, on the event-loop thread. deliver() counts the frame
  // and runs the handler; it returns false if the handler threw (the
  // exception is logged), in which case the implementation closes `conn`.
  bool deliver(ConnId conn, Message&& message);
  void notify_disconnect(ConnId conn, const std::string& reason);
  uint8_t* payload_target(ConnId conn, const MessageHeader& header) const {
    return payload_target_ ? payload_target_(conn, header) : nullptr;
  }
  // Note [Send queues] accounting, any thread: `bytes` entered (frame: one
  // more frame had to wait) or left the send queues.
  void note_queued(uint64_t bytes, bool frame);
  void note_unqueued(uint64_t bytes) { queued_bytes_.fetch_sub(bytes, std::memory_order_relaxed); }
  // Connection counters of TransportStats, any thread.
  void note_connection_opened() { connections_opened_.fetch_add(1, std::memory_order_relaxed); }
  void note_connection_closed() { connections_closed_.fetch_add(1, std::memory_order_relaxed); }
  void note_handshake_failed() { handshakes_failed_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void freeze_handlers(const char* what);

  const std::string kind_;
  const TransportOptions options_;
  MessageHandler handler_;
  DisconnectHandler disconnect_handler_;
  PayloadTarget payload_target_;
  std::atomic<bool> started_{false};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> messages_received_{0};
  std::atomic<uint64_t> queued_bytes_{0};
  std::atomic<uint64_t> queued_peak_{0};
  std::atomic<uint64_t> frames_queued_{0};
  std::atomic<uint64_t> connections_opened_{0};
  std::atomic<uint64_t> connections_closed_{0};
  std::atomic<uint64_t> handshakes_failed_{0};
};

// One line on stderr, prefixed "fastps: " (the transports' diagnostic log).
void transport_log(const std::string& line);

}  // namespace fastps
