#include "protocol/message.h"

#include <cstring>

#include "common/error.h"

namespace fastps {

namespace {

constexpr char kClientLabel[] = "fastps-auth";
constexpr char kServerLabel[] = "fastps-auth-ok";

// Optimizer config flag bits (docs/protocol.md, "Optimizer config block").
constexpr uint8_t kOptimMaximize = 0x01;
constexpr uint8_t kOptimNesterov = 0x02;
constexpr uint8_t kOptimAmsgrad = 0x04;
constexpr uint8_t kOptimDecoupled = 0x08;
constexpr uint8_t kOptimKnownFlags = 0x0f;

Sha256Digest auth_mac(const std::string& secret, const uint8_t* first, const char* label,
                      const uint8_t* second) {
  HmacSha256 mac(secret.data(), secret.size());
  mac.update(first, kNonceSize);
  mac.update(label, std::strlen(label));
  mac.update(second, kNonceSize);
  return mac.finish();
}

// Length of the valid UTF-8 sequence starting at p[0] (at most `left` bytes
// available), or 0 if it is not valid (overlong, surrogate, > U+10FFFF).
size_t utf8_sequence_length(const uint8_t* p, size_t left) {
  uint8_t c = p[0];
  size_t n;
  uint32_t cp;
  if (c < 0x80) return 1;
  if ((c & 0xe0) == 0xc0) {
    n = 2;
    cp = c & 0x1f;
  } else if ((c & 0xf0) == 0xe0) {
    n = 3;
    cp = c & 0x0f;
  } else if ((c & 0xf8) == 0xf0) {
    n = 4;
    cp = c & 0x07;
  } else {
    return 0;
  }
  if (n > left) return 0;
  for (size_t i = 1; i < n; ++i) {
    if ((p[i] & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (p[i] & 0x3f);
  }
  static const uint32_t kMinForLength[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinForLength[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}

}  // namespace

bool is_known_op(uint8_t op) {
  return (op >= 1 && op <= 14) || (op >= 16 && op <= 25) || (op >= 32 && op <= 37);
}

bool is_transport_op(Op op) {
  return op == Op::kShmOffer || op == Op::kShmAccept || op == Op::kShmDecline || op == Op::kHeartbeat ||
         op == Op::kUcxOffer || op == Op::kUcxAccept || op == Op::kUcxDecline;
}

bool is_handshake_op(Op op) {
  return op == Op::kHello || op == Op::kChallenge || op == Op::kAuth || op == Op::kAuthOk;
}

std::string op_name(Op op) {
  switch (op) {
    case Op::kHello: return "HELLO";
    case Op::kChallenge: return "CHALLENGE";
    case Op::kAuth: return "AUTH";
    case Op::kAuthOk: return "AUTH_OK";
    case Op::kError: return "ERROR";
    case Op::kPing: return "PING";
    case Op::kPong: return "PONG";
    case Op::kShmOffer: return "SHM_OFFER";
    case Op::kShmAccept: return "SHM_ACCEPT";
    case Op::kShmDecline: return "SHM_DECLINE";
    case Op::kHeartbeat: return "HEARTBEAT";
    case Op::kUcxOffer: return "UCX_OFFER";
    case Op::kUcxAccept: return "UCX_ACCEPT";
    case Op::kUcxDecline: return "UCX_DECLINE";
    case Op::kRegister: return "REGISTER";
    case Op::kPush: return "PUSH";
    case Op::kPull: return "PULL";
    case Op::kPushPull: return "PUSH_PULL";
    case Op::kReply: return "REPLY";
    case Op::kBarrier: return "BARRIER";
    case Op::kShutdown: return "SHUTDOWN";
    case Op::kStateGet: return "STATE_GET";
    case Op::kStateSet: return "STATE_SET";
    case Op::kApply: return "APPLY";
    case Op::kSparseCreate: return "SPARSE_CREATE";
    case Op::kSparsePull: return "SPARSE_PULL";
    case Op::kSparsePush: return "SPARSE_PUSH";
    case Op::kSparseStats: return "SPARSE_STATS";
    case Op::kSparseExport: return "SPARSE_EXPORT";
    case Op::kSparseLoad: return "SPARSE_LOAD";
  }
  return "op#" + std::to_string(static_cast<unsigned>(op));
}

std::string status_name(uint32_t status) {
  switch (static_cast<Status>(status)) {
    case Status::kOk: return "OK";
    case Status::kProtocol: return "PROTOCOL";
    case Status::kVersion: return "VERSION";
    case Status::kAuth: return "AUTH";
    case Status::kInvalidArgument: return "INVALID_ARGUMENT";
    case Status::kTimeout: return "TIMEOUT";
    case Status::kShuttingDown: return "SHUTTING_DOWN";
    case Status::kLimit: return "LIMIT";
    case Status::kInternal: return "INTERNAL";
  }
  return "status#" + std::to_string(status);
}

bool operator==(const MessageHeader& a, const MessageHeader& b) {
  return a.magic == b.magic && a.version == b.version && a.op == b.op && a.flags == b.flags &&
         a.status == b.status && a.count == b.count && a.request_id == b.request_id &&
         a.key == b.key && a.payload_len == b.payload_len && a.aux == b.aux &&
         a.reserved == b.reserved;
}

uint64_t max_count_for(uint64_t max_payload) {
  uint64_t n = max_payload / 4;
  return n > UINT32_MAX ? UINT32_MAX : n;
}

// Offsets: docs/protocol.md, "Frame header".
void encode_header(const MessageHeader& h, uint8_t out[kHeaderSize]) {
  store_le32(out + 0, h.magic);
  store_le16(out + 4, h.version);
  out[6] = static_cast<uint8_t>(h.op);
  out[7] = h.flags;
  store_le32(out + 8, h.status);
  store_le32(out + 12, h.count);
  store_le64(out + 16, h.request_id);
  store_le64(out + 24, h.key);
  store_le64(out + 32, h.payload_len);
  store_le32(out + 40, h.aux);
  store_le32(out + 44, h.reserved);
}

MessageHeader decode_header(const uint8_t in[kHeaderSize]) {
  MessageHeader h;
  h.magic = load_le32(in + 0);
  h.version = load_le16(in + 4);
  h.op = static_cast<Op>(in[6]);
  h.flags = in[7];
  h.status = load_le32(in + 8);
  h.count = load_le32(in + 12);
  h.request_id = load_le64(in + 16);
  h.key = load_le64(in + 24);
  h.payload_len = load_le64(in + 32);
  h.aux = load_le32(in + 40);
  h.reserved = load_le32(in + 44);
  return h;
}

std::string header_problem(const MessageHeader& h, uint64_t max_payload) {
  using detail::concat;
  if (h.magic != kProtocolMagic) {
    uint8_t wire[4];
    store_le32(wire, h.magic);
    return concat("bad magic: bytes ", to_hex(wire, 4), " where \"FPS1\" (46505331) was expected");
  }
  if (h.version != kProtocolVersion) {
    return concat("protocol version ", h.version, " (this side speaks ", kProtocolVersion, ")");
  }
  uint8_t op = static_cast<uint8_t>(h.op);
  if (!is_known_op(op)) return concat("unknown op ", static_cast<unsigned>(op));
  if (is_handshake_op(h.op)) return concat("handshake op ", op_name(h.op), " after the handshake");
  if ((h.flags & ~kKnownFlags) != 0)
    return concat("undefined flags 0x", to_hex(&h.flags, 1), " in ", op_name(h.op));
  if (h.reserved != 0) return concat("non-zero reserved field in ", op_name(h.op));
  if (h.op == Op::kError && h.status == 0) return "ERROR frame with status 0";
  if (h.op != Op::kError && h.status != 0) {
    return concat(op_name(h.op), " frame with non-zero status ", h.status);
  }
  if (h.payload_len > max_payload) {
    return concat(op_name(h.op), " payload of ", h.payload_len, " bytes exceeds the limit of ",
                  max_payload, " bytes");
  }
  if (h.count > max_count_for(max_payload)) {
    return concat(op_name(h.op), " count ", h.count, " exceeds the limit of ",
                  max_count_for(max_payload));
  }
  if (h.op == Op::kError && h.payload_len > kMaxErrorMessage) {
    return concat("ERROR message of ", h.payload_len, " bytes exceeds the limit of ",
                  kMaxErrorMessage, " bytes");
  }
  return std::string();
}

void validate_header(const MessageHeader& header, uint64_t max_payload) {
  std::string problem = header_problem(header, max_payload);
  if (!problem.empty()) throw ProtocolError(problem);
}

void encode_hello(const Hello& hello, uint8_t out[kHelloSize]) {
  store_le32(out + 0, hello.version);
  store_le32(out + 4, static_cast<uint32_t>(hello.rank));
  store_le64(out + 8, hello.max_payload);
}

Hello decode_hello(const uint8_t* in, size_t len) {
  FASTPS_CHECK_TYPED(ProtocolError, len == kHelloSize, "HELLO payload of ", len,
                     " bytes (expected ", kHelloSize, ")");
  Hello hello;
  hello.version = load_le32(in + 0);
  hello.rank = static_cast<int32_t>(load_le32(in + 4));
  hello.max_payload = load_le64(in + 8);
  return hello;
}

Sha256Digest auth_client_proof(const std::string& secret, const uint8_t* server_nonce,
                               const uint8_t* client_nonce) {
  return auth_mac(secret, server_nonce, kClientLabel, client_nonce);
}

Sha256Digest auth_server_proof(const std::string& secret, const uint8_t* server_nonce,
                               const uint8_t* client_nonce) {
  return auth_mac(secret, client_nonce, kServerLabel, server_nonce);
}

std::string truncate_utf8(const std::string& message, size_t max_bytes) {
  if (message.size() <= max_bytes) return message;
  size_t end = max_bytes;
  // Step back over continuation bytes to the start of the cut character.
  while (end > 0 && (static_cast<uint8_t>(message[end]) & 0xc0) == 0x80) --end;
  return message.substr(0, end);
}

std::string sanitize_error_text(const uint8_t* data, size_t len) {
  std::string out;
  out.reserve(len);
  size_t i = 0;
  while (i < len) {
    size_t n = utf8_sequence_length(data + i, len - i);
    if (n == 0 || (n == 1 && (data[i] < 0x20 || data[i] == 0x7f))) {
      out.push_back('?');
      i += 1;
    } else {
      out.append(reinterpret_cast<const char*>(data + i), n);
      i += n;
    }
  }
  return out;
}

// Offsets: docs/protocol.md, "Optimizer config block".
void encode_optim_config(const OptimHyper& h, uint8_t out[kOptimConfigSize]) {
  std::memset(out, 0, kOptimConfigSize);
  store_le32(out + 0, static_cast<uint32_t>(kOptimConfigSize));
  out[4] = static_cast<uint8_t>(h.kind);
  out[5] = static_cast<uint8_t>((h.maximize ? kOptimMaximize : 0) | (h.nesterov ? kOptimNesterov : 0) |
                                (h.amsgrad ? kOptimAmsgrad : 0) |
                                (h.decoupled_weight_decay ? kOptimDecoupled : 0));
  store_f64(out + 8, h.lr);
  store_f64(out + 16, h.weight_decay);
  store_f64(out + 24, h.momentum);
  store_f64(out + 32, h.dampening);
  store_f64(out + 40, h.beta1);
  store_f64(out + 48, h.beta2);
  store_f64(out + 56, h.eps);
  store_f64(out + 64, h.lr_decay);
  store_f64(out + 72, h.initial_accumulator_value);
}

OptimHyper decode_optim_config(const uint8_t* in, size_t len, size_t* block_size) {
  FASTPS_CHECK_TYPED(ProtocolError, len >= kOptimConfigSize, "optimizer config block of ", len,
                     " bytes (at least ", kOptimConfigSize, " expected)");
  uint32_t size = load_le32(in + 0);
  FASTPS_CHECK_TYPED(ProtocolError, size >= kOptimConfigSize && size <= len,
                     "optimizer config block declares ", size, " bytes (", len, " available, at least ",
                     kOptimConfigSize, " required)");
  FASTPS_CHECK_TYPED(ProtocolError, in[4] <= static_cast<uint8_t>(OptimKind::kAdagrad),
                     "unknown optimizer kind ", static_cast<unsigned>(in[4]));
  FASTPS_CHECK_TYPED(ProtocolError, (in[5] & ~kOptimKnownFlags) == 0,
                     "undefined optimizer flag bits 0x", to_hex(in + 5, 1));
  FASTPS_CHECK_TYPED(ProtocolError, in[6] == 0 && in[7] == 0, "non-zero reserved bytes 0x", to_hex(in + 6, 2),
                     " in an optimizer config block");
  OptimHyper h;
  h.kind = static_cast<OptimKind>(in[4]);
  h.maximize = (in[5] & kOptimMaximize) != 0;
  h.nesterov = (in[5] & kOptimNesterov) != 0;
  h.amsgrad = (in[5] & kOptimAmsgrad) != 0;
  h.decoupled_weight_decay = (in[5] & kOptimDecoupled) != 0;
  h.lr = load_f64(in + 8);
  h.weight_decay = load_f64(in + 16);
  h.momentum = load_f64(in + 24);
  h.dampening = load_f64(in + 32);
  h.beta1 = load_f64(in + 40);
  h.beta2 = load_f64(in + 48);
  h.eps = load_f64(in + 56);
  h.lr_decay = load_f64(in + 64);
  h.initial_accumulator_value = load_f64(in + 72);
  if (block_size != nullptr) *block_size = size;
  return h;
}

}  // namespace fastps
