// The records of a TcpTransport connection (internal to transport/tcp*.cc
// and transport/shm_transport.cc). Which thread may touch which field is
// written next to it.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/handshake.h"
#include "transport/tcp.h"

namespace fastps {

// epoll tokens of the wake eventfd and the listening socket (sockets get 16 on).
constexpr uint64_t kWakeToken = 1;
constexpr uint64_t kListenToken = 2;
constexpr size_t kStageSize = 256 << 10;  // the loop's staging buffer for small reads

// Note [Send queues]: how long a send on an accepted connection waits for the
// peer to make room.
constexpr auto kSendGrace = std::chrono::milliseconds(2);

// Note [Send queues]: the unwritten rest of a frame (or a whole frame), copied.
struct OutBytes {
  std::unique_ptr<uint8_t[]> data;
  size_t size = 0;
  size_t off = 0;  // bytes already written
};

struct TcpTransport::Socket {
  explicit Socket(int fd_in) : fd(fd_in) {}  // -1: the receive state of a connection's rings
  ~Socket() {
    if (fd >= 0) ::close(fd);
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  const int fd;
  uint64_t token = 0;
  // Held while a frame is being written, so frames never interleave.
  std::timed_mutex send_mu;
  // Note [Send queues]: bytes waiting for the peer, oldest first (send_mu).
  std::deque<OutBytes> queue;
  std::atomic<bool> want_out{false};  // EPOLLOUT is (about to be) armed
  // Note [Liveness]: steady-clock nanoseconds of the last bytes written and read.
  std::atomic<int64_t> last_send{0};
  std::atomic<int64_t> last_recv{0};

  // Receive state: the loop thread only (and connect() before registration),
  // or the reader thread of a shared-memory connection for its ring's state.
  // Accepted sockets run the server handshake first; null once established.
  std::unique_ptr<ServerHandshake> handshake;
  uint8_t header_bytes[kHeaderSize];
  size_t header_got = 0;
  bool in_payload = false;
  Message frame;
  size_t payload_got = 0;
  uint8_t* payload_at = nullptr;  // where this frame's payload goes
};

struct TcpTransport::Conn {
  explicit Conn(TcpTransport* o) : owner(o) {}
  // Queued bytes still here go with the connection.
  ~Conn() { owner->note_unqueued(queued.load(std::memory_order_relaxed)); }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  TcpTransport* const owner;
  ConnId id = kInvalidConnId;
  std::string peer;
  bool outgoing = false;
  // Written before `established` is set (release), read after it (acquire).
  int rank = -1;
  uint64_t peer_max_payload = kMinMaxPayload;
  Clock::time_point handshake_deadline;
  // Fixed once the connection is registered; read without a lock.
  std::vector<SocketPtr> sockets;
  std::atomic<bool> established{false};
  std::atomic<bool> closing{false};    // no more frames are sent or delivered
  std::atomic<bool> torn_down{false};  // loop thread: removed, handler called
  std::atomic<uint32_t> next_socket{0};
  std::mutex reason_mu;
  std::string close_reason;  // first reason given to request_close()

  // Shared memory (transport/shm_transport.h): `shm` is set before `use_shm`
  // (release); from then on every frame, in both directions, goes through
  // the connection's rings, and the socket only carries heartbeats.
  std::shared_ptr<ShmChannel> shm;
  std::atomic<bool> use_shm{false};
  // UCX (transport/ucx_transport.h), the same way: `ucx` is set before
  // `use_ucx` (release); then every frame goes over the UCX endpoint.
  std::shared_ptr<UcxChannel> ucx;
  std::atomic<bool> use_ucx{false};
  // Frames travel over a channel (shared memory or UCX), not the sockets.
  bool has_channel() const {
    return use_shm.load(std::memory_order_acquire) || use_ucx.load(std::memory_order_acquire);
  }

  // Note [Send queues]: bytes waiting in this connection's queues (its
  // sockets' and, with shared memory, the channel's), and when queued bytes
  // last moved (or a queue started): a stalled peer is closed.
  std::atomic<uint64_t> queued{0};
  std::atomic<int64_t> queue_moved{0};
};

}  // namespace fastps
