#include "transport/tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <new>
#include <system_error>

#include "common/error.h"
#include "common/futex.h"
#include "common/sha256.h"
#include "transport/shm.h"

namespace fastps {

namespace {

using detail::concat;

constexpr uint64_t kWakeToken = 1;
constexpr uint64_t kListenToken = 2;
constexpr size_t kStageSize = 256 << 10;   // staging buffer for small reads
constexpr size_t kReadBudget = 16 << 20;   // bytes read from one socket per wakeup
constexpr int kMaxEvents = 64;
constexpr int kTickMs = 100;               // loop tick while handshakes are pending
constexpr int kListenBacklog = 1024;
constexpr size_t kShmReadPiece = 256 << 10;  // ring bytes parsed before the space is freed
// Note [Single copy] (transport/shm.h): payloads from this size on travel by
// reference when the receiver can read the sender's memory. In the ring such
// a frame is its header with `reserved` = kRingByRef, then u32 n, u32 0 and n
// pairs (u64 address, u64 length) of the sender's buffers; payload_len is the
// total. Never on a socket: a header with a non-zero `reserved` is invalid there.
constexpr uint64_t kByRefMinPayload = 64 << 10;
constexpr uint32_t kRingByRef = 1;
constexpr size_t kByRefMaxSegments = 16;
constexpr size_t kHeaderReservedOffset = 44;
constexpr auto kShmReaderSlice = std::chrono::milliseconds(100);
// Note [Send queues]: how long a send on an accepted connection waits for the
// peer to make room, for a reader to claim a by-reference frame, and at most
// for a claimed copy to end.
constexpr auto kSendGrace = std::chrono::milliseconds(2);
constexpr auto kByRefGrace = std::chrono::milliseconds(10);
constexpr auto kByRefCopyLimit = std::chrono::seconds(5);
constexpr int kRetryMs = 1;  // loop tick while a send queue waits for its lock
// A queue whose bytes moved this recently belongs to a peer that is reading.
constexpr int64_t kQueueMovingNs = 20'000'000;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// "2 s", "2.5 s", "0.25 s": a duration in words for messages.
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

// Cryptographic randomness from the kernel (getrandom, or /dev/urandom).
void fill_random(uint8_t* out, size_t len) {
  size_t got = 0;
  while (got < len) {
    ssize_t r = getrandom(out + got, len - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  if (got == len) return;
  int fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  FASTPS_CHECK_TYPED(Error, fd >= 0, "fastps: no source of random bytes: ", errno_text(errno));
  while (got < len) {
    ssize_t r = ::read(fd, out + got, len - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  FASTPS_CHECK_TYPED(Error, got == len, "fastps: could not read random bytes");
}

// TCP_NODELAY (frames are written whole; Nagle would only add latency) and
// the socket buffer sizes. Failures are ignored: these are performance hints.
void tune_socket(int fd, const TransportOptions& o, bool nodelay) {
  int one = 1;
  if (nodelay) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (o.socket_buffer_bytes > 0) {
    int size = o.socket_buffer_bytes;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
  }
}

// Owns a file descriptor until release().
class FdGuard {
 public:
  explicit FdGuard(int fd = -1) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_;
};

struct AddrInfoList {
  addrinfo* head = nullptr;
  ~AddrInfoList() {
    if (head != nullptr) freeaddrinfo(head);
  }
};

// --- Blocking I/O with a deadline, for the client handshake (caller thread) ---

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

void write_all_blocking(int fd, const uint8_t* data, size_t len, Clock::time_point deadline,
                        const std::string& where) {
  while (len > 0) {
    ssize_t r = ::send(fd, data, len, MSG_NOSIGNAL);
    if (r > 0) {
      data += r;
      len -= static_cast<size_t>(r);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_fd(fd, POLLOUT, deadline, where, "in the handshake with");
    } else {
      throw ConnectionError(concat("fastps: connection to ", where, " failed during the handshake: ",
                                   errno_text(errno)));
    }
  }
}

void read_exact_blocking(int fd, uint8_t* data, size_t len, Clock::time_point deadline,
                         const std::string& where) {
  while (len > 0) {
    ssize_t r = ::recv(fd, data, len, 0);
    if (r > 0) {
      data += r;
      len -= static_cast<size_t>(r);
    } else if (r == 0) {
      throw ConnectionError(concat("fastps: ", where,
                                   " closed the connection during the handshake (is it a fastps "
                                   "server of the same job?)"));
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_fd(fd, POLLIN, deadline, where, "waiting for the handshake reply of");
    } else {
      throw ConnectionError(concat("fastps: connection to ", where, " failed during the handshake: ",
                                   errno_text(errno)));
    }
  }
}

void write_frame_blocking(int fd, MessageHeader h, const uint8_t* payload, size_t len,
                          Clock::time_point deadline, const std::string& where) {
  h.payload_len = len;
  std::vector<uint8_t> bytes(kHeaderSize + len);
  encode_header(h, bytes.data());
  if (len > 0) std::memcpy(bytes.data() + kHeaderSize, payload, len);
  write_all_blocking(fd, bytes.data(), bytes.size(), deadline, where);
}

// Reads one handshake frame; ERROR frames from the server become exceptions.
Message read_handshake_frame(int fd, Op expected, size_t expected_len, Clock::time_point deadline,
                             const std::string& where) {
  uint8_t hb[kHeaderSize];
  read_exact_blocking(fd, hb, kHeaderSize, deadline, where);
  Message m;
  m.header = decode_header(hb);
  const MessageHeader& h = m.header;
  FASTPS_CHECK_TYPED(ProtocolError, h.magic == kProtocolMagic, "fastps: ", where,
                     " is not a fastps server (", header_problem(h, 0), ")");
  FASTPS_CHECK_TYPED(ProtocolError, h.payload_len <= kMaxHandshakePayload, "fastps: ", where,
                     " sent a ", h.payload_len, "-byte handshake frame (limit ", kMaxHandshakePayload, ")");
  m.payload.resize(h.payload_len);
  read_exact_blocking(fd, m.payload.data(), m.payload.size(), deadline, where);
  if (h.op == Op::kError) {
    std::string text = sanitize_error_text(m.payload.data(), m.payload.size());
    std::string msg = concat("fastps: ", where, " rejected the connection (", status_name(h.status),
                             "): ", text);
    if (h.status == static_cast<uint32_t>(Status::kVersion) ||
        h.status == static_cast<uint32_t>(Status::kProtocol)) {
      throw ProtocolError(msg);
    }
    throw ConnectionError(msg);
  }
  FASTPS_CHECK_TYPED(ProtocolError, h.version == kProtocolVersion, "fastps: ", where,
                     " speaks fastps protocol version ", h.version, ", this client speaks ",
                     kProtocolVersion, " (install the same fastps release on every host)");
  FASTPS_CHECK_TYPED(ProtocolError, h.op == expected && m.payload.size() == expected_len, "fastps: ",
                     where, " broke the handshake: expected ", op_name(expected), " with ",
                     expected_len, " bytes, got ", op_name(h.op), " with ", m.payload.size());
  return m;
}

// Client side of docs/protocol.md "Handshake". Returns the server's max_payload.
uint64_t client_handshake(int fd, const TransportOptions& o, int rank, Clock::time_point deadline,
                          const std::string& where) {
  Hello hello;
  hello.rank = rank;
  hello.max_payload = o.max_payload;
  uint8_t hello_bytes[kHelloSize];
  encode_hello(hello, hello_bytes);
  MessageHeader h;
  h.op = Op::kHello;
  write_frame_blocking(fd, h, hello_bytes, sizeof(hello_bytes), deadline, where);

  Message challenge = read_handshake_frame(fd, Op::kChallenge, kChallengeSize, deadline, where);
  const uint8_t* server_nonce = challenge.payload.data();
  uint64_t server_max = load_le64(challenge.payload.data() + kNonceSize);
  FASTPS_CHECK_TYPED(ProtocolError, server_max >= kMinMaxPayload, "fastps: ", where,
                     " announced a max payload of ", server_max, " bytes (at least ", kMinMaxPayload,
                     " required)");

  uint8_t auth[kAuthSize];
  uint8_t* client_nonce = auth + kSha256DigestSize;
  fill_random(client_nonce, kNonceSize);
  Sha256Digest mac = auth_client_proof(o.secret, server_nonce, client_nonce);
  std::memcpy(auth, mac.data(), mac.size());
  h.op = Op::kAuth;
  write_frame_blocking(fd, h, auth, sizeof(auth), deadline, where);

  Message ok = read_handshake_frame(fd, Op::kAuthOk, kAuthOkSize, deadline, where);
  Sha256Digest expected = auth_server_proof(o.secret, server_nonce, client_nonce);
  FASTPS_CHECK_TYPED(ConnectionError, constant_time_equal(expected.data(), ok.payload.data(), kAuthOkSize),
                     "fastps: ", where,
                     " failed to authenticate itself: it does not know this job's secret");
  return std::min<uint64_t>(server_max, kMaxMaxPayload);
}

// Client side of docs/protocol.md "Shared memory": creates a segment, offers
// it and returns it if the server mapped it; null (with the reason in *why)
// if the server declined or no segment could be made.
std::unique_ptr<ShmSegment> offer_shm(int fd, const TransportOptions& o, Clock::time_point deadline,
                                      const std::string& where, std::string* why) {
  std::unique_ptr<ShmSegment> seg;
  try {
    seg = ShmSegment::create(o.shm_ring_bytes);
  } catch (const Error& e) {
    *why = e.what();
    return nullptr;
  }
  std::vector<uint8_t> offer(kShmOfferFixedSize + seg->name().size());
  store_le64(offer.data(), seg->ring_bytes());
  std::memcpy(offer.data() + 8, seg->token(), kShmTokenSize);
  std::memcpy(offer.data() + kShmOfferFixedSize, seg->name().data(), seg->name().size());
  MessageHeader h;
  h.op = Op::kShmOffer;
  write_frame_blocking(fd, h, offer.data(), offer.size(), deadline, where);

  uint8_t hb[kHeaderSize];
  read_exact_blocking(fd, hb, kHeaderSize, deadline, where);
  MessageHeader r = decode_header(hb);
  FASTPS_CHECK_TYPED(ProtocolError, r.magic == kProtocolMagic && r.payload_len <= kMaxHandshakePayload,
                     "fastps: ", where, " answered the shared-memory offer with an invalid frame (",
                     header_problem(r, kMaxHandshakePayload), ")");
  std::vector<uint8_t> body(r.payload_len);
  read_exact_blocking(fd, body.data(), body.size(), deadline, where);
  std::string text = sanitize_error_text(body.data(), body.size());
  if (r.op == Op::kShmAccept) {
    seg->unlink();  // the server did already; nothing may remain in /dev/shm
    seg->probe_peer();
    return seg;
  }
  if (r.op == Op::kShmDecline) {
    *why = concat(where, " declined: ", text);
    return nullptr;
  }
  if (r.op == Op::kError) {
    throw ConnectionError(concat("fastps: ", where, " refused the shared-memory offer (",
                                 status_name(r.status), "): ", text));
  }
  throw ProtocolError(concat("fastps: ", where, " answered the shared-memory offer with ", op_name(r.op)));
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

// One non-blocking write of a whole small frame from the loop thread (handshake
// replies and last-word ERROR frames). Returns false unless all of it went out.
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

}  // namespace

// ---------------------------------------------------------------------------

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

  enum class Phase { kAwaitHello, kAwaitAuth, kEstablished };

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

  // Receive state: loop thread only (and connect() before registration).
  Phase phase = Phase::kEstablished;
  uint8_t header_bytes[kHeaderSize];
  size_t header_got = 0;
  bool in_payload = false;
  Message frame;
  size_t payload_got = 0;
  uint8_t* payload_at = nullptr;  // where this frame's payload goes
  uint8_t server_nonce[kNonceSize];
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

  // Shared memory: `shm` and `shm_rx` are set before `use_shm` (release);
  // from then on every frame, in both directions, goes through the rings.
  std::unique_ptr<ShmSegment> shm;
  SocketPtr shm_rx;  // the reader thread's parse state (fd -1)
  std::atomic<bool> use_shm{false};
  std::timed_mutex shm_send_mu;  // one writer of the outgoing ring at a time

  // Note [Send queues]: bytes waiting in this connection's queues (its
  // sockets' and, with shared memory, `shm_queue`), and when queued bytes
  // last moved (or a queue started): a stalled peer is closed.
  std::atomic<uint64_t> queued{0};
  std::atomic<int64_t> queue_moved{0};
  std::deque<OutBytes> shm_queue;  // shm_send_mu; written by the writer thread
  std::condition_variable_any shm_queue_cv;
};

TcpTransport::TcpTransport(std::string kind, const TransportOptions& options)
    : Transport(std::move(kind), options), stage_(new uint8_t[kStageSize]) {
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  FASTPS_CHECK_TYPED(Error, epoll_fd_ >= 0, "fastps: epoll_create1 failed: ", errno_text(errno));
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    int err = errno;
    ::close(epoll_fd_);
    throw Error(concat("fastps: eventfd failed: ", errno_text(err)));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeToken;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  loop_ = std::thread([this] { run_loop(); });
}

TcpTransport::~TcpTransport() {
  stopping_.store(true, std::memory_order_release);
  uint64_t one = 1;
  ssize_t ignored = ::write(wake_fd_, &one, sizeof(one));
  (void)ignored;
  loop_.join();
  std::unordered_map<ConnId, ConnPtr> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.swap(conns_);
    sockets_.clear();
    close_queue_.clear();
    if (listen_fd_ >= 0) ::close(listen_fd_);
    listen_fd_ = -1;
  }
  std::unordered_map<ConnId, Reader> readers;
  std::vector<Reader> retired;
  {
    std::lock_guard<std::mutex> lock(mu_);
    readers.swap(readers_);
    retired.swap(retired_readers_);
  }
  for (auto& kv : conns) {
    kv.second->closing.store(true, std::memory_order_release);
    for (auto& s : kv.second->sockets) ::shutdown(s->fd, SHUT_RDWR);
    wake_shm(*kv.second);
    kv.second->shm_queue_cv.notify_all();
  }
  for (auto& kv : readers) {
    kv.second.thread.join();
    if (kv.second.writer.joinable()) kv.second.writer.join();
  }
  for (Reader& r : retired) {
    r.thread.join();
    if (r.writer.joinable()) r.writer.join();
  }
  pending_.clear();
  retry_out_.clear();
  conns.clear();  // sockets close as their last reference goes
  ::close(wake_fd_);
  ::close(epoll_fd_);
}

// --- Server side ------------------------------------------------------------

uint16_t TcpTransport::do_listen(const std::string& host, uint16_t port) {
  std::string where = host_port(host.empty() ? "*" : host, port);
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(listen_fd_ < 0, "fastps: this transport is already listening");
  }
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
    tune_socket(fd.get(), options(), false);  // inherited by accepted sockets
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd.get(), kListenBacklog) == 0) break;
    last_error = errno_text(errno);
    fd.reset(-1);
  }
  FASTPS_CHECK_TYPED(ConnectionError, fd.get() >= 0, "fastps: cannot listen on ", where, ": ", last_error);
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  uint16_t bound = addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                              : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(listen_fd_ < 0, "fastps: this transport is already listening");
    listen_fd_ = fd.release();
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kListenToken;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  }
  return bound;
}

