// UcxTransport: the core's side of the UCX transport (the design note is in
// ucx_transport.h); the UCX calls themselves are in the plugin
// (ucx_plugin.cc), loaded here with dlopen().
#include "transport/ucx_transport.h"

#include <dirent.h>
#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>

#include <cstring>
#include <deque>
#include <new>

#include "common/error.h"
#include "transport/handshake.h"
#include "transport/socket.h"
#include "transport/tcp_conn.h"

namespace fastps {

using detail::concat;

namespace {

constexpr size_t kAmHeaderSize = ucx::kTokenSize + kHeaderSize;
// An accepted connection tries to send frames up to this size at once
// (eager, from the caller's memory) before it copies them.
constexpr uint64_t kSendNowMax = 256 << 10;

// What to do when the plugin or UCX cannot be loaded.
constexpr const char* kUcxAdvice =
    "install UCX (Debian/Ubuntu: apt-get install libucx0; or load your cluster's UCX module) and make its "
    "libucp.so.0 findable (LD_LIBRARY_PATH), or choose another transport (FASTPS_TRANSPORT=tcp, or shm on one host)";

std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

const ucx::Plugin* load_once(std::string* why) {
  Dl_info info{};
  std::vector<std::string> candidates;
  if (dladdr(reinterpret_cast<void*>(&load_ucx_plugin), &info) != 0 && info.dli_fname != nullptr) {
    candidates.push_back(dir_of(info.dli_fname) + "/" + ucx::kPluginFile);
    char real[PATH_MAX];
    if (realpath(info.dli_fname, real) != nullptr) {
      const std::string other = dir_of(real) + "/" + ucx::kPluginFile;
      if (other != candidates.front()) candidates.push_back(other);
    }
  }
  std::string errors;
  void* handle = nullptr;
  for (const std::string& path : candidates) {
    if (::access(path.c_str(), F_OK) != 0) continue;
    handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) break;
    const char* e = dlerror();
    errors += concat(errors.empty() ? "" : "; ", e != nullptr ? e : path);
  }
  if (handle == nullptr && errors.empty()) {
    // Not next to the core: this build has no plugin, unless the loader's path has one.
    handle = dlopen(ucx::kPluginFile, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      *why = concat("this fastps was built without the UCX transport (", ucx::kPluginFile,
                    " is not installed next to it; rebuild with the UCX headers present, e.g. Debian's libucx-dev), "
                    "or choose another transport (FASTPS_TRANSPORT=tcp, or shm on one host)");
      return nullptr;
    }
  }
  if (handle == nullptr) {
    *why = concat("cannot load the UCX transport: ", errors, "; ", kUcxAdvice);
    return nullptr;
  }
  using Entry = const ucx::Plugin* (*)();
  auto entry = reinterpret_cast<Entry>(dlsym(handle, ucx::kPluginEntry));
  const ucx::Plugin* plugin = entry != nullptr ? entry() : nullptr;
  if (plugin == nullptr || plugin->abi != ucx::kPluginAbi) {
    *why = concat(ucx::kPluginFile, " does not belong to this fastps build (plugin interface ",
                  plugin != nullptr ? plugin->abi : 0, ", expected ", ucx::kPluginAbi,
                  "); reinstall fastps");
    return nullptr;
  }
  return plugin;
}

}  // namespace

const ucx::Plugin* load_ucx_plugin(std::string* why) {
  // dlopen() is process-wide anyway: the outcome is decided once.
  static std::once_flag once;
  static const ucx::Plugin* plugin = nullptr;
  static std::string error;
  std::call_once(once, [] { plugin = load_once(&error); });
  if (plugin == nullptr) *why = error;
  return plugin;
}

bool host_has_rdma_device() {
  DIR* d = ::opendir("/sys/class/infiniband");
  if (d == nullptr) return false;
  bool any = false;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') {
      any = true;
      break;
    }
  }
  ::closedir(d);
  return any;
}

