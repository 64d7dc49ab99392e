#include "transport/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "common/error.h"

namespace fastps {

using detail::concat;

namespace {

struct AddrInfoList {
  addrinfo* head = nullptr;
  ~AddrInfoList() {
    if (head != nullptr) freeaddrinfo(head);
  }
};

}  // namespace

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

std::string seconds_text(std::chrono::milliseconds ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", static_cast<double>(ms.count()) / 1000.0);
  return buf;
}

std::string host_port(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return concat("[", host, "]:", port);
  return concat(host, ":", port);
}

std::string sockaddr_text(const sockaddr_storage& addr) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (addr.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    return host_port(buf, ntohs(a->sin_port));
  }
  if (addr.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    return host_port(buf, ntohs(a->sin6_port));
  }
  return "?";
}

long long ms_left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left < 0 ? 0 : left + 1;  // round up so that poll does not return just before the deadline
}

int poll_ms(Clock::time_point deadline) {
  long long left = ms_left(deadline);
  return left > INT_MAX ? INT_MAX : static_cast<int>(left);
}

void tune_socket(int fd, const TransportOptions& o, bool nodelay) {
  int one = 1;
  if (nodelay) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (o.socket_buffer_bytes > 0) {
    int size = o.socket_buffer_bytes;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
  }
}


FdGuard::~FdGuard() {
  if (fd_ >= 0) ::close(fd_);
}

void FdGuard::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

void wait_fd(int fd, short events, Clock::time_point deadline, const std::string& where,
             const char* doing) {
  for (;;) {
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, poll_ms(deadline));
    if (r > 0) return;  // ready, or an error the next read/write reports
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw ConnectionError(concat("fastps: poll failed ", doing, " ", where, ": ", errno_text(errno)));
    if (Clock::now() >= deadline) {
      throw TimeoutError(concat("fastps: timed out ", doing, " ", where,
                                " (raise the timeout with FASTPS_TIMEOUT or timeout=)"));
    }
  }
}

void SocketStream::write_all(const uint8_t* data, size_t len) {
  while (len > 0) {
    ssize_t r = ::send(fd_, data, len, MSG_NOSIGNAL);
    if (r > 0) {
      data += r;
      len -= static_cast<size_t>(r);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_fd(fd_, POLLOUT, deadline_, where_, "in the handshake with");
    } else {
      throw ConnectionError(concat("fastps: connection to ", where_, " failed during the handshake: ",
                                   errno_text(errno)));
    }
  }
}

void SocketStream::read_exact(uint8_t* data, size_t len) {
  while (len > 0) {
    ssize_t r = ::recv(fd_, data, len, 0);
    if (r > 0) {
      data += r;
      len -= static_cast<size_t>(r);
    } else if (r == 0) {
      throw ConnectionError(concat("fastps: ", where_,
                                   " closed the connection during the handshake (is it a fastps "
                                   "server of the same job?)"));
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_fd(fd_, POLLIN, deadline_, where_, "waiting for the handshake reply of");
    } else {
      throw ConnectionError(concat("fastps: connection to ", where_, " failed during the handshake: ",
                                   errno_text(errno)));
    }
  }
}

// A non-blocking TCP connection to one of host's addresses, established before
// the deadline.
int connect_socket(const std::string& host, uint16_t port, const TransportOptions& o,
                   Clock::time_point deadline, const std::string& where) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  AddrInfoList list;
  std::string port_text = std::to_string(port);
  int rc = getaddrinfo(host.c_str(), port_text.c_str(), &hints, &list.head);
  FASTPS_CHECK_TYPED(ConnectionError, rc == 0, "fastps: cannot resolve ", where, ": ", gai_strerror(rc));
  std::string last_error = "no address";
  for (addrinfo* ai = list.head; ai != nullptr; ai = ai->ai_next) {
    FdGuard fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (fd.get() < 0) {
      last_error = errno_text(errno);
      continue;
    }
    tune_socket(fd.get(), o, true);  // buffer sizes before connect, for window scaling
    int r = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    if (r < 0 && errno != EINPROGRESS && errno != EINTR) {
      last_error = errno_text(errno);
      continue;
    }
    if (r < 0) {
      wait_fd(fd.get(), POLLOUT, deadline, where, "connecting to");
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last_error = errno_text(err);
        continue;
      }
    }
    return fd.release();
  }
  throw ConnectionError(concat("fastps: cannot connect to ", where, ": ", last_error,
                               " (is the server running and reachable?)"));
}

bool send_small_frame(int fd, MessageHeader h, const uint8_t* payload, size_t len) {
  h.payload_len = len;
  uint8_t hb[kHeaderSize];
  encode_header(h, hb);
  iovec iov[2] = {{hb, kHeaderSize}, {const_cast<uint8_t*>(payload), len}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = len > 0 ? 2 : 1;
  ssize_t r;
  do {
    r = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (r < 0 && errno == EINTR);
  return r == static_cast<ssize_t>(kHeaderSize + len);
}

int listen_socket(const std::string& host, uint16_t port, const TransportOptions& o, int backlog,
                  uint16_t* bound) {
  std::string where = host_port(host.empty() ? "*" : host, port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  AddrInfoList list;
  std::string port_text = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints, &list.head);
  FASTPS_CHECK_TYPED(ConnectionError, rc == 0, "fastps: cannot resolve ", where, ": ", gai_strerror(rc));
  FdGuard fd;
  std::string last_error = "no address";
  for (addrinfo* ai = list.head; ai != nullptr; ai = ai->ai_next) {
    fd.reset(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (fd.get() < 0) {
      last_error = errno_text(errno);
      continue;
    }
    int one = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    tune_socket(fd.get(), o, false);  // inherited by accepted sockets
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd.get(), backlog) == 0) break;
    last_error = errno_text(errno);
    fd.reset(-1);
  }
  FASTPS_CHECK_TYPED(ConnectionError, fd.get() >= 0, "fastps: cannot listen on ", where, ": ", last_error);
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  *bound = addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                      : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return fd.release();
}

std::vector<iovec> frame_iov(const uint8_t* header, const ConstBuffer* segments, size_t nsegments) {
  std::vector<iovec> iov;
  iov.reserve(nsegments + 1);
  iov.push_back(iovec{const_cast<uint8_t*>(header), kHeaderSize});
  for (size_t i = 0; i < nsegments; ++i) {
    if (segments[i].size > 0) iov.push_back(iovec{const_cast<void*>(segments[i].data), segments[i].size});
  }
  return iov;
}

void advance_iov(std::vector<iovec>& iov, size_t& first, uint64_t n) {
  while (n > 0 && first < iov.size() && n >= iov[first].iov_len) n -= iov[first++].iov_len;
  if (n > 0) {
    iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + n;
    iov[first].iov_len -= static_cast<size_t>(n);
  }
}


}  // namespace fastps