void TcpTransport::accept_ready() {
  int listen_fd;
  {
    std::lock_guard<std::mutex> lock(mu_);
    listen_fd = listen_fd_;
  }
  if (listen_fd < 0) return;
  for (;;) {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    int fd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      // Out of descriptors or memory: stop accepting for a tick rather than
      // spin on a level-triggered listening socket.
      transport_log(concat("accept failed: ", errno_text(errno), "; pausing new connections"));
      epoll_event ev{};
      ev.data.u64 = kListenToken;
      epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, listen_fd, &ev);
      accept_paused_ = true;
      accept_resume_at_ = Clock::now() + std::chrono::milliseconds(kTickMs);
      return;
    }
    tune_socket(fd, options(), true);
    auto socket = std::make_shared<Socket>(fd);
    socket->phase = Socket::Phase::kAwaitHello;
    auto conn = std::make_shared<Conn>(this);
    conn->peer = sockaddr_text(addr);
    conn->handshake_deadline = Clock::now() + options().handshake_timeout;
    conn->sockets.push_back(socket);
    {
      std::lock_guard<std::mutex> lock(mu_);
      conn->id = next_conn_++;
      socket->token = next_token_++;
      conns_[conn->id] = conn;
      sockets_[socket->token] = Entry{socket, conn};
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = socket->token;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      transport_log(concat("cannot watch the connection from ", conn->peer, ": ", errno_text(errno)));
      teardown(conn, "epoll_ctl failed");
      continue;
    }
    pending_.push_back(conn);
  }
}

// --- Client side ------------------------------------------------------------

