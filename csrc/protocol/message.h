// The fastps frame: a fixed 48-byte little-endian header plus a payload.
// docs/protocol.md is the specification; this file is its code. Encoding and
// decoding go byte by byte, so the wire format does not depend on the host's
// byte order or on struct layout.
//
// Thread safety: everything here is a pure function of its arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/sha256.h"
#include "table/optimizer.h"

namespace fastps {

constexpr uint32_t kProtocolMagic = 0x31535046;  // the bytes "FPS1" on the wire
constexpr uint16_t kProtocolVersion = 2;  // 2: HEARTBEAT, revocable by-reference frames
constexpr size_t kHeaderSize = 48;

// Limits (see docs/protocol.md, "Limits").
constexpr uint64_t kDefaultMaxPayload = uint64_t{1} << 30;  // 1 GiB
constexpr uint64_t kMinMaxPayload = 4096;                   // smallest allowed setting
constexpr uint64_t kMaxMaxPayload = uint64_t{1} << 40;      // largest allowed setting
constexpr size_t kMaxErrorMessage = 4096;                   // bytes of an ERROR payload
constexpr size_t kMaxHandshakePayload = 4096;               // any frame before AUTH_OK

// Handshake payload sizes.
constexpr size_t kNonceSize = 32;
constexpr size_t kHelloSize = 16;                          // u32 version, i32 rank, u64 max_payload
constexpr size_t kChallengeSize = kNonceSize + 8;          // nonce_s, u64 max_payload
constexpr size_t kAuthSize = kSha256DigestSize + kNonceSize;  // mac_c, nonce_c
constexpr size_t kAuthOkSize = kSha256DigestSize;          // mac_s

// Size of the optimizer config block at the start of a REGISTER payload.
constexpr size_t kOptimConfigSize = 80;

// Operation codes; numbers are fixed by docs/protocol.md.
enum class Op : uint8_t {
  kHello = 1,
  kChallenge = 2,
  kAuth = 3,
  kAuthOk = 4,
  kError = 5,
  kPing = 6,
  kPong = 7,
  kShmOffer = 8,    // client -> server after AUTH_OK: use these shared-memory rings
  kShmAccept = 9,   // server -> client: rings mapped; every later frame goes through them
  kShmDecline = 10, // server -> client: stay on TCP (payload: the reason, as text)
  kHeartbeat = 11,  // either way on an idle socket: "still here" (Note [Liveness] in transport/tcp.h)
  kUcxOffer = 12,   // client -> server after AUTH_OK: carry frames over UCX (transport/ucx_transport.h)
  kUcxAccept = 13,  // server -> client: endpoint made; every later frame goes over UCX
  kUcxDecline = 14, // server -> client: stay on TCP (payload: the reason, as text)
  kRegister = 16,
  kPush = 17,
  kPull = 18,
  kPushPull = 19,
  kReply = 20,
  kBarrier = 21,
  kShutdown = 22,
  kStateGet = 23,
  kStateSet = 24,
  kApply = 25,      // the step of a deferred round (Note [Deferred apply] in server/dense_service.cc)
  // Sparse tables (32-63; see docs/protocol.md "Sparse tables").
  kSparseCreate = 32,
  kSparsePull = 33,
  kSparsePush = 34,
  kSparseStats = 35,
  kSparseExport = 36,
  kSparseLoad = 37,
};

// Header flag bits (docs/protocol.md, "Flags"). Any other bit is a protocol error.
constexpr uint8_t kFlagConfig = 0x01;  // PUSH/PUSH_PULL/REGISTER/APPLY: payload starts with a config block
constexpr uint8_t kFlagSkip = 0x02;    // PUSH/PUSH_PULL/APPLY: no gradient this round (counts as a push)
constexpr uint8_t kFlagSum = 0x04;     // REGISTER: an aggregation-only chunk (no optimizer)
constexpr uint8_t kFlagDeferred = 0x08;  // PUSH_PULL: reply with the round's mean; apply at APPLY
constexpr uint8_t kFlagScale = 0x10;     // APPLY: the contribution is one float32 scale of the mean
constexpr uint8_t kKnownFlags = kFlagConfig | kFlagSkip | kFlagSum | kFlagDeferred | kFlagScale;

// STATE_GET / STATE_SET: `aux` names the buffer: 0 the parameter,
// 1..kMaxStateBuffers the optimizer state, kStepCounterBuffer the chunk's
// step counter (one float). Python reads it as fastps._C.STEP_COUNTER_BUFFER.
constexpr uint32_t kStepCounterBuffer = 255;

// Status codes of ERROR frames (0 everywhere else).
enum class Status : uint32_t {
  kOk = 0,
  kProtocol = 1,
  kVersion = 2,
  kAuth = 3,
  kInvalidArgument = 4,
  kTimeout = 5,
  kShuttingDown = 6,
  kLimit = 7,
  kInternal = 8,
};

bool is_known_op(uint8_t op);
// HELLO, CHALLENGE, AUTH, AUTH_OK: valid only before the handshake completes.
bool is_handshake_op(Op op);
// SHM_OFFER, SHM_ACCEPT, SHM_DECLINE, HEARTBEAT, UCX_OFFER, UCX_ACCEPT,
// UCX_DECLINE: sent by transports themselves, never by their users
// (Transport::send() refuses them).
bool is_transport_op(Op op);
// SHM_OFFER payload: u64 ring_bytes, token, then the segment name (no NUL).
constexpr size_t kShmOfferFixedSize = 8 + 32;
constexpr size_t kShmMaxNameSize = 255;
// UCX_OFFER and UCX_ACCEPT payload: u64 the sender's connection token, then
// its UCP worker address (at most kUcxMaxAddressSize bytes).
constexpr size_t kUcxOfferFixedSize = 8;
constexpr size_t kUcxMaxAddressSize = 64 << 10;
// "PUSH", "ERROR", ...; "op#<n>" for unknown values.
std::string op_name(Op op);
// "AUTH", "LIMIT", ...; "status#<n>" for unknown values.
std::string status_name(uint32_t status);

struct MessageHeader {
  uint32_t magic = kProtocolMagic;
  uint16_t version = kProtocolVersion;
  Op op = Op::kPing;
  uint8_t flags = 0;
  uint32_t status = 0;
  uint32_t count = 0;
  uint64_t request_id = 0;
  uint64_t key = 0;
  uint64_t payload_len = 0;
  uint32_t aux = 0;
  uint32_t reserved = 0;
};

bool operator==(const MessageHeader& a, const MessageHeader& b);
inline bool operator!=(const MessageHeader& a, const MessageHeader& b) { return !(a == b); }

// A received frame. `payload` is allocated once, after the header's
// payload_len was checked against the receiver's limit.
// An allocator that leaves new bytes uninitialised: a received payload is
// overwritten by recv() at once, so zero-filling it first would only cost a
// pass over memory (and page faults) per frame.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <typename U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using Payload = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

struct Message {
  MessageHeader header;
  Payload payload;
  // Non-null when the transport received the payload straight into memory a
  // PayloadTarget chose (header.payload_len bytes there); `payload` is empty.
  // A request from a colocated worker (never from a transport) may be split:
  // its first `in_place_offset` bytes (an optimizer config block) copied
  // into `payload`, the rest read in place at `in_place`.
  uint8_t* in_place = nullptr;
  size_t in_place_offset = 0;
};

// A piece of an outgoing payload; the bytes are read in place (never copied)
// and must stay valid until the send call returns.
struct ConstBuffer {
  const void* data = nullptr;
  size_t size = 0;
};

// Largest `count` a frame may carry under a given payload limit (max_payload/4).
uint64_t max_count_for(uint64_t max_payload);

void encode_header(const MessageHeader& header, uint8_t out[kHeaderSize]);
// Parses the bytes only; see validate_header() for the checks.
MessageHeader decode_header(const uint8_t in[kHeaderSize]);

// Why `header` is not a valid post-handshake frame under `max_payload`, or an
// empty string if it is. Checks magic, version, op, flags, reserved, status,
// payload_len, count and the ERROR message length.
std::string header_problem(const MessageHeader& header, uint64_t max_payload);
// Throws ProtocolError with header_problem()'s text if there is one.
void validate_header(const MessageHeader& header, uint64_t max_payload);

// Little-endian integer access used by the codecs (explicit byte handling).
inline void store_le16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline void store_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void store_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t load_le16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}
inline uint32_t load_le32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}
// A double as its IEEE-754 bits, little-endian.
inline void store_f64(uint8_t* p, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  store_le64(p, bits);
}
inline double load_f64(const uint8_t* p) {
  const uint64_t bits = load_le64(p);
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// --- Handshake payloads (docs/protocol.md, "Handshake") ---

struct Hello {
  uint32_t version = kProtocolVersion;
  int32_t rank = -1;
  uint64_t max_payload = kDefaultMaxPayload;
};
void encode_hello(const Hello& hello, uint8_t out[kHelloSize]);
// Throws ProtocolError unless len == kHelloSize.
Hello decode_hello(const uint8_t* in, size_t len);

// mac_c = HMAC(secret, nonce_s || "fastps-auth" || nonce_c)
Sha256Digest auth_client_proof(const std::string& secret, const uint8_t* server_nonce,
                               const uint8_t* client_nonce);
// mac_s = HMAC(secret, nonce_c || "fastps-auth-ok" || nonce_s)
Sha256Digest auth_server_proof(const std::string& secret, const uint8_t* server_nonce,
                               const uint8_t* client_nonce);

// --- Error messages ---

// `message` cut to at most `max_bytes` bytes without splitting a UTF-8
// character.
std::string truncate_utf8(const std::string& message, size_t max_bytes = kMaxErrorMessage);
// The payload of an ERROR frame as printable text: invalid UTF-8 and control
// characters become '?'.
std::string sanitize_error_text(const uint8_t* data, size_t len);

// --- REGISTER optimizer config block (docs/protocol.md) ---

void encode_optim_config(const OptimHyper& hyper, uint8_t out[kOptimConfigSize]);
// Throws ProtocolError if the block is shorter than it says, says less than
// kOptimConfigSize, names an unknown kind or sets undefined flag bits.
// Returns the hyperparameters; *block_size (if given) receives the block's
// declared size, where the float values start.
OptimHyper decode_optim_config(const uint8_t* in, size_t len, size_t* block_size = nullptr);

}  // namespace fastps