// The UCX side of one connection (Conn::ucx).
struct UcxChannel {
  uint64_t local_token = 0;   // frames from the peer name it
  uint64_t remote_token = 0;  // frames to the peer name it
  std::unique_ptr<ucx::Endpoint> ep;
  // Frames in arrival order (progress thread), delivered as their prefix
  // completes once the connection is registered (started).
  struct Rx {
    Message message;
    bool done = false;
  };
  std::mutex rx_mu;  // the fields below; never held while calling out
  std::deque<std::unique_ptr<Rx>> rx;
  bool started = false;
  bool released = false;
  // Held while frames are handed to the handler: one delivery at a time,
  // and release_channel() waits for one under way.
  std::mutex deliver_mu;
  // post()ed copies UCX has not finished with: later frames queue behind
  // them rather than overtake them.
  std::atomic<uint64_t> posts{0};
  std::mutex transports_mu;
  std::string transports;  // cached once UCX names them

  // The UCX transports this connection's endpoint uses ("tcp/lo.0"), asked
  // of UCX until it names them; empty before.
  std::string transports_in_use() {
    std::lock_guard<std::mutex> lock(transports_mu);
    if (transports.empty() && ep) transports = ep->transports();
    return transports;
  }
};

namespace {

// A post()ed frame's copy, freed when UCX is done with it.
struct PostedCopy {
  uint8_t am_header[kAmHeaderSize];  // UCX reads it until the send completes too
  OutBytes bytes;
};

}  // namespace

class UcxTransport::Events final : public ucx::Sink {
 public:
  explicit Events(UcxTransport* t) : t_(t) {}

  bool frame_begin(uint64_t token, const uint8_t* header, uint64_t len, uint8_t** dst, void** frame) override {
    ConnPtr conn = t_->find_token(token);
    if (!conn || conn->closing.load(std::memory_order_acquire)) return false;
    MessageHeader h = decode_header(header);
    std::string problem = header_problem(h, t_->options().max_payload);
    Status status = Status::kProtocol;
    if (problem.empty() && h.payload_len != len)
      problem = concat("a frame announces ", h.payload_len, " payload bytes but carries ", len);
    if (problem.empty() && is_transport_op(h.op)) problem = concat("unexpected ", op_name(h.op), " frame over UCX");
    if (!problem.empty() && h.magic == kProtocolMagic && h.payload_len > t_->options().max_payload)
      status = Status::kLimit;
    if (!problem.empty()) {
      t_->fail_soon(conn, status, problem);
      return false;
    }
    UcxChannel& ch = *conn->ucx;
    std::lock_guard<std::mutex> lock(ch.rx_mu);
    if (ch.released) return false;
    auto rx = std::make_unique<UcxChannel::Rx>();
    rx->message.header = h;
    try {
      uint8_t* target = len > 0 ? t_->payload_target(conn->id, h) : nullptr;
      if (target != nullptr) {
        rx->message.in_place = target;
      } else {
        rx->message.payload = Payload(len);
        target = rx->message.payload.data();
      }
      *dst = target;
    } catch (const std::bad_alloc&) {
      t_->fail_soon(conn, Status::kLimit, concat("cannot allocate a ", len, "-byte payload"));
      return false;
    }
    *frame = rx.get();
    ch.rx.push_back(std::move(rx));
    return true;
  }

  void frame_done(uint64_t token, void* frame, const char* error) override {
    ConnPtr conn = t_->find_token(token);
    if (!conn) return;
    {
      std::lock_guard<std::mutex> lock(conn->ucx->rx_mu);
      static_cast<UcxChannel::Rx*>(frame)->done = true;
    }
    if (error != nullptr) {
      t_->fail_soon(conn, Status::kInternal, concat("UCX could not receive a frame: ", error));
      return;
    }
    ready_.push_back(std::move(conn));  // delivered in after_progress()
  }

  // See Note [No handlers under UCX's lock].
  void after_progress() override {
    if (ready_.empty()) return;
    std::vector<ConnPtr> ready;
    ready.swap(ready_);
    for (const ConnPtr& conn : ready) t_->deliver_ready(conn);
  }