ConnId TcpTransport::do_connect(const std::string& host, uint16_t port, int rank) {
  const Clock::time_point deadline = Clock::now() + options().timeout;
  const std::string where = host_port(host, port);
  auto conn = std::make_shared<Conn>(this);
  conn->peer = where;
  conn->outgoing = true;
  for (int i = 0; i < options().connections_per_peer; ++i) {
    auto socket = std::make_shared<Socket>(connect_socket(host, port, options(), deadline, where));
    conn->peer_max_payload = client_handshake(socket->fd, options(), rank, deadline, where);
    conn->sockets.push_back(socket);
    if (i > 0 || options().shm == ShmMode::kOff) continue;
    std::string why;
    conn->shm = offer_shm(socket->fd, options(), deadline, where, &why);
    if (conn->shm) break;  // the rings carry every frame; one socket suffices for liveness
    if (options().shm == ShmMode::kRequire) {
      throw ConnectionError(concat("fastps: cannot use shared memory with ", where, ": ", why,
                                   " (FASTPS_TRANSPORT=shm needs every server on this host; use auto "
                                   "or tcp otherwise)"));
    }
  }
  if (conn->shm) {
    conn->shm_rx = std::make_shared<Socket>(-1);
    conn->use_shm.store(true, std::memory_order_release);
  }
  const int64_t now = now_ns();
  for (auto& s : conn->sockets) {
    s->last_send.store(now, std::memory_order_relaxed);
    s->last_recv.store(now, std::memory_order_relaxed);
  }
  conn->established.store(true, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK_TYPED(ConnectionError, !stopping_.load(), "fastps: transport is shutting down");
    conn->id = next_conn_++;
    for (auto& s : conn->sockets) {
      s->token = next_token_++;
      sockets_[s->token] = Entry{s, conn};
    }
    conns_[conn->id] = conn;
  }
  for (auto& s : conn->sockets) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = s->token;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, s->fd, &ev) != 0) {
      int err = errno;
      request_close(conn, "epoll_ctl failed");
      throw ConnectionError(concat("fastps: cannot watch the connection to ", where, ": ", errno_text(err)));
    }
  }
  if (conn->use_shm.load(std::memory_order_acquire)) start_shm_reader(conn);
  return conn->id;
}

// --- Sending (caller threads) -------------------------------------------------

void TcpTransport::do_send(ConnId id, const uint8_t* header, const ConstBuffer* segments,
                           size_t nsegments, uint64_t payload_len) {
  const Clock::time_point deadline = Clock::now() + options().timeout;
  ConnPtr conn = find_established(id);
  FASTPS_CHECK_TYPED(ConnectionError, conn && !conn->closing.load(std::memory_order_acquire),
                     "fastps: cannot send on connection ", id, conn ? concat(" (", conn->peer, ")") : "",
                     ": the connection is closed");
  FASTPS_CHECK(payload_len <= conn->peer_max_payload, "fastps: cannot send a ", payload_len,
               "-byte payload to ", conn->peer, ": the peer accepts at most ", conn->peer_max_payload,
               " bytes per frame");
  // Note [Send queues]: only a connection this side opened makes its caller wait.
  if (conn->use_shm.load(std::memory_order_acquire)) {
    if (conn->outgoing)
      shm_send(conn, header, segments, nsegments, payload_len, deadline);
    else
      shm_post(conn, header, segments, nsegments, payload_len);
  } else if (conn->outgoing) {
    send_blocking(conn, header, segments, nsegments, payload_len, deadline);
  } else {
    post(conn, header, segments, nsegments, payload_len);
  }
}

namespace {

// The header and the non-empty payload segments as an iovec list.
std::vector<iovec> frame_iov(const uint8_t* header, const ConstBuffer* segments, size_t nsegments) {
  std::vector<iovec> iov;
  iov.reserve(nsegments + 1);
  iov.push_back(iovec{const_cast<uint8_t*>(header), kHeaderSize});
  for (size_t i = 0; i < nsegments; ++i) {
    if (segments[i].size > 0) iov.push_back(iovec{const_cast<void*>(segments[i].data), segments[i].size});
  }
  return iov;
}

// Drops the first n bytes of iov (whole entries first, then part of one).
void advance_iov(std::vector<iovec>& iov, size_t& first, uint64_t n) {
  while (n > 0 && first < iov.size() && n >= iov[first].iov_len) n -= iov[first++].iov_len;
  if (n > 0) {
    iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + n;
    iov[first].iov_len -= static_cast<size_t>(n);
  }
}

}  // namespace

void TcpTransport::send_blocking(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                                 size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  // Pick a free socket of the connection, else wait for the next in turn.
  const size_t n = conn->sockets.size();
  const uint32_t start = conn->next_socket.fetch_add(1, std::memory_order_relaxed);
  Socket* socket = nullptr;
  std::unique_lock<std::timed_mutex> lock;
  for (size_t i = 0; i < n && socket == nullptr; ++i) {
    Socket* s = conn->sockets[(start + i) % n].get();
    lock = std::unique_lock<std::timed_mutex>(s->send_mu, std::try_to_lock);
    if (lock.owns_lock()) socket = s;
  }
  if (socket == nullptr) {
    socket = conn->sockets[start % n].get();
    lock = std::unique_lock<std::timed_mutex>(socket->send_mu, deadline);
    FASTPS_CHECK_TYPED(TimeoutError, lock.owns_lock(), "fastps: timed out after ", options().timeout.count(),
                       " ms waiting to send to ", conn->peer, " (earlier frames are still being written)");
  }

  // A heartbeat the loop could not write whole goes first (Note [Liveness]).
  std::vector<iovec> iov;
  uint64_t queued = 0;
  for (const OutBytes& q : socket->queue) {
    iov.push_back(iovec{q.data.get() + q.off, q.size - q.off});
    queued += q.size - q.off;
  }
  for (const iovec& v : frame_iov(header, segments, nsegments)) iov.push_back(v);

  const uint64_t total = queued + kHeaderSize + payload_len;
  uint64_t written = 0;
  size_t first = 0;
  while (first < iov.size()) {
    if (conn->closing.load(std::memory_order_acquire)) {
      throw ConnectionError(concat("fastps: connection to ", conn->peer, " was closed while sending (",
                                   written, " of ", total, " bytes written)"));
    }
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
    ssize_t r = ::sendmsg(socket->fd, &msg, MSG_NOSIGNAL);
    if (r > 0) {
      written += static_cast<uint64_t>(r);
      advance_iov(iov, first, static_cast<uint64_t>(r));
      socket->last_send.store(now_ns(), std::memory_order_relaxed);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (Clock::now() < deadline) {
        pollfd p{socket->fd, POLLOUT, 0};
        ::poll(&p, 1, poll_ms(deadline));  // errors and hangups surface in sendmsg
        continue;
      }
      std::string what = concat("fastps: timed out after ", options().timeout.count(), " ms sending to ",
                                conn->peer, " (", written, " of ", total,
                                " bytes written; is the peer alive and reading?)");
      if (written > 0) {
        request_close(conn, "a send timed out in the middle of a frame");
        what += "; the connection was closed";
      }
      throw TimeoutError(what);
    }
    int err = r < 0 ? errno : EPIPE;
    request_close(conn, concat("send failed: ", errno_text(err)));
    throw ConnectionError(concat("fastps: connection to ", conn->peer, " lost while sending: ",
                                 errno_text(err)));
  }
  if (queued > 0) {
    socket->queue.clear();
    conn->queued.fetch_sub(queued, std::memory_order_relaxed);
    note_unqueued(queued);
  }
}

// Note [Send queues]: the accepted side. Writes what the socket takes within
// kSendGrace and queues the rest; the loop thread writes the queue out.
void TcpTransport::post(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                        size_t nsegments, uint64_t payload_len) {
  const size_t n = conn->sockets.size();
  const uint32_t start = conn->next_socket.fetch_add(1, std::memory_order_relaxed);
  Socket* socket = nullptr;
  std::unique_lock<std::timed_mutex> lock;
  for (size_t i = 0; i < n && socket == nullptr; ++i) {
    Socket* s = conn->sockets[(start + i) % n].get();
    lock = std::unique_lock<std::timed_mutex>(s->send_mu, std::try_to_lock);
    if (lock.owns_lock()) socket = s;
  }
  if (socket == nullptr) {  // every holder is another post(): milliseconds at most
    socket = conn->sockets[start % n].get();
    lock = std::unique_lock<std::timed_mutex>(socket->send_mu);
  }
  std::vector<iovec> iov = frame_iov(header, segments, nsegments);
  const uint64_t total = kHeaderSize + payload_len;
  uint64_t written = 0;
  // A peer that is taking bytes gets the queue and then this frame as it
  // reads, for up to kSendGrace: a burst of large replies to a live peer
  // stays zero-copy. A queue that has not moved lately belongs to a peer
  // that does not read: the frame joins it at once.
  const auto now = Clock::now();
  if (socket->queue.empty() || now_ns() - conn->queue_moved.load(std::memory_order_relaxed) < kQueueMovingNs) {
    const Clock::time_point grace = now + kSendGrace;
    if (!socket->queue.empty() && !flush_queue(conn, *socket, grace)) {
      throw ConnectionError(concat("fastps: connection to ", conn->peer, " lost while sending"));
    }
    if (socket->queue.empty()) written = write_now(conn, *socket, iov, total, grace);
  }
  if (written < total) enqueue(conn, socket, iov, 0, total - written);
}

