// The UCX plugin (libfastps_ucx.so): a UCP context, one worker with its
// progress thread, endpoints and active messages, behind the interface of
// transport/ucx_plugin.h (read its design note first). Built only where the
// UCX headers were found; linked against libucp, loaded by the core with
// dlopen() when a "ucx" transport is made. It throws nothing: errors become
// statuses and texts the core turns into fastps exceptions.
#include "transport/ucx_plugin.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>

namespace fastps {
namespace ucx {
namespace {

constexpr unsigned kAmId = 0x46;  // the one active-message id fastps uses
constexpr auto kCloseWait = std::chrono::seconds(3);

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string status_text(ucs_status_t s) { return ucs_status_string(s); }

uint64_t load_token(const void* p) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(b[i]) << (8 * i);
  return v;
}

class WorkerImpl;

// The buffer and count ucp_am_send_nbx() takes for `niov` segments: one
// contiguous buffer (none, or one segment) or an iovec list (UCX refuses an
// empty list).
void set_data(ucp_request_param_t* p, const iovec* iov, size_t niov, const void** buffer, size_t* count) {
  if (niov <= 1) {
    *buffer = niov == 1 ? iov[0].iov_base : nullptr;
    *count = niov == 1 ? iov[0].iov_len : 0;
    return;
  }
  p->op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
  p->datatype = ucp_dt_make_iov();
  *buffer = iov;
  *count = niov;
}

// The state of one blocking send(), shared with its completion callback.
struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  ucs_status_t status = UCS_OK;
};

class EndpointImpl;

// A post()ed frame or a rendezvous receive: what its callback needs.
struct OpContext {
  EndpointImpl* ep;  // counts the op as outstanding
  uint64_t token;    // post: the sender's own token (for post_done); recv: the receiver's
  void* cookie;
};

class EndpointImpl final : public Endpoint {
 public:
  EndpointImpl(WorkerImpl* w, uint64_t token) : worker_(w), token_(token) {}
  ~EndpointImpl() override { close(); }

  SendStatus send(const uint8_t* hdr, size_t hlen, const iovec* iov, size_t niov, int64_t deadline_ns,
                  std::string* why) override;
  SendStatus send_now(const uint8_t* hdr, size_t hlen, const iovec* iov, size_t niov, std::string* why) override;
  SendStatus post(const uint8_t* hdr, size_t hlen, const uint8_t* data, size_t len, void* cookie,
                  std::string* why) override;
  std::string transports() override;
  void close() override;

  ucp_ep_h ep = nullptr;
  std::atomic<int64_t> outstanding{0};  // sends and receives in flight
  std::atomic<bool> closed{false};

  WorkerImpl* worker_;
  const uint64_t token_;
  std::mutex close_mu_;
  bool finished_ = false;  // close() ran to its end (close_mu_): the worker may be gone since
  // Shared by calls that use `ep`, exclusive while close() releases it.
  std::shared_mutex ep_mu_;
};

class WorkerImpl final : public Worker {
 public:
  explicit WorkerImpl(Sink* sink) : sink_(sink) {}
  ~WorkerImpl() override;
  bool init(std::string* why);

  std::string address() const override { return address_; }
  std::unique_ptr<Endpoint> connect(const uint8_t* address, size_t len, uint64_t local_token,
                                    std::string* why) override;
  bool on_progress_thread() const override { return std::this_thread::get_id() == thread_id_.load(); }
  std::string describe() const override;

  void wake() { ucp_worker_signal(worker_); }
  void forget(uint64_t token) {
    std::lock_guard<std::mutex> lock(eps_mu_);
    eps_.erase(token);
  }

  ucp_worker_h worker_ = nullptr;
  Sink* const sink_;

 private:
  static ucs_status_t on_am(void* arg, const void* header, size_t header_length, void* data, size_t length,
                            const ucp_am_recv_param_t* param);
  static void on_recv_done(void* request, ucs_status_t status, size_t length, void* user_data);
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  void run();