  void post_done(uint64_t token, void* cookie, const char* error) override {
    std::unique_ptr<PostedCopy> copy(static_cast<PostedCopy*>(cookie));
    ConnPtr conn = t_->find_token(token);
    if (!conn) return;  // its Conn went, with the queued count
    const uint64_t n = copy->bytes.size;
    conn->queue_moved.store(now_ns(), std::memory_order_relaxed);
    conn->queued.fetch_sub(n, std::memory_order_relaxed);
    t_->note_unqueued(n);
    conn->ucx->posts.fetch_sub(1, std::memory_order_acq_rel);
    if (error != nullptr && !conn->closing.load(std::memory_order_acquire))
      t_->fail_soon(conn, Status::kInternal, concat("UCX could not send a frame: ", error));
  }

  void endpoint_failed(uint64_t token, const char* why) override {
    ConnPtr conn = t_->find_token(token);
    if (!conn || conn->closing.load(std::memory_order_acquire)) return;
    const std::string who = concat(conn->outgoing ? "server " : "peer ", conn->peer,
                                   conn->rank >= 0 ? concat(" (rank ", conn->rank, ")") : std::string());
    // Not logged: a peer that closes reaches here too (as a TCP peer's close
    // does); the reason goes to the disconnect handler.
    t_->request_close(conn, concat("UCX reports the connection to ", who, " broken: ", why));
  }

 private:
  UcxTransport* const t_;
  std::vector<ConnPtr> ready_;  // progress thread only: connections with completed frames
};

UcxTransport::UcxTransport(std::string kind, const TransportOptions& options, const ucx::Plugin* plugin,
                           bool require_ucx)
    : ShmTransport(std::move(kind), options, false),
      plugin_(plugin),
      require_ucx_(require_ucx),
      events_(std::make_unique<Events>(this)) {}

UcxTransport::~UcxTransport() {
  close_all();  // the loop stops; every connection is closing
  std::vector<ConnPtr> conns;
  {
    std::lock_guard<std::mutex> lock(tokens_mu_);
    for (auto& kv : by_token_)
      if (ConnPtr c = kv.second.lock()) conns.push_back(c);
  }
  // Endpoints close while the worker runs; nothing is delivered any more.
  for (const ConnPtr& c : conns) {
    if (!c->ucx) continue;
    {
      std::lock_guard<std::mutex> lock(c->ucx->rx_mu);
      c->ucx->released = true;
    }
    if (c->ucx->ep) c->ucx->ep->close();
  }
  worker_.reset();
}

ucx::Worker* UcxTransport::worker(std::string* why) {
  std::lock_guard<std::mutex> lock(worker_mu_);
  if (worker_ == nullptr && worker_error_.empty()) {
    std::string error;
    worker_.reset(plugin_->create_worker(events_.get(), &error));
    if (worker_ == nullptr) worker_error_ = concat("UCX (", plugin_->ucx_version(), ") cannot start: ", error);
    else transport_log(concat("UCX transport ready: ", worker_->describe()));
  }
  if (worker_ == nullptr) *why = worker_error_;
  return worker_.get();
}

UcxTransport::ConnPtr UcxTransport::find_token(uint64_t token) const {
  std::lock_guard<std::mutex> lock(tokens_mu_);
  auto it = by_token_.find(token);
  return it == by_token_.end() ? nullptr : it->second.lock();
}

// The body of UCX_OFFER and of UCX_ACCEPT (docs/protocol.md, "UCX"): this
// side's connection token, then its worker address.
std::vector<uint8_t> UcxTransport::offer_body(uint64_t token, const std::string& address) {
  std::vector<uint8_t> body(kUcxOfferFixedSize + address.size());
  store_le64(body.data(), token);
  std::memcpy(body.data() + kUcxOfferFixedSize, address.data(), address.size());
  return body;
}

// A channel with a fresh token, registered (frames may arrive as soon as the
// peer has an endpoint).
std::shared_ptr<UcxChannel> UcxTransport::make_channel(const ConnPtr& conn) {
  auto ch = std::make_shared<UcxChannel>();
  // Attached before the token is registered (under tokens_mu_, which
  // find_token() takes too): a callback that finds the connection finds its
  // channel, even for a frame that arrives before connect() has finished.
  // It stays attached if the offer fails; only use_ucx says it is in use.
  conn->ucx = ch;
  std::lock_guard<std::mutex> lock(tokens_mu_);
  for (auto it = by_token_.begin(); it != by_token_.end();) {  // connections that never started
    if (it->second.expired()) it = by_token_.erase(it);
    else ++it;
  }
  do {
    fill_random(reinterpret_cast<uint8_t*>(&ch->local_token), sizeof(ch->local_token));
  } while (ch->local_token == 0 || by_token_.count(ch->local_token) != 0);
  by_token_[ch->local_token] = conn;
  return ch;
}