// Writes queued bytes of `s` (send_mu held) until the queue is empty or,
// waiting for room, `grace` passes. False if the connection broke (it is
// then closing).
bool TcpTransport::flush_queue(const ConnPtr& conn, Socket& s, Clock::time_point grace) {
  while (!s.queue.empty()) {
    if (conn->closing.load(std::memory_order_acquire)) return false;
    iovec iov[64];
    size_t n = 0;
    for (auto it = s.queue.begin(); it != s.queue.end() && n < 64; ++it, ++n)
      iov[n] = iovec{it->data.get() + it->off, it->size - it->off};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    ssize_t r = ::sendmsg(s.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) {
      const int64_t t = now_ns();
      s.last_send.store(t, std::memory_order_relaxed);
      conn->queue_moved.store(t, std::memory_order_relaxed);
      conn->queued.fetch_sub(static_cast<uint64_t>(r), std::memory_order_relaxed);
      note_unqueued(static_cast<uint64_t>(r));
      size_t left = static_cast<size_t>(r);
      while (left > 0) {
        OutBytes& q = s.queue.front();
        const size_t take = std::min(left, q.size - q.off);
        q.off += take;
        left -= take;
        if (q.off == q.size) s.queue.pop_front();
      }
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (Clock::now() >= grace) return true;
      pollfd p{s.fd, POLLOUT, 0};
      ::poll(&p, 1, poll_ms(grace));
      continue;
    }
    request_close(conn, concat("send failed: ", errno_text(r < 0 ? errno : EPIPE)));
    return false;
  }
  return true;
}

// Writes iov (which it advances past what went out) without waiting for the
// peer beyond `grace`; returns the bytes written. send_mu is held.
uint64_t TcpTransport::write_now(const ConnPtr& conn, Socket& s, std::vector<iovec>& iov, uint64_t total,
                                 Clock::time_point grace) {
  uint64_t written = 0;
  size_t first = 0;
  while (first < iov.size()) {
    if (conn->closing.load(std::memory_order_acquire)) {
      throw ConnectionError(concat("fastps: connection to ", conn->peer, " was closed while sending (",
                                   written, " of ", total, " bytes written)"));
    }
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
    ssize_t r = ::sendmsg(s.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) {
      written += static_cast<uint64_t>(r);
      advance_iov(iov, first, static_cast<uint64_t>(r));
      s.last_send.store(now_ns(), std::memory_order_relaxed);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (Clock::now() >= grace) break;
      pollfd p{s.fd, POLLOUT, 0};
      ::poll(&p, 1, poll_ms(grace));
      continue;
    }
    int err = r < 0 ? errno : EPIPE;
    request_close(conn, concat("send failed: ", errno_text(err)));
    throw ConnectionError(concat("fastps: connection to ", conn->peer, " lost while sending: ",
                                 errno_text(err)));
  }
  iov.erase(iov.begin(), iov.begin() + static_cast<std::ptrdiff_t>(first));
  return written;
}

// Copies the `rest` bytes of iov that follow its first `skip` into the
// socket's queue (null: the shared-memory queue of the connection) and arms
// its writer. Closes the connection instead if its queue would pass the
// limit. The queue's lock is held.
void TcpTransport::enqueue(const ConnPtr& conn, Socket* socket, const std::vector<iovec>& iov, uint64_t skip,
                           uint64_t rest) {
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  const uint64_t limit = options().send_queue_limit;
  const uint64_t before = conn->queued.load(std::memory_order_relaxed);
  std::string why;
  if (before + rest > limit) {
    why = concat(" is not reading its replies: ", before + rest, " bytes would wait for it, more than the ",
                 limit, " a connection may hold (raise FASTPS_SEND_QUEUE_BYTES if it is only slow)");
  }
  OutBytes b;
  if (why.empty()) {
    b.data.reset(new (std::nothrow) uint8_t[rest]);
    if (!b.data) why = concat(": cannot allocate ", rest, " bytes to hold a reply it has not read yet");
  }
  if (!why.empty()) {
    const std::string reason = concat("peer ", conn->peer, conn->rank >= 0 ? concat(" (rank ", conn->rank, ")") : "", why);
    transport_log(concat("closing ", describe(*conn), ": ", reason));
    request_close(conn, reason);
    throw ConnectionError(concat("fastps: ", reason));
  }
  b.size = static_cast<size_t>(rest);
  size_t at = 0;
  for (const iovec& v : iov) {
    const uint8_t* p = static_cast<const uint8_t*>(v.iov_base);
    size_t len = v.iov_len;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    p += skip;
    len -= static_cast<size_t>(skip);
    skip = 0;
    len = std::min<size_t>(len, b.size - at);
    std::memcpy(b.data.get() + at, p, len);
    at += len;
  }
  FASTPS_ASSERT(at == b.size);
  if (before == 0) conn->queue_moved.store(now_ns(), std::memory_order_relaxed);
  conn->queued.fetch_add(rest, std::memory_order_relaxed);
  note_queued(rest, true);
  if (socket != nullptr) {
    socket->queue.push_back(std::move(b));
    set_want_out(*socket, true);
  } else {
    conn->shm_queue.push_back(std::move(b));
    conn->shm_queue_cv.notify_all();
  }
}

// Arms or disarms EPOLLOUT of a socket (any thread; see on_writable()).
void TcpTransport::set_want_out(Socket& s, bool on) {
  if (s.want_out.exchange(on, std::memory_order_acq_rel) == on && on) return;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u);
  ev.data.u64 = s.token;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, s.fd, &ev);  // ENOENT once torn down: nothing to do
}

void TcpTransport::do_close(ConnId id, const std::string& reason) {
  ConnPtr conn;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = conns_.find(id);
    if (it != conns_.end()) conn = it->second;
  }
  if (conn) request_close(conn, reason);
}

PeerInfo TcpTransport::do_peer_info(ConnId id) const {
  ConnPtr conn = find_established(id);
  FASTPS_CHECK_TYPED(ConnectionError, conn != nullptr, "fastps: unknown or closed connection ", id);
  PeerInfo info;
  info.address = conn->peer;
  info.rank = conn->rank;
  info.outgoing = conn->outgoing;
  info.shared_memory = conn->use_shm.load(std::memory_order_acquire);
  info.single_copy = info.shared_memory && conn->shm->can_read_peer() && conn->shm->peer_can_read_me();
  info.max_payload = conn->peer_max_payload;
  return info;
}

void TcpTransport::request_close(const ConnPtr& conn, const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(conn->reason_mu);
    if (conn->close_reason.empty()) conn->close_reason = reason;
  }
  if (conn->closing.exchange(true, std::memory_order_acq_rel)) return;
  // Fails blocked senders at once and tells the peer.
  for (auto& s : conn->sockets) ::shutdown(s->fd, SHUT_RDWR);
  wake_shm(*conn);
  {
    std::lock_guard<std::mutex> lock(mu_);
    close_queue_.push_back(conn);
  }
  uint64_t one = 1;
  ssize_t ignored = ::write(wake_fd_, &one, sizeof(one));
  (void)ignored;
}

TcpTransport::ConnPtr TcpTransport::find_established(ConnId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = conns_.find(id);
  if (it == conns_.end() || !it->second->established.load(std::memory_order_acquire)) return nullptr;
  return it->second;
}

TcpTransport::Entry TcpTransport::find_entry(uint64_t token) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sockets_.find(token);
  return it == sockets_.end() ? Entry{} : it->second;
}

std::string TcpTransport::describe(const Conn& conn) const {
  std::string s = concat("connection ", conn.id, " (", conn.outgoing ? "to " : "from ", conn.peer);
  if (conn.established.load(std::memory_order_acquire) && conn.rank >= 0) s += concat(", rank ", conn.rank);
  if (conn.use_shm.load(std::memory_order_acquire)) s += ", shared memory";
  return s + ")";
}

// --- Event loop ---------------------------------------------------------------

namespace {

// Note [Liveness]: a socket idle for this long carries a HEARTBEAT: a
// quarter of the window, and at most a second whatever the window (or with
// liveness off here), so that a peer with a shorter window hears us too.
std::chrono::milliseconds heartbeat_period(const TransportOptions& o) {
  const std::chrono::milliseconds most(1000);
  return o.liveness_timeout.count() == 0 ? most : std::min(most, o.liveness_timeout / 4);
}

// How often the loop looks at idle connections.
std::chrono::milliseconds tick_period(const TransportOptions& o) {
  return std::max(std::chrono::milliseconds(10), heartbeat_period(o) / 2);
}

}  // namespace

void TcpTransport::run_loop() {
  epoll_event events[kMaxEvents];
  next_tick_ = Clock::now() + tick_period(options());
  while (!stopping_.load(std::memory_order_acquire)) {
    long long timeout = ms_left(next_tick_);
    if (!pending_.empty() || accept_paused_) timeout = std::min<long long>(timeout, kTickMs);
    if (!retry_out_.empty()) timeout = std::min<long long>(timeout, kRetryMs);
    int n = epoll_wait(epoll_fd_, events, kMaxEvents, static_cast<int>(timeout));
    if (n < 0) {
      if (errno == EINTR) continue;
      transport_log(concat("epoll_wait failed: ", errno_text(errno), "; the transport stops serving"));
      return;
    }
    for (int i = 0; i < n && !stopping_.load(std::memory_order_acquire); ++i) {
      uint64_t token = events[i].data.u64;
      if (token == kWakeToken) {
        uint64_t count;
        ssize_t ignored = ::read(wake_fd_, &count, sizeof(count));
        (void)ignored;
        drain_close_queue();
      } else if (token == kListenToken) {
        accept_ready();
      } else {
        Entry e = find_entry(token);
        if (!e.socket) continue;
        if (events[i].events & EPOLLOUT) on_writable(e);
        if (events[i].events & ~static_cast<uint32_t>(EPOLLOUT)) on_readable(e);
      }
    }
    if (!retry_out_.empty()) {
      std::vector<Entry> retry;
      retry.swap(retry_out_);
      for (const Entry& e : retry)
        if (!e.conn->torn_down.load(std::memory_order_acquire)) on_writable(e);
    }
    if (Clock::now() >= next_tick_) {
      tick();
      next_tick_ = Clock::now() + tick_period(options());
    }
    expire_handshakes();
    if (accept_paused_ && Clock::now() >= accept_resume_at_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (listen_fd_ >= 0) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = kListenToken;
        epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, listen_fd_, &ev);
      }
      accept_paused_ = false;
    }
  }
}

