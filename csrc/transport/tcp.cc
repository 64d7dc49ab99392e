// TcpTransport: setup, listening and accepting, connecting, sending and
// closing. The event loop is in tcp_loop.cc; the design notes in tcp.h.
#include "transport/tcp.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <limits.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>

#include "common/error.h"
#include "transport/socket.h"
#include "transport/tcp_conn.h"

namespace fastps {

using detail::concat;

namespace {

constexpr int kListenBacklog = 1024;
// A queue whose bytes moved this recently belongs to a peer that is reading.
constexpr int64_t kQueueMovingNs = 20'000'000;

}  // namespace

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

void TcpTransport::close_all() {
  if (loop_.joinable()) {
    stopping_.store(true, std::memory_order_release);
    uint64_t one = 1;
    ssize_t ignored = ::write(wake_fd_, &one, sizeof(one));
    (void)ignored;
    loop_.join();
  }
  std::unordered_map<ConnId, ConnPtr> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.swap(conns_);
    sockets_.clear();
    close_queue_.clear();
    if (listen_fd_ >= 0) ::close(listen_fd_);
    listen_fd_ = -1;
  }
  for (auto& kv : conns) {
    kv.second->closing.store(true, std::memory_order_release);
    for (auto& s : kv.second->sockets) ::shutdown(s->fd, SHUT_RDWR);
    wake_channel(*kv.second);
  }
  std::lock_guard<std::mutex> lock(mu_);
  closed_.insert(conns.begin(), conns.end());
}

TcpTransport::~TcpTransport() {
  close_all();
  pending_.clear();
  retry_out_.clear();
  closed_.clear();  // sockets close as their last reference goes
  ::close(wake_fd_);
  ::close(epoll_fd_);
}

// --- Hooks of the shared-memory subclass ----------------------------------------

bool TcpTransport::upgrade_outgoing(const ConnPtr&, BlockingStream&) { return false; }

bool TcpTransport::accept_offer(const ConnPtr&, Op op, const Payload&, std::vector<uint8_t>*, std::string* why) {
  if (op == Op::kUcxOffer) {
    *why = concat("this server does not use UCX (its FASTPS_TRANSPORT is ", kind(),
                  "; set FASTPS_TRANSPORT=ucx on every process of the job)");
  } else {
    *why = "this server uses TCP only (its FASTPS_TRANSPORT is tcp)";
  }
  return false;
}

void TcpTransport::start_channel(const ConnPtr&) {}
void TcpTransport::wake_channel(Conn&) {}
void TcpTransport::release_channel(const ConnPtr&) {}

// --- Server side ------------------------------------------------------------

uint16_t TcpTransport::do_listen(const std::string& host, uint16_t port) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    FASTPS_CHECK(listen_fd_ < 0, "fastps: this transport is already listening");
  }
  uint16_t bound = 0;
  FdGuard fd(listen_socket(host, port, options(), kListenBacklog, &bound));
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

// --- Client side ------------------------------------------------------------

ConnId TcpTransport::do_connect(const std::string& host, uint16_t port, int rank) {
  const Clock::time_point deadline = Clock::now() + options().timeout;
  const std::string where = host_port(host, port);
  auto conn = std::make_shared<Conn>(this);
  conn->peer = where;
  conn->outgoing = true;
  for (int i = 0; i < options().connections_per_peer; ++i) {
    auto socket = std::make_shared<Socket>(connect_socket(host, port, options(), deadline, where));
    SocketStream stream(socket->fd, deadline, where);
    conn->peer_max_payload = client_handshake(stream, options().secret, options().max_payload, rank);
    conn->sockets.push_back(socket);
    // Shared memory: the rings carry every frame; one socket suffices for liveness.
    if (i == 0 && upgrade_outgoing(conn, stream)) break;
  }
  const int64_t now = now_ns();
  for (auto& s : conn->sockets) {
    s->last_send.store(now, std::memory_order_relaxed);
    s->last_recv.store(now, std::memory_order_relaxed);
  }
  conn->established.store(true, std::memory_order_release);
  note_connection_opened();
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
  if (conn->has_channel()) start_channel(conn);
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
  send_frame(conn, header, segments, nsegments, payload_len, deadline);
}

void TcpTransport::send_frame(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                              size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  // Note [Send queues]: only a connection this side opened makes its caller wait.
  if (conn->outgoing)
    send_blocking(conn, header, segments, nsegments, payload_len, deadline);
  else
    post(conn, header, segments, nsegments, payload_len);
}