void UcxTransport::forget_token(uint64_t token) {
  std::lock_guard<std::mutex> lock(tokens_mu_);
  by_token_.erase(token);
}

// Client side of docs/protocol.md "UCX": offers this worker's address; on
// UCX_ACCEPT makes the endpoint to the server's.
bool UcxTransport::upgrade_outgoing(const ConnPtr& conn, BlockingStream& stream) {
  if (!require_ucx_ && ShmTransport::upgrade_outgoing(conn, stream)) return true;
  const std::string& where = stream.where();
  std::string why;
  ucx::Worker* w = worker(&why);
  if (w == nullptr) {
    if (!require_ucx_) return false;
    throw TransportUnavailable(concat("fastps: cannot use UCX with ", where, ": ", why,
                                      " (check UCX_TLS and UCX_NET_DEVICES, or choose FASTPS_TRANSPORT=tcp)"));
  }
  std::shared_ptr<UcxChannel> ch = make_channel(conn);
  struct Forget {  // the token, unless the connection goes over UCX
    UcxTransport* t;
    uint64_t token;
    bool keep = false;
    ~Forget() {
      if (!keep) t->forget_token(token);
    }
  } forget{this, ch->local_token};
  const OfferAnswer a = exchange_offer(stream, Op::kUcxOffer, offer_body(ch->local_token, w->address()), Op::kUcxAccept, Op::kUcxDecline,
                                      kUcxOfferFixedSize + kUcxMaxAddressSize, "UCX");
  if (!a.accepted) {
    if (!require_ucx_) return false;
    throw ConnectionError(concat("fastps: cannot use UCX with ", where, ": it declined: ", a.reason,
                                 " (FASTPS_TRANSPORT=ucx needs every server to use ucx too)"));
  }
  FASTPS_CHECK_TYPED(ProtocolError, a.payload.size() > kUcxOfferFixedSize, "fastps: ", where,
                     " accepted the UCX offer without its worker address");
  ch->remote_token = load_le64(a.payload.data());
  ch->ep = w->connect(a.payload.data() + kUcxOfferFixedSize, a.payload.size() - kUcxOfferFixedSize,
                      ch->local_token, &why);
  FASTPS_CHECK_TYPED(ConnectionError, ch->ep != nullptr, "fastps: cannot reach ", where, " over UCX: ", why,
                     " (check UCX_TLS and UCX_NET_DEVICES on both hosts)");
  forget.keep = true;
  conn->use_ucx.store(true, std::memory_order_release);
  return true;
}

bool UcxTransport::accept_offer(const ConnPtr& conn, Op op, const Payload& p, std::vector<uint8_t>* reply,
                                std::string* why) {
  if (op != Op::kUcxOffer) return ShmTransport::accept_offer(conn, op, p, reply, why);
  ucx::Worker* w = worker(why);
  if (w == nullptr) return false;
  std::shared_ptr<UcxChannel> ch = make_channel(conn);
  ch->remote_token = load_le64(p.data());
  ch->ep = w->connect(p.data() + kUcxOfferFixedSize, p.size() - kUcxOfferFixedSize, ch->local_token, why);
  if (ch->ep == nullptr) {
    forget_token(ch->local_token);
    return false;
  }
  *reply = offer_body(ch->local_token, w->address());
  conn->use_ucx.store(true, std::memory_order_release);
  return true;
}

// The connection is registered (its id is valid): frames that arrived
// before are delivered now, on this thread, in order.
void UcxTransport::start_channel(const ConnPtr& conn) {
  if (!conn->use_ucx.load(std::memory_order_acquire)) {
    ShmTransport::start_channel(conn);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(conn->ucx->rx_mu);
    conn->ucx->started = true;
  }
  deliver_ready(conn);
}