void TcpTransport::drain_close_queue() {
  std::vector<ConnPtr> queue;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue.swap(close_queue_);
  }
  for (auto& conn : queue) teardown(conn, "closed");
}

void TcpTransport::expire_handshakes() {
  if (pending_.empty()) return;
  const Clock::time_point now = Clock::now();
  std::vector<ConnPtr> still;
  for (auto& conn : pending_) {
    if (conn->torn_down.load() || conn->established.load()) continue;
    if (now < conn->handshake_deadline) {
      still.push_back(conn);
      continue;
    }
    std::string reason = concat("handshake not completed within ", seconds_text(options().handshake_timeout));
    transport_log(concat("closing ", describe(*conn), ": ", reason));
    teardown(conn, reason);
  }
  pending_.swap(still);
}

void TcpTransport::on_readable(const Entry& e) {
  Socket& s = *e.socket;
  size_t budget = kReadBudget;
  while (budget > 0 && !e.conn->torn_down.load(std::memory_order_relaxed)) {
    const bool direct = s.in_payload && s.frame.header.payload_len - s.payload_got >= kStageSize;
    ssize_t r;
    if (direct) {
      size_t want = std::min<uint64_t>(s.frame.header.payload_len - s.payload_got, budget);
      r = ::recv(s.fd, s.payload_at + s.payload_got, want, 0);
    } else {
      r = ::recv(s.fd, stage_.get(), kStageSize, 0);
    }
    if (r > 0) {
      s.last_recv.store(now_ns(), std::memory_order_relaxed);
      budget -= std::min<size_t>(static_cast<size_t>(r), budget);
      if (direct) {
        s.payload_got += static_cast<size_t>(r);
        if (!finish_frame_if_complete(e)) return;
      } else if (!consume(e, stage_.get(), static_cast<size_t>(r))) {
        return;
      }
      continue;
    }
    if (r == 0) {
      on_eof(e);
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    std::string reason = concat("connection error: ", errno_text(errno));
    if (!e.conn->closing.load()) transport_log(concat("closing ", describe(*e.conn), ": ", reason));
    teardown(e.conn, reason);
    return;
  }
}

// Note [Send queues]: EPOLLOUT on a socket with a queue; writes what the peer
// takes now. Never waits: a socket whose send mutex is busy is retried on the
// next millisecond tick (with EPOLLOUT off meanwhile, or the loop would spin).
void TcpTransport::on_writable(const Entry& e) {
  Socket& s = *e.socket;
  Conn& conn = *e.conn;
  std::unique_lock<std::timed_mutex> lock(s.send_mu, std::try_to_lock);
  if (!lock.owns_lock()) {
    s.want_out.store(false, std::memory_order_release);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = s.token;
    epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, s.fd, &ev);
    // A blocking sender (a connection this side opened) writes the queue
    // first itself; a post() leaves it to this thread.
    if (!conn.outgoing) retry_out_.push_back(e);
    return;
  }
  if (!flush_queue(e.conn, s, Clock::now())) return;
  const bool more = !s.queue.empty() && !conn.closing.load(std::memory_order_acquire);
  s.want_out.store(more, std::memory_order_release);
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (more ? EPOLLOUT : 0u);
  ev.data.u64 = s.token;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, s.fd, &ev);
}

// Note [Liveness] and Note [Send queues], every tick_period(): heartbeats on
// idle sockets; connections whose peer went silent, or stopped reading, close.
void TcpTransport::tick() {
  std::vector<ConnPtr> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.reserve(conns_.size());
    for (auto& kv : conns_) conns.push_back(kv.second);
  }
  const auto window = options().liveness_timeout;
  const int64_t now = now_ns();
  const int64_t window_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(window).count();
  const int64_t beat_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(heartbeat_period(options())).count();
  const auto stall = window.count() > 0 ? window : options().timeout;
  const int64_t stall_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(stall).count();
  for (const ConnPtr& conn : conns) {
    if (!conn->established.load(std::memory_order_acquire) || conn->closing.load(std::memory_order_acquire))
      continue;
    const std::string rank = conn->rank >= 0 ? concat(" (rank ", conn->rank, ")") : std::string();
    const uint64_t queued = conn->queued.load(std::memory_order_relaxed);
    if (queued > 0 && now - conn->queue_moved.load(std::memory_order_relaxed) >= stall_ns) {
      std::string reason = concat(conn->outgoing ? "server " : "peer ", conn->peer, rank,
                                  conn->outgoing ? " is not reading: " : " is not reading its replies: ", queued,
                                  " bytes have waited for it for ", seconds_text(std::chrono::duration_cast<std::chrono::milliseconds>(stall)),
                                  " without any being taken (",
                                  window.count() > 0 ? "FASTPS_LIVENESS_TIMEOUT" : "FASTPS_TIMEOUT", " sets how long)");
      transport_log(concat("closing ", describe(*conn), ": ", reason));
      request_close(conn, reason);
      continue;
    }
    bool silent = false;
    for (const SocketPtr& sp : conn->sockets) {
      Socket& s = *sp;
      if (window_ns > 0 && now - s.last_recv.load(std::memory_order_relaxed) >= window_ns) {
        // After this process itself was stopped, the peers' heartbeats wait
        // unread: not the peer's silence.
        int unread = 0;
        if (::ioctl(s.fd, FIONREAD, &unread) == 0 && unread > 0) continue;
        silent = true;
        break;
      }
      if (now - s.last_send.load(std::memory_order_relaxed) < beat_ns) continue;
      std::unique_lock<std::timed_mutex> lock(s.send_mu, std::try_to_lock);
      if (!lock.owns_lock() || !s.queue.empty()) continue;  // a frame is going out, or waits
      MessageHeader h;
      h.op = Op::kHeartbeat;
      uint8_t hb[kHeaderSize];
      encode_header(h, hb);
      std::vector<iovec> iov{iovec{hb, kHeaderSize}};
      try {
        const uint64_t written = write_now(conn, s, iov, kHeaderSize, Clock::now());
        if (written < kHeaderSize) enqueue(conn, &s, iov, 0, kHeaderSize - written);
        s.last_send.store(now, std::memory_order_relaxed);
      } catch (const Error&) {
        break;  // the connection is closing
      }
    }
    if (silent) {
      const std::string who = concat(conn->outgoing ? "server " : "peer ", conn->peer, rank);
      std::string reason = concat(who, " sent nothing for ", seconds_text(window),
                                  " (not even a heartbeat): it is frozen (stopped, in a debugger), hung, or cut off "
                                  "by the network; raise FASTPS_LIVENESS_TIMEOUT (now ",
                                  seconds_text(window), ") if its host can stall that long");
      Entry e{conn->sockets.front(), conn};
      fail(e, Status::kTimeout, reason);
    }
  }
}

void TcpTransport::on_eof(const Entry& e) {
  const Socket& s = *e.socket;
  Conn& conn = *e.conn;
  std::string reason;
  if (s.in_payload || s.header_got > 0) {
    uint64_t got = s.in_payload ? kHeaderSize + s.payload_got : s.header_got;
    uint64_t want = s.in_payload ? kHeaderSize + s.frame.header.payload_len : kHeaderSize;
    reason = concat("peer closed the connection in the middle of a frame (truncated frame: ", got,
                    " of ", want, " bytes)");
  } else if (!conn.established.load()) {
    reason = "peer closed the connection during the handshake";
  } else {
    reason = "peer closed the connection";
  }
  // A clean close at a frame boundary is routine; everything else is logged.
  if (!conn.closing.load() && reason != "peer closed the connection") {
    transport_log(concat("closing ", describe(conn), ": ", reason));
  }
  teardown(e.conn, reason);
}

bool TcpTransport::consume(const Entry& e, const uint8_t* data, size_t len) {
  Socket& s = *e.socket;
  while (len > 0) {
    size_t take;
    if (!s.in_payload) {
      take = std::min(kHeaderSize - s.header_got, len);
      std::memcpy(s.header_bytes + s.header_got, data, take);
      s.header_got += take;
      if (s.header_got == kHeaderSize && !start_payload(e)) return false;
    } else {
      take = std::min<uint64_t>(s.frame.header.payload_len - s.payload_got, len);
      std::memcpy(s.payload_at + s.payload_got, data, take);
      s.payload_got += take;
    }
    data += take;
    len -= take;
    if (!finish_frame_if_complete(e)) return false;
  }
  return true;
}

