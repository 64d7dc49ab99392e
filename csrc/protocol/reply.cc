#include "protocol/reply.h"

#include <cstring>
#include <exception>

#include "common/error.h"

namespace fastps {

bool DeliveryGate::enter() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return false;
  ++active_;
  return true;
}

void DeliveryGate::leave() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --active_;
  }
  cv_.notify_all();
}

void DeliveryGate::close() {
  std::unique_lock<std::mutex> lock(mu_);
  closed_ = true;
  // A delivery under way ends: a copy finishes, a receive completes or its
  // connection fails (the transport's own deadlines bound both).
  cv_.wait(lock, [&] { return active_ == 0; });
}

namespace {

// The exception an ERROR frame from the server raises in the requester.
std::exception_ptr reply_error(const ReplyTo& to, const MessageHeader& h, const void* data, size_t bytes) {
  const std::string msg = sanitize_error_text(static_cast<const uint8_t*>(data), bytes);
  const std::string where = "fastps: " + (to.peer ? *to.peer : std::string("parameter server")) + ": ";
  if (h.status == uint32_t(Status::kTimeout)) return std::make_exception_ptr(ConnectionError(where + msg));
  if (h.status == uint32_t(Status::kLimit)) return std::make_exception_ptr(CapacityError(where + msg));
  return std::make_exception_ptr(InvalidArgument(where + msg));
}

// Writes the payload into `t`; ProtocolError if its size is not the expected one.
void write_target(const ReplyTarget& t, int server, const MessageHeader& h, const void* data, size_t bytes) {
  if (t.raw) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    t.raw->bytes.assign(p, p + bytes);
    t.raw->count = h.count;
    return;
  }
  if (t.rows) {
    const int64_t m = int64_t(t.rows->size());
    FASTPS_CHECK_TYPED(ProtocolError, bytes == size_t(m) * size_t(t.dim) * 4, "fastps: parameter server ", server,
                       " answered a sparse pull of ", m, " rows of dim ", t.dim, " with ", bytes, " bytes");
    const float* rows = static_cast<const float*>(data);
    for (int64_t k = 0; k < m; ++k)
      std::memcpy(t.dst + (*t.rows)[size_t(k)] * t.dim, rows + k * t.dim, size_t(t.dim) * 4);
    return;
  }
  if (t.count > 0) {
    FASTPS_CHECK_TYPED(ProtocolError, bytes == size_t(t.count) * 4, "fastps: parameter server ", server,
                       " replied with ", bytes, " bytes where ", t.count * 4, " were expected");
    if (data != t.dst) std::memcpy(t.dst, data, bytes);
  }
}

}  // namespace

void deliver_reply(const ReplyTo& to, bool entered, const MessageHeader& h, const void* data, size_t bytes) {
  // Writes into the caller's memory happen inside the gate (see DeliveryGate):
  // a receive in place entered it already; a copy enters it here.
  if (!entered && to.gate && h.op != Op::kError && to.target.writes()) {
    if (!to.gate->enter()) {  // the caller timed out and may have freed its buffers
      to.completion->done(std::make_exception_ptr(TimeoutError("fastps: reply after the deadline")));
      return;
    }
    entered = true;
  }
  struct Leave {
    DeliveryGate* gate;
    ~Leave() {
      if (gate) gate->leave();
    }
  } leave{entered ? to.gate.get() : nullptr};
  if (h.op == Op::kError) {
    to.completion->done(reply_error(to, h, data, bytes));
    return;
  }
  try {
    write_target(to.target, to.server, h, data, bytes);
  } catch (const Error&) {
    to.completion->done(std::current_exception());
    return;
  }
  to.completion->done();
}

}  // namespace fastps
