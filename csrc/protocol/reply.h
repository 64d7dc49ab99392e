// What a requester does with a reply: where its payload lands and what error
// it raises. Shared by the two endpoints a client reaches a server through
// (Note [Endpoints] in protocol/local_endpoint.h): the transport's loop
// thread delivers a remote server's replies, the answering shard a local
// server's, both with deliver_reply().
//
// Everything here is data: a request carries where its reply goes
// (ReplyTarget) and the Completion its caller waits on, never code of the
// requester's.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/completion.h"
#include "protocol/message.h"

namespace fastps {

// Shared by a request's Future and its pending replies. Once a wait has
// timed out the caller may free the buffers the replies were to fill, so a
// timed-out wait closes the gate: later replies are dropped, and a delivery
// already under way (a payload being received in place, a copy) is waited
// out first. Never takes the client's lock (the client takes this one inside
// its own).
class DeliveryGate {
 public:
  // Before writing into the caller's buffers; false once closed.
  bool enter();
  void leave();
  // Closes the gate and returns once no delivery is under way.
  void close();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  int active_ = 0;
};
using DeliveryGatePtr = std::shared_ptr<DeliveryGate>;

// A reply's payload kept whole, for the caller to decode once the request
// completed (SPARSE_STATS, SPARSE_EXPORT), with the reply's count.
struct RawReply {
  std::vector<uint8_t> bytes;
  uint32_t count = 0;
};

// Where a reply's payload goes; at most one of the three.
struct ReplyTarget {
  // Values: `count` floats land at dst (0: an acknowledgement only). With
  // `rows`, row k of the reply (dim floats) lands at dst + (*rows)[k] * dim
  // instead (a sparse pull split over servers).
  float* dst = nullptr;
  int64_t count = 0;
  std::shared_ptr<const std::vector<int64_t>> rows;
  int64_t dim = 0;
  std::shared_ptr<RawReply> raw;

  // Does a reply write into memory the caller may free (so through the gate)?
  bool writes() const { return raw != nullptr || rows != nullptr || count > 0; }
  // May the transport receive the payload straight into dst?
  bool in_place() const { return dst != nullptr && rows == nullptr && raw == nullptr; }
};

// A request in flight: who waits for it and where its reply goes.
struct ReplyTo {
  CompletionPtr completion;
  DeliveryGatePtr gate;
  ReplyTarget target;
  int server = -1;                         // the server's index, for errors
  std::shared_ptr<const std::string> peer;  // "parameter server 0 (host:port)", for errors
};

// Delivers reply `h` (payload `data`, `bytes`) of the request `to`: an ERROR
// frame fails it with the error its status names; values land in its target
// (inside the gate); then its completion is done. `entered`: the gate was
// entered already (the payload was received in place). Never throws.
void deliver_reply(const ReplyTo& to, bool entered, const MessageHeader& h, const void* data, size_t bytes);

}  // namespace fastps