// A whole header is in s.header_bytes: check it against the limits of the
// socket's phase, then allocate the payload. See docs/protocol.md "Limits".
bool TcpTransport::start_payload(const Entry& e) {
  Socket& s = *e.socket;
  MessageHeader h = decode_header(s.header_bytes);
  s.header_got = 0;
  std::string problem;
  Status status = Status::kProtocol;
  if (s.phase == Socket::Phase::kEstablished) {
    problem = header_problem(h, options().max_payload);
    if (!problem.empty() && h.magic == kProtocolMagic &&
        (h.payload_len > options().max_payload || h.count > max_count_for(options().max_payload))) {
      status = Status::kLimit;
    }
  } else {
    Op expected = s.phase == Socket::Phase::kAwaitHello ? Op::kHello : Op::kAuth;
    if (h.magic != kProtocolMagic) {
      problem = header_problem(h, 0);
    } else if (h.payload_len > kMaxHandshakePayload) {
      problem = concat("a ", h.payload_len, "-byte frame before authentication (limit ",
                       kMaxHandshakePayload, ")");
    } else if (h.op != expected) {
      problem = concat("expected ", op_name(expected), ", got ", op_name(h.op), " during the handshake");
    }
  }
  if (!problem.empty()) {
    fail(e, status, problem);
    return false;
  }
  try {
    s.frame.header = h;
    uint8_t* target = nullptr;
    if (s.phase == Socket::Phase::kEstablished && h.payload_len > 0 && !is_transport_op(h.op))
      target = payload_target(e.conn->id, h);
    if (target != nullptr) {
      s.frame.in_place = target;
      s.payload_at = target;
    } else {
      s.frame.payload = Payload(h.payload_len);
      s.payload_at = s.frame.payload.data();
    }
  } catch (const std::bad_alloc&) {
    fail(e, Status::kLimit, concat("cannot allocate a ", h.payload_len, "-byte payload"));
    return false;
  }
  s.in_payload = true;
  s.payload_got = 0;
  return true;
}

bool TcpTransport::finish_frame_if_complete(const Entry& e) {
  Socket& s = *e.socket;
  if (!s.in_payload || s.payload_got < s.frame.header.payload_len) return true;
  s.in_payload = false;
  s.payload_got = 0;
  s.payload_at = nullptr;
  Message frame = std::move(s.frame);
  s.frame = Message();
  return on_frame(e, std::move(frame));
}

bool TcpTransport::on_frame(const Entry& e, Message&& frame) {
  Conn& conn = *e.conn;
  switch (e.socket->phase) {
    case Socket::Phase::kAwaitHello:
      return on_hello(e, std::move(frame));
    case Socket::Phase::kAwaitAuth:
      return on_auth(e, std::move(frame));
    case Socket::Phase::kEstablished:
      break;
  }
  if (conn.closing.load(std::memory_order_acquire)) {
    teardown(e.conn, "closed");
    return false;
  }
  if (is_transport_op(frame.header.op)) return on_transport_op(e, std::move(frame));
  if (!deliver(conn.id, std::move(frame))) {
    request_close(e.conn, "the message handler threw");
    teardown(e.conn, "the message handler threw");
    return false;
  }
  if (conn.closing.load(std::memory_order_acquire)) {  // the handler closed it
    teardown(e.conn, "closed");
    return false;
  }
  return true;
}

bool TcpTransport::on_hello(const Entry& e, Message&& frame) {
  Socket& s = *e.socket;
  Conn& conn = *e.conn;
  const MessageHeader& h = frame.header;
  if (h.version != kProtocolVersion) {
    fail(e, Status::kVersion,
         concat("protocol version mismatch: the client speaks fastps protocol version ", h.version,
                ", this server speaks version ", kProtocolVersion,
                " (install the same fastps release on every host)"));
    return false;
  }
  Hello hello;
  try {
    hello = decode_hello(frame.payload.data(), frame.payload.size());
  } catch (const ProtocolError& ex) {
    fail(e, Status::kProtocol, ex.what());
    return false;
  }
  if (hello.version != kProtocolVersion) {
    fail(e, Status::kVersion,
         concat("protocol version mismatch: the client's HELLO says version ", hello.version,
                ", this server speaks version ", kProtocolVersion));
    return false;
  }
  if (hello.max_payload < kMinMaxPayload) {
    fail(e, Status::kProtocol, concat("client announced a max payload of ", hello.max_payload,
                                      " bytes (at least ", kMinMaxPayload, " required)"));
    return false;
  }
  conn.rank = hello.rank;
  conn.peer_max_payload = std::min<uint64_t>(hello.max_payload, kMaxMaxPayload);
  uint8_t challenge[kChallengeSize];
  try {
    fill_random(s.server_nonce, kNonceSize);
  } catch (const std::exception& ex) {
    fail(e, Status::kInternal, ex.what());
    return false;
  }
  std::memcpy(challenge, s.server_nonce, kNonceSize);
  store_le64(challenge + kNonceSize, options().max_payload);
  MessageHeader reply;
  reply.op = Op::kChallenge;
  if (!send_small_frame(s.fd, reply, challenge, sizeof(challenge))) {
    std::string reason = concat("could not send CHALLENGE: ", errno_text(errno));
    transport_log(concat("closing ", describe(conn), ": ", reason));
    teardown(e.conn, reason);
    return false;
  }
  s.phase = Socket::Phase::kAwaitAuth;
  return true;
}

bool TcpTransport::on_auth(const Entry& e, Message&& frame) {
  Socket& s = *e.socket;
  Conn& conn = *e.conn;
  if (frame.header.version != kProtocolVersion || frame.payload.size() != kAuthSize) {
    fail(e, Status::kProtocol, concat("malformed AUTH frame (version ", frame.header.version, ", ",
                                      frame.payload.size(), " bytes)"));
    return false;
  }
  const uint8_t* client_mac = frame.payload.data();
  const uint8_t* client_nonce = frame.payload.data() + kSha256DigestSize;
  Sha256Digest expected = auth_client_proof(options().secret, s.server_nonce, client_nonce);
  if (!constant_time_equal(expected.data(), client_mac, kSha256DigestSize)) {
    fail(e, Status::kAuth,
         "authentication failed: the client's secret does not match this server's (every process of "
         "a job must use the same secret)");
    return false;
  }
  Sha256Digest proof = auth_server_proof(options().secret, s.server_nonce, client_nonce);
  MessageHeader reply;
  reply.op = Op::kAuthOk;
  if (!send_small_frame(s.fd, reply, proof.data(), proof.size())) {
    std::string reason = concat("could not send AUTH_OK: ", errno_text(errno));
    transport_log(concat("closing ", describe(conn), ": ", reason));
    teardown(e.conn, reason);
    return false;
  }
  s.phase = Socket::Phase::kEstablished;
  s.last_send.store(now_ns(), std::memory_order_relaxed);
  s.last_recv.store(now_ns(), std::memory_order_relaxed);
  conn.established.store(true, std::memory_order_release);
  return true;
}

// Logs, tells the peer why with a last ERROR frame when the socket can take
// it without blocking, and tears the connection down.
void TcpTransport::fail(const Entry& e, Status status, const std::string& reason) {
  Conn& conn = *e.conn;
  if (!conn.closing.load(std::memory_order_acquire)) {
    transport_log(concat("closing ", describe(conn), ": ", reason));
    // A ring's parse state has no descriptor: the last word goes on the socket.
    Socket& socket = e.socket->fd >= 0 ? *e.socket : *conn.sockets.front();
    std::unique_lock<std::timed_mutex> lock(socket.send_mu, std::try_to_lock);
    if (lock.owns_lock() && socket.queue.empty()) {  // else it would split a frame
      std::string text = truncate_utf8(reason, kMaxErrorMessage);
      MessageHeader h;
      h.op = Op::kError;
      h.status = static_cast<uint32_t>(status);
      send_small_frame(socket.fd, h, reinterpret_cast<const uint8_t*>(text.data()), text.size());
    }
  }
  teardown(e.conn, reason);
}