  ucp_context_h context_ = nullptr;
  std::string address_;
  int efd_ = -1;
  int epfd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::atomic<std::thread::id> thread_id_{};
  std::mutex eps_mu_;
  std::unordered_map<uint64_t, EndpointImpl*> eps_;  // by local token: receives count against them
};

// --- Completion callbacks (progress thread) -----------------------------------

void on_send_done(void* request, ucs_status_t status, void* user_data) {
  ucp_request_free(request);
  Waiter* w = static_cast<Waiter*>(user_data);
  // Notified under the lock: the waiter (whose stack holds *w) cannot see
  // `done` and return before this call is finished with *w.
  std::lock_guard<std::mutex> lock(w->mu);
  w->done = true;
  w->status = status;
  w->cv.notify_all();
}

void on_post_done(void* request, ucs_status_t status, void* user_data) {
  OpContext* op = static_cast<OpContext*>(user_data);
  op->ep->worker_->sink_->post_done(op->token, op->cookie, status == UCS_OK ? nullptr : ucs_status_string(status));
  op->ep->outstanding.fetch_sub(1, std::memory_order_acq_rel);
  delete op;
  ucp_request_free(request);
}

void WorkerImpl::on_recv_done(void* request, ucs_status_t status, size_t, void* user_data) {
  OpContext* op = static_cast<OpContext*>(user_data);
  WorkerImpl* self = op->ep->worker_;
  self->sink_->frame_done(op->token, op->cookie, status == UCS_OK ? nullptr : ucs_status_string(status));
  op->ep->outstanding.fetch_sub(1, std::memory_order_acq_rel);
  delete op;
  ucp_request_free(request);
}

void WorkerImpl::on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
  EndpointImpl* ep = static_cast<EndpointImpl*>(arg);
  ep->worker_->sink_->endpoint_failed(ep->token_, ucs_status_string(status));
}