// A socket of `conn` whose send mutex *lock now holds: a free one, else the
// next in turn, waited for until *deadline (null: without a limit; only
// post()s, which hold it for milliseconds, wait that way). Null if the
// deadline passed.
TcpTransport::Socket* TcpTransport::pick_socket(Conn& conn, std::unique_lock<std::timed_mutex>* lock,
                                                const Clock::time_point* deadline) {
  const size_t n = conn.sockets.size();
  const uint32_t start = conn.next_socket.fetch_add(1, std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) {
    Socket* s = conn.sockets[(start + i) % n].get();
    *lock = std::unique_lock<std::timed_mutex>(s->send_mu, std::try_to_lock);
    if (lock->owns_lock()) return s;
  }
  Socket* s = conn.sockets[start % n].get();
  *lock = deadline ? std::unique_lock<std::timed_mutex>(s->send_mu, *deadline)
                   : std::unique_lock<std::timed_mutex>(s->send_mu);
  return lock->owns_lock() ? s : nullptr;
}

void TcpTransport::send_blocking(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                                 size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  std::unique_lock<std::timed_mutex> lock;
  Socket* socket = pick_socket(*conn, &lock, &deadline);
  FASTPS_CHECK_TYPED(TimeoutError, socket != nullptr, "fastps: timed out after ", options().timeout.count(),
                     " ms waiting to send to ", conn->peer, " (earlier frames are still being written)");

  // A heartbeat the loop could not write whole goes first (Note [Liveness]).
  std::vector<iovec> iov;
  uint64_t queued = 0;
  for (const OutBytes& q : socket->queue) {
    iov.push_back(iovec{q.data.get() + q.off, q.size - q.off});
    queued += q.size - q.off;
  }
  for (const iovec& v : frame_iov(header, segments, nsegments)) iov.push_back(v);

  const uint64_t total = queued + kHeaderSize + payload_len;
  size_t first = 0;
  const uint64_t written = write_until(conn, *socket, iov, first, total, deadline);
  if (first < iov.size()) {
    std::string what = concat("fastps: timed out after ", options().timeout.count(), " ms sending to ",
                              conn->peer, " (", written, " of ", total,
                              " bytes written; is the peer alive and reading?)");
    if (written > 0) {
      request_close(conn, "a send timed out in the middle of a frame");
      what += "; the connection was closed";
    }
    throw TimeoutError(what);
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
  std::unique_lock<std::timed_mutex> lock;
  Socket* socket = pick_socket(*conn, &lock, nullptr);  // every holder is another post(): milliseconds at most
  std::vector<iovec> iov = frame_iov(header, segments, nsegments);
  const uint64_t total = kHeaderSize + payload_len;
  uint64_t written = 0;
  size_t first = 0;
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
    if (socket->queue.empty()) written = write_until(conn, *socket, iov, first, total, grace);
  }
  if (written < total) {
    iov.erase(iov.begin(), iov.begin() + static_cast<std::ptrdiff_t>(first));
    enqueue(conn, *socket, iov, 0, total - written);
  }
}

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

// Writes iov[first..] (advancing `first` and the entry it stops in past what
// went out) until all of it is out or, waiting for room, `until` passes;
// returns the bytes written. ConnectionError if the connection closes or
// breaks (`total` is the whole frame, for the message). send_mu is held.
uint64_t TcpTransport::write_until(const ConnPtr& conn, Socket& s, std::vector<iovec>& iov, size_t& first,
                                   uint64_t total, Clock::time_point until) {
  uint64_t written = 0;
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
      if (Clock::now() >= until) break;
      pollfd p{s.fd, POLLOUT, 0};
      ::poll(&p, 1, poll_ms(until));  // errors and hangups surface in sendmsg
      continue;
    }
    int err = r < 0 ? errno : EPIPE;
    request_close(conn, concat("send failed: ", errno_text(err)));
    throw ConnectionError(concat("fastps: connection to ", conn->peer, " lost while sending: ",
                                 errno_text(err)));
  }
  return written;
}

OutBytes TcpTransport::copy_out(const ConnPtr& conn, const std::vector<iovec>& iov, uint64_t skip, uint64_t rest) {
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
  return b;
}

// Queues the `rest` bytes of iov after its first `skip` on socket `s`
// (send_mu held) and arms the loop to write them as the peer reads.
void TcpTransport::enqueue(const ConnPtr& conn, Socket& s, const std::vector<iovec>& iov, uint64_t skip,
                           uint64_t rest) {
  s.queue.push_back(copy_out(conn, iov, skip, rest));
  set_want_out(s, true);
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
  info.max_payload = conn->peer_max_payload;  // single_copy: ShmTransport::do_peer_info()
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
  wake_channel(*conn);
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
  if (conn.use_ucx.load(std::memory_order_acquire)) s += ", UCX";
  return s + ")";
}

}  // namespace fastps