void TcpTransport::teardown(const ConnPtr& conn, const std::string& reason) {
  if (conn->torn_down.exchange(true, std::memory_order_acq_rel)) return;
  conn->closing.store(true, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns_.erase(conn->id);
    for (auto& s : conn->sockets) sockets_.erase(s->token);
  }
  for (auto& s : conn->sockets) {
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, s->fd, nullptr);
    ::shutdown(s->fd, SHUT_RDWR);
  }
  // The ring's reader delivers nothing after this: the disconnect handler
  // runs after the connection's last frame (unless the reader itself is
  // here, on a protocol error, in which case it delivers nothing more).
  wake_shm(*conn);
  {
    // The queue's writer sleeps on this condition under shm_send_mu (in
    // 100 ms slices: a sender holding the lock right now must not hold this up).
    std::unique_lock<std::timed_mutex> lock(conn->shm_send_mu, std::try_to_lock);
    conn->shm_queue_cv.notify_all();
  }
  // Join this connection's reader and writer, and readers that tore their
  // own connections down earlier (they cannot join themselves; they have
  // returned, or are about to, once their teardown finished).
  std::vector<std::thread> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = readers_.find(conn->id);
    if (it != readers_.end()) {
      if (it->second.writer.joinable()) done.push_back(std::move(it->second.writer));
      if (it->second.thread.get_id() == std::this_thread::get_id())
        retired_readers_.push_back(std::move(it->second));
      else
        done.push_back(std::move(it->second.thread));
      readers_.erase(it);
    }
    // Only those that have returned: one still in its teardown (say, in a
    // disconnect handler) must not hold this thread up.
    for (auto r = retired_readers_.begin(); r != retired_readers_.end();) {
      if (!r->finished->load(std::memory_order_acquire)) {
        ++r;
        continue;
      }
      done.push_back(std::move(r->thread));
      r = retired_readers_.erase(r);
    }
  }
  for (std::thread& t : done) t.join();
  std::string why;
  {
    std::lock_guard<std::mutex> lock(conn->reason_mu);
    why = conn->close_reason.empty() ? reason : conn->close_reason;
  }
  if (conn->established.load(std::memory_order_acquire) && !stopping_.load(std::memory_order_acquire)) {
    notify_disconnect(conn->id, why);
  }
}

}  // namespace fastps

namespace fastps {

// --- Shared memory ----------------------------------------------------------------

// Server side of docs/protocol.md "Shared memory" (loop thread).
bool TcpTransport::on_transport_op(const Entry& e, Message&& frame) {
  Conn& conn = *e.conn;
  const MessageHeader& h = frame.header;
  if (h.op == Op::kHeartbeat && h.payload_len == 0) return true;  // Note [Liveness]: it arrived; that is all
  if (h.op != Op::kShmOffer || conn.outgoing || conn.use_shm.load(std::memory_order_acquire) ||
      e.socket->fd < 0) {
    fail(e, Status::kProtocol, concat("unexpected ", op_name(h.op), " frame"));
    return false;
  }
  const Payload& p = frame.payload;
  if (p.size() <= kShmOfferFixedSize || p.size() > kShmOfferFixedSize + kShmMaxNameSize) {
    fail(e, Status::kProtocol, concat("malformed SHM_OFFER (", p.size(), " bytes)"));
    return false;
  }
  std::string why;
  std::unique_ptr<ShmSegment> seg;
  if (options().shm == ShmMode::kOff) {
    why = "this server uses TCP only (its FASTPS_TRANSPORT is tcp)";
  } else {
    std::string name(reinterpret_cast<const char*>(p.data() + kShmOfferFixedSize), p.size() - kShmOfferFixedSize);
    seg = ShmSegment::open(name, p.data() + 8, load_le64(p.data()), &why);
  }
  MessageHeader reply;
  bool sent;
  if (seg) {
    conn.shm = std::move(seg);
    conn.shm_rx = std::make_shared<Socket>(-1);
    conn.use_shm.store(true, std::memory_order_release);
    reply.op = Op::kShmAccept;
    sent = send_small_frame(e.socket->fd, reply, nullptr, 0);
  } else {
    reply.op = Op::kShmDecline;
    std::string text = truncate_utf8(why, kMaxErrorMessage);
    sent = send_small_frame(e.socket->fd, reply, reinterpret_cast<const uint8_t*>(text.data()), text.size());
  }
  if (!sent) {
    std::string reason = concat("could not answer SHM_OFFER: ", errno_text(errno));
    transport_log(concat("closing ", describe(conn), ": ", reason));
    teardown(e.conn, reason);
    return false;
  }
  if (conn.use_shm.load(std::memory_order_relaxed)) start_shm_reader(e.conn);
  return true;
}

void TcpTransport::start_shm_reader(const ConnPtr& conn) {
  Entry e{conn->shm_rx, conn};
  std::lock_guard<std::mutex> lock(mu_);
  auto finished = std::make_shared<std::atomic<bool>>(false);
  Reader r{std::thread([this, e, finished] {
             shm_reader(e);
             finished->store(true, std::memory_order_release);
           }),
           finished, std::thread()};
  // Note [Send queues]: replies the ring cannot take at once are written by
  // a thread of this connection's own.
  if (!conn->outgoing) r.writer = std::thread([this, conn] { shm_writer(conn); });
  readers_[conn->id] = std::move(r);
}

// The reader thread of one shared-memory connection: the counterpart of
// on_readable() for sockets. It takes each header out of the ring itself (a
// by-reference frame is copied straight from the sender, Note [Single copy]),
// then feeds the payload bytes to the socket parser (start_payload(),
// consume()) so a payload is copied once from the ring to its destination.
void TcpTransport::shm_reader(const Entry& e) {
  Conn& conn = *e.conn;
  Socket& s = *e.socket;
  ShmRing& rx = conn.shm->rx();
  while (!conn.closing.load(std::memory_order_acquire) && !stopping_.load(std::memory_order_acquire)) {
    const uint8_t* data = nullptr;
    size_t n = rx.readable(&data);
    if (n == 0) {
      rx.wait_readable(conn.closing, kShmReaderSlice);
      continue;
    }
    if (s.in_payload) {
      // Only this frame's bytes: the next header is taken above, not by consume().
      n = static_cast<size_t>(std::min<uint64_t>({n, kShmReadPiece, s.frame.header.payload_len - s.payload_got}));
      const bool ok = consume(e, data, n);
      rx.consume(n);
      if (!ok) return;
      continue;
    }
    const size_t take = std::min(n, kHeaderSize - s.header_got);
    std::memcpy(s.header_bytes + s.header_got, data, take);
    rx.consume(take);
    s.header_got += take;
    if (s.header_got < kHeaderSize) continue;
    if (load_le32(s.header_bytes + kHeaderReservedOffset) == kRingByRef) {
      s.header_got = 0;
      if (!shm_take_byref(e)) return;
      continue;
    }
    if (!start_payload(e) || !finish_frame_if_complete(e)) return;
  }
}

// A by-reference frame's header is in s.header_bytes: read its descriptor,
// copy the payload out of the sender, tell the sender, deliver.
bool TcpTransport::shm_take_byref(const Entry& e) {
  Conn& conn = *e.conn;
  Socket& s = *e.socket;
  ShmRing& rx = conn.shm->rx();
  MessageHeader h = decode_header(s.header_bytes);
  uint8_t count[8];
  if (!rx.read_exact(count, sizeof(count), conn.closing)) return false;
  const uint32_t nseg = load_le32(count);
  // On a malformed frame the connection closes without acknowledging it:
  // the sender learns from the close, never from a false "copied".
  if (!conn.shm->can_read_peer() || nseg == 0 || nseg > kByRefMaxSegments) {
    fail(e, Status::kProtocol, concat("by-reference frame with ", nseg, " segments (limit ", kByRefMaxSegments,
                                      ")", conn.shm->can_read_peer() ? "" : " but this side cannot read the peer"));
    return false;
  }
  uint8_t desc[kByRefMaxSegments * 16];
  if (!rx.read_exact(desc, nseg * 16, conn.closing)) return false;
  iovec remote[kByRefMaxSegments];
  uint64_t total = 0;
  for (uint32_t i = 0; i < nseg; ++i) {
    remote[i].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(load_le64(desc + 16 * i)));
    remote[i].iov_len = static_cast<size_t>(load_le64(desc + 16 * i + 8));
    total += remote[i].iov_len;
  }
  h.reserved = 0;
  std::string problem = header_problem(h, options().max_payload);
  if (problem.empty() && total != h.payload_len)
    problem = concat("by-reference frame describes ", total, " bytes but announces ", h.payload_len);
  if (!problem.empty()) {
    fail(e, Status::kProtocol, problem);
    return false;
  }
  const ShmRing::Claim claim = rx.claim_byref();
  if (claim == ShmRing::Claim::kRevoked) {
    // Note [Send queues]: the sender did not wait for us; the payload follows
    // in the ring as plain bytes, parsed like any frame's.
    encode_header(h, s.header_bytes);
    return start_payload(e) && finish_frame_if_complete(e);
  }
  if (claim == ShmRing::Claim::kBroken) {
    fail(e, Status::kProtocol, "by-reference frames out of step with the peer's");
    return false;
  }
  Message frame;
  frame.header = h;
  std::string why;
  bool copied;
  try {
    uint8_t* dst = is_transport_op(h.op) ? nullptr : payload_target(conn.id, h);
    if (dst != nullptr) {
      frame.in_place = dst;
    } else {
      frame.payload = Payload(h.payload_len);
      dst = frame.payload.data();
    }
    copied = conn.shm->read_from_peer(dst, remote, nseg, total, &why);
  } catch (const std::bad_alloc&) {
    copied = false;
    why = concat("cannot allocate a ", h.payload_len, "-byte payload");
  }
  rx.byref_copied();  // the sender's buffers are free again, whatever happened
  if (!copied) {
    fail(e, Status::kInternal, why);
    return false;
  }
  return on_frame(e, std::move(frame));
}

