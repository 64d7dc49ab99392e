// TcpTransport's event loop (one thread per transport): accepting, reading
// and framing, the server side of the handshake, Note [Liveness], writing
// send queues out (Note [Send queues]) and tearing connections down. The
// design notes are in tcp.h.
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>

#include "common/error.h"
#include "transport/shm.h"
#include "transport/socket.h"
#include "transport/tcp.h"
#include "transport/tcp_conn.h"

namespace fastps {

using detail::concat;

namespace {

constexpr size_t kReadBudget = 16 << 20;  // bytes read from one socket per wakeup
constexpr int kMaxEvents = 64;
constexpr int kTickMs = 100;  // loop tick while handshakes are pending
constexpr int kRetryMs = 1;   // loop tick while a send queue waits for its lock

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
    socket->handshake = std::make_unique<ServerHandshake>();
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
    if (accept_paused_ && Clock::now() >= accept_resume_at_) resume_accept();
  }
}

void TcpTransport::resume_accept() {
  std::lock_guard<std::mutex> lock(mu_);
  if (listen_fd_ >= 0) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kListenToken;
    epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, listen_fd_, &ev);
  }
  accept_paused_ = false;
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
      if (now - s.last_send.load(std::memory_order_relaxed) >= beat_ns) beat(conn, s, now);
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

// Note [Liveness]: a HEARTBEAT on socket `s`, idle since a heartbeat period,
// unless a frame is going out on it or waits in its queue.
void TcpTransport::beat(const ConnPtr& conn, Socket& s, int64_t now) {
  std::unique_lock<std::timed_mutex> lock(s.send_mu, std::try_to_lock);
  if (!lock.owns_lock() || !s.queue.empty()) return;
  MessageHeader h;
  h.op = Op::kHeartbeat;
  uint8_t hb[kHeaderSize];
  encode_header(h, hb);
  std::vector<iovec> iov{iovec{hb, kHeaderSize}};
  size_t first = 0;
  try {
    const uint64_t written = write_until(conn, s, iov, first, kHeaderSize, Clock::now());
    if (written < kHeaderSize) enqueue(conn, s, iov, 0, kHeaderSize - written);
    s.last_send.store(now, std::memory_order_relaxed);
  } catch (const Error&) {
    // the connection is closing
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
  if (!s.handshake) {
    problem = header_problem(h, options().max_payload);
    if (!problem.empty() && h.magic == kProtocolMagic &&
        (h.payload_len > options().max_payload || h.count > max_count_for(options().max_payload))) {
      status = Status::kLimit;
    }
  } else {
    const HandshakeCheck check = s.handshake->check_header(h);
    problem = check.problem;
    status = check.status;
  }
  if (!problem.empty()) {
    fail(e, status, problem);
    return false;
  }
  try {
    s.frame.header = h;
    uint8_t* target = nullptr;
    if (!s.handshake && h.payload_len > 0 && !is_transport_op(h.op))
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
  if (e.socket->handshake) return on_handshake_frame(e, std::move(frame));
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

// HELLO or AUTH on an accepted socket (docs/protocol.md "Handshake"): the
// checks are ServerHandshake's; this sends the reply and, after AUTH_OK,
// establishes the connection.
bool TcpTransport::on_handshake_frame(const Entry& e, Message&& frame) {
  Socket& s = *e.socket;
  Conn& conn = *e.conn;
  ServerHandshake& hs = *s.handshake;
  MessageHeader reply;
  std::vector<uint8_t> payload;
  const bool hello = frame.header.op == Op::kHello;
  const HandshakeCheck check = hello ? hs.on_hello(frame, options().max_payload, &reply, &payload)
                                     : hs.on_auth(frame, options().secret, &reply, &payload);
  if (!check.ok()) {
    fail(e, check.status, check.problem);
    return false;
  }
  if (hello) {
    conn.rank = hs.rank();
    conn.peer_max_payload = hs.peer_max_payload();
  }
  if (!send_small_frame(s.fd, reply, payload.data(), payload.size())) {
    std::string reason = concat("could not send ", op_name(reply.op), ": ", errno_text(errno));
    transport_log(concat("closing ", describe(conn), ": ", reason));
    teardown(e.conn, reason);
    return false;
  }
  if (!hs.done()) return true;
  s.handshake.reset();
  s.last_send.store(now_ns(), std::memory_order_relaxed);
  s.last_recv.store(now_ns(), std::memory_order_relaxed);
  if (!conn.established.exchange(true, std::memory_order_acq_rel)) note_connection_opened();
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
  // A shared-memory connection's reader delivers nothing after this: the
  // disconnect handler runs after the connection's last frame.
  wake_channel(*conn);
  release_channel(conn);
  std::string why;
  {
    std::lock_guard<std::mutex> lock(conn->reason_mu);
    why = conn->close_reason.empty() ? reason : conn->close_reason;
  }
  const bool established = conn->established.load(std::memory_order_acquire);
  if (established) note_connection_closed();
  else if (!conn->outgoing) note_handshake_failed();
  if (established && !stopping_.load(std::memory_order_acquire)) notify_disconnect(conn->id, why);
}


// HEARTBEAT, and the server side of docs/protocol.md "Shared memory" and "UCX".
bool TcpTransport::on_transport_op(const Entry& e, Message&& frame) {
  Conn& conn = *e.conn;
  const MessageHeader& h = frame.header;
  if (h.op == Op::kHeartbeat && h.payload_len == 0) return true;  // Note [Liveness]: it arrived; that is all
  const bool shm = h.op == Op::kShmOffer;
  if ((!shm && h.op != Op::kUcxOffer) || conn.outgoing || conn.has_channel() || e.socket->fd < 0) {
    fail(e, Status::kProtocol, concat("unexpected ", op_name(h.op), " frame"));
    return false;
  }
  const Payload& p = frame.payload;
  if (shm ? p.size() <= kShmOfferFixedSize || p.size() > kShmOfferFixedSize + kShmMaxNameSize
          : p.size() <= kUcxOfferFixedSize || p.size() > kUcxOfferFixedSize + kUcxMaxAddressSize) {
    fail(e, Status::kProtocol, concat("malformed ", op_name(h.op), " (", p.size(), " bytes)"));
    return false;
  }
  std::string why;
  std::vector<uint8_t> body;
  MessageHeader reply;
  // A TCP-only server declines; ShmTransport maps the segment if it can,
  // UcxTransport makes an endpoint.
  if (accept_offer(e.conn, h.op, p, &body, &why)) {
    reply.op = shm ? Op::kShmAccept : Op::kUcxAccept;
  } else {
    reply.op = shm ? Op::kShmDecline : Op::kUcxDecline;
    std::string text = truncate_utf8(why, kMaxErrorMessage);
    body.assign(text.begin(), text.end());
  }
  if (!send_small_frame(e.socket->fd, reply, body.data(), body.size())) {
    std::string reason = concat("could not answer ", op_name(h.op), ": ", errno_text(errno));
    transport_log(concat("closing ", describe(conn), ": ", reason));
    teardown(e.conn, reason);
    return false;
  }
  if (conn.has_channel()) start_channel(e.conn);
  return true;
}

}  // namespace fastps