// Note [No handlers under UCX's lock]
// UCX (UCS_THREAD_MODE_MULTI) holds its worker lock through
// ucp_worker_progress(), callbacks included, and every UCX call of another
// thread spins on that lock. A handler run from a callback could therefore
// deadlock with a thread that holds what the handler waits for and is itself
// in a UCX call: a server's shard thread sending a reply while holding its
// shard, which the handler wants in order to run a task inline (this hung a
// colocated BSP job). So the callbacks only place payloads and mark frames
// complete; the progress thread hands them to the handler after progress
// returns (Sink::after_progress()), without UCX's lock, where the handler may
// block and send like any loop thread's. The same holds for everything this
// file does under a callback: short locks of its own, never a wait.

// Delivers the completed frames at the front of the connection's queue, in
// arrival order, one at a time (deliver_mu), without UCX's lock.
void UcxTransport::deliver_ready(const ConnPtr& conn) {
  UcxChannel& ch = *conn->ucx;
  std::lock_guard<std::mutex> delivering(ch.deliver_mu);
  for (;;) {
    std::unique_ptr<UcxChannel::Rx> rx;
    {
      std::lock_guard<std::mutex> lock(ch.rx_mu);
      if (!ch.started || ch.released || ch.rx.empty() || !ch.rx.front()->done) return;
      rx = std::move(ch.rx.front());
      ch.rx.pop_front();
    }
    if (conn->closing.load(std::memory_order_acquire)) return;
    if (!deliver(conn->id, std::move(rx->message))) {
      request_close(conn, "the message handler threw");
      return;
    }
  }
}

void UcxTransport::fail_soon(const ConnPtr& conn, Status status, const std::string& reason) {
  if (conn->closing.load(std::memory_order_acquire)) return;
  transport_log(concat("closing ", describe(*conn), ": ", reason));
  Socket& socket = *conn->sockets.front();
  std::unique_lock<std::timed_mutex> lock(socket.send_mu, std::try_to_lock);
  if (lock.owns_lock() && socket.queue.empty()) {
    std::string text = truncate_utf8(reason, kMaxErrorMessage);
    MessageHeader h;
    h.op = Op::kError;
    h.status = static_cast<uint32_t>(status);
    send_small_frame(socket.fd, h, reinterpret_cast<const uint8_t*>(text.data()), text.size());
  }
  request_close(conn, reason);
}

void UcxTransport::send_frame(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                              size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  if (!conn->use_ucx.load(std::memory_order_acquire)) {
    ShmTransport::send_frame(conn, header, segments, nsegments, payload_len, deadline);
    return;
  }
  UcxChannel& ch = *conn->ucx;
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  uint8_t am[kAmHeaderSize];
  store_le64(am, ch.remote_token);
  std::memcpy(am + ucx::kTokenSize, header, kHeaderSize);
  std::vector<iovec> iov;
  iov.reserve(nsegments);
  for (size_t i = 0; i < nsegments; ++i)
    if (segments[i].size > 0) iov.push_back(iovec{const_cast<void*>(segments[i].data), segments[i].size});
  std::string why;
  ucx::Worker* w = worker_.get();
  const bool on_progress = w != nullptr && w->on_progress_thread();
  const bool behind = ch.posts.load(std::memory_order_acquire) > 0;
  if (conn->outgoing && !on_progress && !behind) {
    const int64_t deadline_ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count();
    const ucx::SendStatus st = ch.ep->send(am, sizeof(am), iov.data(), iov.size(), deadline_ns, &why);
    if (st == ucx::SendStatus::kOk) return;
    if (st == ucx::SendStatus::kTimeout) {
      request_close(conn, "a send over UCX timed out");
      throw TimeoutError(concat("fastps: timed out after ", options().timeout.count(), " ms sending to ", conn->peer,
                                " over UCX (is the peer alive and reading?); the connection was closed"));
    }
    lost_while_sending(conn, why);
  }
  // Note [Send queues]: never wait for the peer here.
  if (!behind && payload_len <= kSendNowMax) {
    const ucx::SendStatus st = ch.ep->send_now(am, sizeof(am), iov.data(), iov.size(), &why);
    if (st == ucx::SendStatus::kOk) return;
    if (st == ucx::SendStatus::kFailed) lost_while_sending(conn, why);
  }
  post_copy(conn, am, iov, payload_len);
}

