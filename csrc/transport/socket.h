// Socket helpers of the transports (internal): descriptors, addresses,
// deadlines, blocking reads and writes for the handshake, and the iovec
// bookkeeping of scatter/gather sends. No connection state lives here; the
// connections and their event loop are transport/tcp.h.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/futex.h"  // Clock
#include "protocol/message.h"
#include "transport/handshake.h"
#include "transport/transport.h"

namespace fastps {

// Steady-clock nanoseconds (the time stamps of Note [Liveness]).
int64_t now_ns();
// "2 s", "2.5 s", "0.25 s": a duration in words for messages.
std::string seconds_text(std::chrono::milliseconds ms);
// "host:port", with brackets around an IPv6 host.
std::string host_port(const std::string& host, uint16_t port);
std::string sockaddr_text(const sockaddr_storage& addr);
// Milliseconds until `deadline`, rounded up, for poll()/epoll_wait().
long long ms_left(Clock::time_point deadline);
int poll_ms(Clock::time_point deadline);

// TCP_NODELAY (frames are written whole; Nagle would only add latency) and
// the socket buffer sizes. Failures are ignored: these are performance hints.
void tune_socket(int fd, const TransportOptions& o, bool nodelay);

// Owns a file descriptor until release().
class FdGuard {
 public:
  explicit FdGuard(int fd = -1) : fd_(fd) {}
  ~FdGuard();
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd);

 private:
  int fd_;
};

// A non-blocking listening socket on host:port (empty host: all interfaces);
// *bound receives the port. Throws ConnectionError naming the address.
int listen_socket(const std::string& host, uint16_t port, const TransportOptions& o, int backlog,
                  uint16_t* bound);
// A non-blocking TCP connection to one of host's addresses, established
// before the deadline. Throws ConnectionError or TimeoutError naming `where`.
int connect_socket(const std::string& host, uint16_t port, const TransportOptions& o,
                   Clock::time_point deadline, const std::string& where);

// Waits until fd is ready for `events` (or has an error the next call
// reports); TimeoutError past the deadline. `doing` completes "timed out ...".
void wait_fd(int fd, short events, Clock::time_point deadline, const std::string& where, const char* doing);

// The handshake's view of a connected socket: blocking reads and writes
// bounded by one deadline (caller's thread).
class SocketStream final : public BlockingStream {
 public:
  SocketStream(int fd, Clock::time_point deadline, std::string where)
      : fd_(fd), deadline_(deadline), where_(std::move(where)) {}
  void write_all(const uint8_t* data, size_t len) override;
  void read_exact(uint8_t* data, size_t len) override;
  const std::string& where() const override { return where_; }

 private:
  int fd_;
  Clock::time_point deadline_;
  std::string where_;
};

// One non-blocking write of a whole small frame (handshake replies and
// last-word ERROR frames). Returns false unless all of it went out.
bool send_small_frame(int fd, MessageHeader h, const uint8_t* payload, size_t len);

// The header and the non-empty payload segments as an iovec list.
std::vector<iovec> frame_iov(const uint8_t* header, const ConstBuffer* segments, size_t nsegments);
// Drops the first n bytes of iov[first..] (whole entries first, then part of one).
void advance_iov(std::vector<iovec>& iov, size_t& first, uint64_t n);

}  // namespace fastps
