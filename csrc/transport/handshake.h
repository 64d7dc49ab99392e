// The connection handshake of docs/protocol.md ("Handshake"): HELLO,
// CHALLENGE, AUTH, AUTH_OK, an HMAC challenge on the per-job secret in both
// directions. Written once for every transport: the client side runs over any
// BlockingStream; the server side is a set of checks on received frames that
// return the reply to send, so an event loop (TCP) or a worker thread (a
// future UCX transport) can drive it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/sha256.h"
#include "protocol/message.h"

namespace fastps {

// Cryptographic randomness from the kernel (getrandom, or /dev/urandom).
// Throws Error if neither gives bytes.
void fill_random(uint8_t* out, size_t len);

// A connected byte stream for the client handshake: blocking, each call
// bounded by the stream's own deadline (TimeoutError), ConnectionError when
// the peer goes away. where() names the peer in messages ("host:port").
class BlockingStream {
 public:
  virtual ~BlockingStream() = default;
  virtual void write_all(const uint8_t* data, size_t len) = 0;
  virtual void read_exact(uint8_t* data, size_t len) = 0;
  virtual const std::string& where() const = 0;
};

// Writes one frame (header `h` with payload_len filled in, then the payload).
void write_handshake_frame(BlockingStream& s, MessageHeader h, const uint8_t* payload, size_t len);

// Client side: HELLO (announcing `rank` and `max_payload`), CHALLENGE, AUTH,
// AUTH_OK. Returns the server's max_payload (capped at kMaxMaxPayload).
// Throws ConnectionError (refused, closed, authentication failed),
// ProtocolError (not a fastps server, version mismatch) or TimeoutError, each
// naming s.where().
uint64_t client_handshake(BlockingStream& s, const std::string& secret, uint64_t max_payload, int rank);

// The client side of an offer right after AUTH_OK (SHM_OFFER, UCX_OFFER:
// docs/protocol.md): writes the `offer` frame with `payload`, reads the
// answer (at most `max_answer` payload bytes). `accepted` is true for an
// `accept` answer (its payload in `payload`), false for a `decline` one (its
// text in `reason`). An ERROR answer throws ConnectionError, anything else
// ProtocolError, each naming s.where() and `what` ("shared-memory", "UCX").
struct OfferAnswer {
  bool accepted = false;
  std::vector<uint8_t> payload;
  std::string reason;
};
OfferAnswer exchange_offer(BlockingStream& s, Op offer, const std::vector<uint8_t>& payload, Op accept, Op decline,
                           size_t max_answer, const char* what);

// The outcome of a server-side check: ok, or the status and reason of the
// ERROR frame to send before closing.
struct HandshakeCheck {
  Status status = Status::kOk;
  std::string problem;
  bool ok() const { return problem.empty(); }
};

// Server side, one accepted connection. Drive it with the frames that arrive
// (first HELLO, then AUTH); each call returns the frame to answer with in
// *reply_header / *reply_payload when the check passes.
class ServerHandshake {
 public:
  // The header of the next frame, before its payload is read: only the
  // expected op, with at most kMaxHandshakePayload bytes.
  HandshakeCheck check_header(const MessageHeader& h) const;
  // HELLO: version checks; the reply is CHALLENGE (a fresh nonce and this
  // side's `max_payload`).
  HandshakeCheck on_hello(const Message& frame, uint64_t max_payload, MessageHeader* reply_header,
                          std::vector<uint8_t>* reply_payload);
  // AUTH: the client's proof of `secret`; the reply is AUTH_OK with ours.
  HandshakeCheck on_auth(const Message& frame, const std::string& secret, MessageHeader* reply_header,
                         std::vector<uint8_t>* reply_payload);

  bool done() const { return stage_ == Stage::kDone; }
  // What the client announced in HELLO.
  int rank() const { return rank_; }
  uint64_t peer_max_payload() const { return peer_max_payload_; }

 private:
  enum class Stage { kAwaitHello, kAwaitAuth, kDone };
  Stage stage_ = Stage::kAwaitHello;
  int rank_ = -1;
  uint64_t peer_max_payload_ = kMinMaxPayload;
  uint8_t server_nonce_[kNonceSize] = {};
};

}  // namespace fastps