// Note [Send queues]: a copy of the payload, counted as queued, goes to UCX;
// Events::post_done() frees it.
void UcxTransport::post_copy(const ConnPtr& conn, const uint8_t* am_header, const std::vector<iovec>& iov,
                             uint64_t payload_len) {
  UcxChannel& ch = *conn->ucx;
  auto copy = std::make_unique<PostedCopy>();
  std::memcpy(copy->am_header, am_header, kAmHeaderSize);
  copy->bytes = copy_out(conn, iov, 0, payload_len);  // closes the connection past send_queue_limit
  ch.posts.fetch_add(1, std::memory_order_acq_rel);
  std::string why;
  PostedCopy* raw = copy.release();
  const ucx::SendStatus st =
      ch.ep->post(raw->am_header, kAmHeaderSize, raw->bytes.data.get(), raw->bytes.size, raw, &why);
  if (st == ucx::SendStatus::kOk) return;  // post_done() owns the copy now
  std::unique_ptr<PostedCopy> back(raw);
  ch.posts.fetch_sub(1, std::memory_order_acq_rel);
  conn->queued.fetch_sub(payload_len, std::memory_order_relaxed);
  note_unqueued(payload_len);
  lost_while_sending(conn, why);
}

void UcxTransport::lost_while_sending(const ConnPtr& conn, const std::string& why) {
  request_close(conn, concat("send over UCX failed: ", why));
  throw ConnectionError(concat("fastps: connection to ", conn->peer, " lost while sending over UCX: ", why));
}

void UcxTransport::wake_channel(Conn& conn) {
  if (!conn.use_ucx.load(std::memory_order_acquire)) ShmTransport::wake_channel(conn);
}

// Closes the endpoint (which waits for receives into the core's memory and
// the sends of it to end) and waits for a delivery in progress: nothing of
// this connection reaches the handler after this.
void UcxTransport::release_channel(const ConnPtr& conn) {
  if (!conn->use_ucx.load(std::memory_order_acquire)) {
    ShmTransport::release_channel(conn);
    return;
  }
  UcxChannel& ch = *conn->ucx;
  {
    std::lock_guard<std::mutex> delivering(ch.deliver_mu);  // a delivery under way ends first
    std::lock_guard<std::mutex> lock(ch.rx_mu);
    ch.released = true;
  }
  // Frames still being received land in their Rx until the endpoint's close
  // has waited for every receive: only then may their memory go.
  if (ch.ep) ch.ep->close();
  {
    std::lock_guard<std::mutex> lock(ch.rx_mu);
    ch.rx.clear();
  }
  forget_token(ch.local_token);
}

PeerInfo UcxTransport::do_peer_info(ConnId id) const {
  PeerInfo info = ShmTransport::do_peer_info(id);
  ConnPtr conn = find_established(id);
  if (!conn || !conn->use_ucx.load(std::memory_order_acquire)) return info;
  info.ucx = true;
  info.ucx_transports = conn->ucx->transports_in_use();
  return info;
}

void UcxTransport::add_stats(TransportStats* s) const {
  std::vector<ConnPtr> conns;
  {
    std::lock_guard<std::mutex> lock(tokens_mu_);
    for (auto& kv : by_token_)
      if (ConnPtr c = kv.second.lock()) conns.push_back(c);
  }
  std::string tls;
  for (const ConnPtr& c : conns) {
    if (!c->use_ucx.load(std::memory_order_acquire) || !c->established.load(std::memory_order_acquire) ||
        c->closing.load(std::memory_order_acquire))
      continue;
    ++s->ucx_connections;
    const std::string used = c->ucx->transports_in_use();
    if (!used.empty() && tls.find(used) == std::string::npos) tls += (tls.empty() ? "" : "; ") + used;
  }
  if (s->ucx_connections > 0) s->ucx = concat("UCX ", plugin_->ucx_version(), ": ", tls.empty() ? "?" : tls);
}

}  // namespace fastps