// One frame arrived (eager: the payload is here; rendezvous: fetched into
// the core's memory).
ucs_status_t WorkerImpl::on_am(void* arg, const void* header, size_t header_length, void* data, size_t length,
                               const ucp_am_recv_param_t* param) {
  WorkerImpl* self = static_cast<WorkerImpl*>(arg);
  const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  if (header_length <= kTokenSize) return rndv ? UCS_ERR_REJECTED : UCS_OK;  // not ours: dropped
  const uint64_t token = load_token(header);
  EndpointImpl* ep = nullptr;
  {
    // Counted as outstanding under the lock: close() forgets the token first,
    // then waits for the count, so the endpoint outlives this call.
    std::lock_guard<std::mutex> lock(self->eps_mu_);
    auto it = self->eps_.find(token);
    if (it != self->eps_.end() && !it->second->closed.load(std::memory_order_acquire)) {
      ep = it->second;
      ep->outstanding.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  if (ep == nullptr) return rndv ? UCS_ERR_REJECTED : UCS_OK;
  struct Release {
    EndpointImpl* ep;
    ~Release() {
      if (ep != nullptr) ep->outstanding.fetch_sub(1, std::memory_order_acq_rel);
    }
  } release{ep};
  if (header_length != kTokenSize + 48) {
    self->sink_->endpoint_failed(token, "a peer sent an active message with a malformed header");
    return rndv ? UCS_ERR_REJECTED : UCS_OK;
  }
  uint8_t* dst = nullptr;
  void* frame = nullptr;
  if (!self->sink_->frame_begin(token, static_cast<const uint8_t*>(header) + kTokenSize, length, &dst, &frame))
    return rndv ? UCS_ERR_REJECTED : UCS_OK;
  if (!rndv) {
    if (length > 0) std::memcpy(dst, data, length);
    self->sink_->frame_done(token, frame, nullptr);
    return UCS_OK;
  }
  auto* op = new OpContext{ep, token, frame};
  release.ep = nullptr;  // the receive's callback releases it
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv_am = &WorkerImpl::on_recv_done;
  p.user_data = op;
  ucs_status_ptr_t r = ucp_am_recv_data_nbx(self->worker_, data, dst, length, &p);
  if (r == nullptr || UCS_PTR_IS_ERR(r)) {  // done at once, or failed: no callback follows
    const ucs_status_t st = UCS_PTR_STATUS(r);
    self->sink_->frame_done(token, frame, st == UCS_OK ? nullptr : ucs_status_string(st));
    ep->outstanding.fetch_sub(1, std::memory_order_acq_rel);
    delete op;
  }
  return UCS_OK;
}

// --- Worker -------------------------------------------------------------------

bool WorkerImpl::init(std::string* why) {
  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) {
    *why = "cannot read the UCX configuration (UCX_* variables): " + status_text(st);
    return false;
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  params.name = "fastps";
  st = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (st != UCS_OK) {
    *why = "ucp_init failed: " + status_text(st);
    return false;
  }
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_MULTI;
  st = ucp_worker_create(context_, &wp, &worker_);
  if (st != UCS_OK) {
    *why = "ucp_worker_create failed: " + status_text(st);
    return false;
  }
  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(worker_, &addr, &addr_len);
  if (st != UCS_OK) {
    *why = "ucp_worker_get_address failed: " + status_text(st);
    return false;
  }
  address_.assign(reinterpret_cast<const char*>(addr), addr_len);
  ucp_worker_release_address(worker_, addr);
  ucp_am_handler_param_t hp{};
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG;
  hp.id = kAmId;
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  hp.cb = &WorkerImpl::on_am;
  hp.arg = this;
  st = ucp_worker_set_am_recv_handler(worker_, &hp);
  if (st != UCS_OK) {
    *why = "ucp_worker_set_am_recv_handler failed: " + status_text(st);
    return false;
  }
  st = ucp_worker_get_efd(worker_, &efd_);
  if (st != UCS_OK) {
    *why = "ucp_worker_get_efd failed: " + status_text(st);
    return false;
  }
  epfd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epfd_ < 0) {
    *why = std::string("epoll_create1 failed: ") + std::strerror(errno);
    return false;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  epoll_ctl(epfd_, EPOLL_CTL_ADD, efd_, &ev);
  thread_ = std::thread([this] { run(); });
  return true;
}

WorkerImpl::~WorkerImpl() {
  if (thread_.joinable()) {
    stop_.store(true, std::memory_order_release);
    ucp_worker_signal(worker_);
    thread_.join();
  }
  if (epfd_ >= 0) ::close(epfd_);
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
}

// The progress thread: progresses until UCX has nothing to do, then sleeps on
// the worker's event descriptor (woken by the network, ucp_worker_signal()
// from senders, or stop). While requests are outstanding it sleeps at most a
// millisecond (some transports complete sends without an event).
void WorkerImpl::run() {
  thread_id_.store(std::this_thread::get_id());
  while (!stop_.load(std::memory_order_acquire)) {
    while (ucp_worker_progress(worker_) != 0) {
    }
    sink_->after_progress();  // outside UCX's lock: frames reach their handlers here
    const ucs_status_t st = ucp_worker_arm(worker_);
    if (st == UCS_ERR_BUSY) continue;
    epoll_event ev;
    ::epoll_wait(epfd_, &ev, 1, st == UCS_OK ? 100 : 1);
  }
}

std::unique_ptr<Endpoint> WorkerImpl::connect(const uint8_t* address, size_t len, uint64_t local_token,
                                              std::string* why) {
  (void)len;
  auto ep = std::make_unique<EndpointImpl>(this, local_token);
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.address = reinterpret_cast<const ucp_address_t*>(address);
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = &WorkerImpl::on_ep_error;
  p.err_handler.arg = ep.get();
  {
    // Registered first: the peer may send as soon as the endpoint exists.
    std::lock_guard<std::mutex> lock(eps_mu_);
    eps_[local_token] = ep.get();
  }
  const ucs_status_t st = ucp_ep_create(worker_, &p, &ep->ep);
  if (st != UCS_OK) {
    forget(local_token);
    ep->closed.store(true);
    *why = "ucp_ep_create failed: " + status_text(st);
    return nullptr;
  }
  wake();
  return ep;
}

std::string WorkerImpl::describe() const {
  std::string s = std::string("UCX ") + ucp_get_version_string();
  for (const char* var : {"UCX_TLS", "UCX_NET_DEVICES"}) {
    const char* v = std::getenv(var);
    s += std::string(", ") + var + "=" + (v != nullptr ? v : "(default)");
  }
  return s;
}

// --- Endpoint -----------------------------------------------------------------

SendStatus EndpointImpl::send(const uint8_t* hdr, size_t hlen, const iovec* iov, size_t niov, int64_t deadline_ns,
                              std::string* why) {
  Waiter w;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = &on_send_done;
  p.user_data = &w;
  const void* buffer;
  size_t count;
  set_data(&p, iov, niov, &buffer, &count);
  ucs_status_ptr_t r;
  {
    std::shared_lock<std::shared_mutex> use(ep_mu_);
    if (closed.load(std::memory_order_acquire)) {
      *why = "the UCX endpoint is closed";
      return SendStatus::kFailed;
    }
    outstanding.fetch_add(1, std::memory_order_acq_rel);
    r = ucp_am_send_nbx(ep, kAmId, hdr, hlen, buffer, count, &p);
  }
  if (r == nullptr || UCS_PTR_IS_ERR(r)) {
    outstanding.fetch_sub(1, std::memory_order_acq_rel);
    if (r == nullptr) return SendStatus::kOk;
    *why = "ucp_am_send_nbx failed: " + status_text(UCS_PTR_STATUS(r));
    return SendStatus::kFailed;
  }
  worker_->wake();
  std::unique_lock<std::mutex> lock(w.mu);
  const auto until = std::chrono::steady_clock::time_point(std::chrono::nanoseconds(deadline_ns));
  bool timed_out = !w.cv.wait_until(lock, until, [&] { return w.done; });
  if (timed_out) {
    // The request still reads the caller's memory: close the endpoint, which
    // completes it (cancelled), and wait for that before returning.
    lock.unlock();
    close();
    lock.lock();
    w.cv.wait_for(lock, kCloseWait, [&] { return w.done; });
    if (!w.done) {
      // Cannot return while UCX may still read the caller's memory.
      w.cv.wait(lock, [&] { return w.done; });
    }
  }
  outstanding.fetch_sub(1, std::memory_order_acq_rel);
  if (timed_out) {
    *why = "the send did not complete before the deadline; the UCX endpoint was closed";
    return SendStatus::kTimeout;
  }
  if (w.status != UCS_OK) {
    *why = "UCX failed the send: " + status_text(w.status);
    return SendStatus::kFailed;
  }
  return SendStatus::kOk;
}

SendStatus EndpointImpl::send_now(const uint8_t* hdr, size_t hlen, const iovec* iov, size_t niov, std::string* why) {
  std::shared_lock<std::shared_mutex> use(ep_mu_);
  if (closed.load(std::memory_order_acquire)) {
    *why = "the UCX endpoint is closed";
    return SendStatus::kFailed;
  }
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;
  p.flags = UCP_AM_SEND_FLAG_EAGER;
  const void* buffer;
  size_t count;
  set_data(&p, iov, niov, &buffer, &count);
  ucs_status_ptr_t r = ucp_am_send_nbx(ep, kAmId, hdr, hlen, buffer, count, &p);
  if (r == nullptr) return SendStatus::kOk;
  const ucs_status_t st = UCS_PTR_IS_ERR(r) ? UCS_PTR_STATUS(r) : UCS_INPROGRESS;
  if (st == UCS_ERR_NO_RESOURCE || st == UCS_ERR_UNSUPPORTED) return SendStatus::kWouldWait;
  if (!UCS_PTR_IS_ERR(r)) {  // not expected with FORCE_IMM_CMPL; never leak it
    ucp_request_free(r);
    *why = "UCX queued a send it was told to complete at once";
    return SendStatus::kFailed;
  }
  *why = "ucp_am_send_nbx failed: " + status_text(st);
  return SendStatus::kFailed;
}

SendStatus EndpointImpl::post(const uint8_t* hdr, size_t hlen, const uint8_t* data, size_t len, void* cookie,
                              std::string* why) {
  std::shared_lock<std::shared_mutex> use(ep_mu_);
  if (closed.load(std::memory_order_acquire)) {
    *why = "the UCX endpoint is closed";
    return SendStatus::kFailed;
  }
  auto* op = new (std::nothrow) OpContext{this, token_, cookie};
  if (op == nullptr) {
    *why = "out of memory";
    return SendStatus::kFailed;
  }
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = &on_post_done;
  p.user_data = op;
  outstanding.fetch_add(1, std::memory_order_acq_rel);
  ucs_status_ptr_t r = ucp_am_send_nbx(ep, kAmId, hdr, hlen, data, len, &p);
  if (r == nullptr || UCS_PTR_IS_ERR(r)) {
    outstanding.fetch_sub(1, std::memory_order_acq_rel);
    delete op;
    if (r == nullptr) {
      worker_->sink_->post_done(token_, cookie, nullptr);
      return SendStatus::kOk;
    }
    *why = "ucp_am_send_nbx failed: " + status_text(UCS_PTR_STATUS(r));
    return SendStatus::kFailed;
  }
  if (!worker_->on_progress_thread()) worker_->wake();
  return SendStatus::kOk;
}

std::string EndpointImpl::transports() {
  std::shared_lock<std::shared_mutex> use(ep_mu_);
  if (closed.load(std::memory_order_acquire)) return "";
  // UCX 1.13 has no query for an endpoint's transports; its printout names
  // them on lines like "lane[0]:  2:tcp/lo.0 md[1] ...".
  char* buf = nullptr;
  size_t size = 0;
  FILE* f = open_memstream(&buf, &size);
  if (f == nullptr) return "";
  ucp_ep_print_info(ep, f);
  std::fclose(f);
  std::string text(buf, size);
  std::free(buf);
  std::string out;
  size_t at = 0;
  while ((at = text.find("lane[", at)) != std::string::npos) {
    const size_t colon = text.find(':', text.find(']', at));
    if (colon == std::string::npos) break;
    size_t start = text.find(':', colon + 1);  // "  2:tcp/lo.0": after the resource index
    size_t eol = text.find('\n', at);
    at = colon + 1;
    if (start == std::string::npos || (eol != std::string::npos && start > eol)) continue;
    ++start;
    size_t end = start;
    while (end < text.size() && text[end] != ' ' && text[end] != '\n') ++end;
    std::string tl = text.substr(start, end - start);
    if (!tl.empty() && out.find(tl) == std::string::npos) out += (out.empty() ? "" : ", ") + tl;
  }
  return out;
}

void EndpointImpl::close() {
  std::lock_guard<std::mutex> guard(close_mu_);
  if (finished_) return;  // touches nothing: the core may close before it destroys the worker
  finished_ = true;
  worker_->forget(token_);  // no new receive counts against this endpoint
  ucs_status_ptr_t r;
  {
    std::unique_lock<std::shared_mutex> excl(ep_mu_);
    if (closed.exchange(true, std::memory_order_acq_rel) || ep == nullptr) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    r = ucp_ep_close_nbx(ep, &p);
  }
  worker_->wake();
  const int64_t until = steady_ns() + std::chrono::duration_cast<std::chrono::nanoseconds>(kCloseWait).count();
  if (r != nullptr && !UCS_PTR_IS_ERR(r)) {
    // Only the progress thread progresses the worker: poll the request.
    while (ucp_request_check_status(r) == UCS_INPROGRESS && steady_ns() < until) {
      worker_->wake();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (ucp_request_check_status(r) != UCS_INPROGRESS) ucp_request_free(r);
  }
  // Receives into the core's memory must have ended before the core frees it.
  while (outstanding.load(std::memory_order_acquire) > 0 && steady_ns() < until) {
    worker_->wake();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// --- Entry point --------------------------------------------------------------

Worker* create_worker(Sink* sink, std::string* why) {
  auto w = std::make_unique<WorkerImpl>(sink);
  if (!w->init(why)) return nullptr;
  return w.release();
}

const char* ucx_version() { return ucp_get_version_string(); }

const Plugin kPlugin{kPluginAbi, &create_worker, &ucx_version};

}  // namespace
}  // namespace ucx
}  // namespace fastps

extern "C" __attribute__((visibility("default"))) const fastps::ucx::Plugin* fastps_ucx_plugin_v1() {
  return &fastps::ucx::kPlugin;
}