void TcpTransport::shm_send(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                            size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  std::unique_lock<std::timed_mutex> lock(conn->shm_send_mu, std::try_to_lock);
  if (!lock.owns_lock()) lock = std::unique_lock<std::timed_mutex>(conn->shm_send_mu, deadline);
  FASTPS_CHECK_TYPED(TimeoutError, lock.owns_lock(), "fastps: timed out after ", options().timeout.count(),
                     " ms waiting to send to ", conn->peer, " (earlier frames are still being written)");
  ShmRing& tx = conn->shm->tx();
  uint64_t written = 0;
  size_t used = 0;
  for (size_t i = 0; i < nsegments; ++i) used += segments[i].size > 0;
  bool ok;
  uint64_t seq = 0;
  if (payload_len >= kByRefMinPayload && used <= kByRefMaxSegments && conn->shm->peer_can_read_me()) {
    // Note [Single copy]: the header, marked, and where the bytes are.
    uint8_t desc[kHeaderSize + 8 + kByRefMaxSegments * 16];
    std::memcpy(desc, header, kHeaderSize);
    store_le32(desc + kHeaderReservedOffset, kRingByRef);
    store_le32(desc + kHeaderSize, static_cast<uint32_t>(used));
    store_le32(desc + kHeaderSize + 4, 0);
    size_t at = kHeaderSize + 8;
    for (size_t i = 0; i < nsegments; ++i) {
      if (segments[i].size == 0) continue;
      store_le64(desc + at, reinterpret_cast<uintptr_t>(segments[i].data));
      store_le64(desc + at + 8, segments[i].size);
      at += 16;
    }
    ok = tx.write(desc, at, conn->closing, deadline, &written);
    if (ok) {
      // Numbered once its descriptor is in the ring (a descriptor that never
      // got in is not a frame the reader will count).
      seq = tx.next_byref_seq();
      tx.flush();
      // The reader copies from our buffers: they must outlive this wait.
      if (tx.wait_byref(seq, conn->closing, deadline)) return;
      // Giving up is only allowed before the reader claims the frame (the
      // payload would then have to follow as plain bytes: the connection
      // closes instead); once it copies, wait for it to finish (milliseconds
      // for a live peer), however the connection is doing, so that no torn
      // copy is ever delivered.
      if (!tx.revoke_byref(seq)) {
        const std::atomic<bool> never{false};
        const auto limit = Clock::now() + std::min<Clock::duration>(options().timeout, std::chrono::seconds(5));
        if (tx.wait_byref(seq, never, limit) && !conn->closing.load(std::memory_order_acquire)) return;
      }
      written = 1;  // the frame is half sent either way: the connection must close
    }
  } else {
    ok = tx.write(header, kHeaderSize, conn->closing, deadline, &written);
    for (size_t i = 0; ok && i < nsegments; ++i) {
      if (segments[i].size > 0) ok = tx.write(segments[i].data, segments[i].size, conn->closing, deadline, &written);
    }
    if (ok) {
      tx.flush();
      return;
    }
  }
  const uint64_t total = kHeaderSize + payload_len;
  if (conn->closing.load(std::memory_order_acquire)) {
    throw ConnectionError(concat("fastps: connection to ", conn->peer, " was closed while sending (",
                                 seq ? std::string("by reference") : concat(written, " of ", total, " bytes written"),
                                 ")"));
  }
  std::string what = concat("fastps: timed out after ", options().timeout.count(), " ms sending to ",
                            conn->peer, " over shared memory (", seq ? "the peer did not copy the payload"
                            : concat(written, " of ", total, " bytes written"), "; is the peer alive and reading?)");
  if (written > 0) {
    request_close(conn, "a send timed out in the middle of a frame");
    what += "; the connection was closed";
  }
  throw TimeoutError(what);
}

// Note [Send queues], the accepted side of a shared-memory connection: what
// the ring takes within kSendGrace goes in; a by-reference frame waits at most
// kByRefGrace for its reader, then is revoked; the rest waits in the queue.
void TcpTransport::shm_post(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                            size_t nsegments, uint64_t payload_len) {
  std::unique_lock<std::timed_mutex> lock(conn->shm_send_mu);  // held by bounded senders only
  ShmRing& tx = conn->shm->tx();
  std::vector<iovec> iov = frame_iov(header, segments, nsegments);
  const uint64_t total = kHeaderSize + payload_len;
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  if (!conn->shm_queue.empty()) {
    enqueue(conn, nullptr, iov, 0, total);
    return;
  }
  const Clock::time_point grace = Clock::now() + kSendGrace;
  if (payload_len >= kByRefMinPayload && iov.size() - 1 <= kByRefMaxSegments && conn->shm->peer_can_read_me()) {
    // Note [Single copy]: the header, marked, and where the bytes are.
    uint8_t desc[kHeaderSize + 8 + kByRefMaxSegments * 16];
    std::memcpy(desc, header, kHeaderSize);
    store_le32(desc + kHeaderReservedOffset, kRingByRef);
    store_le32(desc + kHeaderSize, static_cast<uint32_t>(iov.size() - 1));
    store_le32(desc + kHeaderSize + 4, 0);
    size_t at = kHeaderSize + 8;
    for (size_t i = 1; i < iov.size(); ++i) {
      store_le64(desc + at, reinterpret_cast<uintptr_t>(iov[i].iov_base));
      store_le64(desc + at + 8, iov[i].iov_len);
      at += 16;
    }
    if (tx.space() >= at || tx.wait_space(at, conn->closing, grace)) {
      const size_t put = tx.write_some(desc, at);  // it fits: this side is the only writer
      FASTPS_ASSERT(put == at);
      tx.flush();
      const uint64_t seq = tx.next_byref_seq();
      if (tx.wait_byref(seq, conn->closing, Clock::now() + kByRefGrace)) return;
      if (tx.revoke_byref(seq)) {
        // The reader has not started: our buffers are ours again, and a copy
        // of the payload follows the descriptor.
        iov.erase(iov.begin());
        enqueue(conn, nullptr, iov, 0, payload_len);
        return;
      }
      // Claimed: the reader is copying out of our buffers right now. Wait for
      // it (the time of one copy), or no torn copy could be ruled out.
      const std::atomic<bool> never{false};
      const bool copied = tx.wait_byref(seq, never, Clock::now() + kByRefCopyLimit);
      FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                         conn->peer, " was closed while sending");
      if (copied) return;
      const std::string reason = concat("peer ", conn->peer, " did not finish copying a ", payload_len,
                                        "-byte reply within ", seconds_text(kByRefCopyLimit), " (frozen?)");
      transport_log(concat("closing ", describe(*conn), ": ", reason));
      request_close(conn, reason);
      throw ConnectionError(concat("fastps: ", reason));
    }
    // Not even room for a descriptor: the frame goes as plain bytes.
  }
  uint64_t written = 0;
  size_t first = 0;
  while (first < iov.size()) {
    const size_t n = tx.write_some(iov[first].iov_base, iov[first].iov_len);
    written += n;
    advance_iov(iov, first, n);
    if (first == iov.size()) break;
    if (n > 0) continue;
    tx.flush();  // what is in, the reader may take, making room
    if (!tx.wait_space(1, conn->closing, grace)) break;
  }
  tx.flush();
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  if (written == total) return;
  iov.erase(iov.begin(), iov.begin() + static_cast<std::ptrdiff_t>(first));
  enqueue(conn, nullptr, iov, 0, total - written);
}

// Writes an accepted shared-memory connection's queue into its ring as the
// reader frees space: the only thread that waits for this peer to read.
void TcpTransport::shm_writer(const ConnPtr& conn) {
  ShmRing& tx = conn->shm->tx();
  std::unique_lock<std::timed_mutex> lock(conn->shm_send_mu);
  while (!conn->closing.load(std::memory_order_acquire) && !stopping_.load(std::memory_order_acquire)) {
    if (conn->shm_queue.empty()) {
      conn->shm_queue_cv.wait_for(lock, std::chrono::milliseconds(100));
      continue;
    }
    OutBytes& q = conn->shm_queue.front();
    const size_t n = tx.write_some(q.data.get() + q.off, q.size - q.off);
    tx.flush();
    if (n > 0) {
      q.off += n;
      if (q.off == q.size) conn->shm_queue.pop_front();
      conn->queue_moved.store(now_ns(), std::memory_order_relaxed);
      conn->queued.fetch_sub(n, std::memory_order_relaxed);
      note_unqueued(n);
      continue;
    }
    lock.unlock();  // senders queue behind us meanwhile, without waiting
    tx.wait_space(1, conn->closing, Clock::now() + std::chrono::milliseconds(50));
    lock.lock();
  }
}

void TcpTransport::wake_shm(const Conn& conn) {
  if (!conn.use_shm.load(std::memory_order_acquire)) return;
  conn.shm->rx().wake_all();
  conn.shm->tx().wake_all();
}

}  // namespace fastps
