#include "transport/handshake.h"

#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>

#include "common/error.h"

namespace fastps {

using detail::concat;

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

void write_handshake_frame(BlockingStream& s, MessageHeader h, const uint8_t* payload, size_t len) {
  h.payload_len = len;
  std::vector<uint8_t> bytes(kHeaderSize + len);
  encode_header(h, bytes.data());
  if (len > 0) std::memcpy(bytes.data() + kHeaderSize, payload, len);
  s.write_all(bytes.data(), bytes.size());
}

namespace {

// Reads one handshake frame; ERROR frames from the server become exceptions.
Message read_handshake_frame(BlockingStream& s, Op expected, size_t expected_len) {
  const std::string& where = s.where();
  uint8_t hb[kHeaderSize];
  s.read_exact(hb, kHeaderSize);
  Message m;
  m.header = decode_header(hb);
  const MessageHeader& h = m.header;
  FASTPS_CHECK_TYPED(ProtocolError, h.magic == kProtocolMagic, "fastps: ", where,
                     " is not a fastps server (", header_problem(h, 0), ")");
  FASTPS_CHECK_TYPED(ProtocolError, h.payload_len <= kMaxHandshakePayload, "fastps: ", where,
                     " sent a ", h.payload_len, "-byte handshake frame (limit ", kMaxHandshakePayload, ")");
  m.payload.resize(h.payload_len);
  s.read_exact(m.payload.data(), m.payload.size());
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

}  // namespace

OfferAnswer exchange_offer(BlockingStream& s, Op offer, const std::vector<uint8_t>& payload, Op accept, Op decline,
                           size_t max_answer, const char* what) {
  const std::string& where = s.where();
  MessageHeader h;
  h.op = offer;
  write_handshake_frame(s, h, payload.data(), payload.size());
  uint8_t hb[kHeaderSize];
  s.read_exact(hb, kHeaderSize);
  MessageHeader r = decode_header(hb);
  FASTPS_CHECK_TYPED(ProtocolError, r.magic == kProtocolMagic && r.payload_len <= max_answer, "fastps: ", where,
                     " answered the ", what, " offer with an invalid frame (", header_problem(r, max_answer), ")");
  OfferAnswer a;
  a.payload.resize(r.payload_len);
  s.read_exact(a.payload.data(), a.payload.size());
  if (r.op == accept) {
    a.accepted = true;
    return a;
  }
  a.reason = sanitize_error_text(a.payload.data(), a.payload.size());
  if (r.op == decline) return a;
  if (r.op == Op::kError) {
    throw ConnectionError(concat("fastps: ", where, " refused the ", what, " offer (", status_name(r.status), "): ",
                                 a.reason));
  }
  throw ProtocolError(concat("fastps: ", where, " answered the ", what, " offer with ", op_name(r.op)));
}

uint64_t client_handshake(BlockingStream& s, const std::string& secret, uint64_t max_payload, int rank) {
  const std::string& where = s.where();
  Hello hello;
  hello.rank = rank;
  hello.max_payload = max_payload;
  uint8_t hello_bytes[kHelloSize];
  encode_hello(hello, hello_bytes);
  MessageHeader h;
  h.op = Op::kHello;
  write_handshake_frame(s, h, hello_bytes, sizeof(hello_bytes));

  Message challenge = read_handshake_frame(s, Op::kChallenge, kChallengeSize);
  const uint8_t* server_nonce = challenge.payload.data();
  uint64_t server_max = load_le64(challenge.payload.data() + kNonceSize);
  FASTPS_CHECK_TYPED(ProtocolError, server_max >= kMinMaxPayload, "fastps: ", where,
                     " announced a max payload of ", server_max, " bytes (at least ", kMinMaxPayload,
                     " required)");

  uint8_t auth[kAuthSize];
  uint8_t* client_nonce = auth + kSha256DigestSize;
  fill_random(client_nonce, kNonceSize);
  Sha256Digest mac = auth_client_proof(secret, server_nonce, client_nonce);
  std::memcpy(auth, mac.data(), mac.size());
  h.op = Op::kAuth;
  write_handshake_frame(s, h, auth, sizeof(auth));

  Message ok = read_handshake_frame(s, Op::kAuthOk, kAuthOkSize);
  Sha256Digest expected = auth_server_proof(secret, server_nonce, client_nonce);
  FASTPS_CHECK_TYPED(ConnectionError, constant_time_equal(expected.data(), ok.payload.data(), kAuthOkSize),
                     "fastps: ", where,
                     " failed to authenticate itself: it does not know this job's secret");
  return std::min<uint64_t>(server_max, kMaxMaxPayload);
}

HandshakeCheck ServerHandshake::check_header(const MessageHeader& h) const {
  HandshakeCheck c;
  c.status = Status::kProtocol;
  const Op expected = stage_ == Stage::kAwaitHello ? Op::kHello : Op::kAuth;
  if (h.magic != kProtocolMagic) {
    c.problem = header_problem(h, 0);
  } else if (h.payload_len > kMaxHandshakePayload) {
    c.problem = concat("a ", h.payload_len, "-byte frame before authentication (limit ", kMaxHandshakePayload, ")");
  } else if (h.op != expected || stage_ == Stage::kDone) {
    c.problem = concat("expected ", op_name(expected), ", got ", op_name(h.op), " during the handshake");
  }
  return c;
}

HandshakeCheck ServerHandshake::on_hello(const Message& frame, uint64_t max_payload, MessageHeader* reply_header,
                                         std::vector<uint8_t>* reply_payload) {
  const MessageHeader& h = frame.header;
  if (h.version != kProtocolVersion) {
    return {Status::kVersion, concat("protocol version mismatch: the client speaks fastps protocol version ",
                                     h.version, ", this server speaks version ", kProtocolVersion,
                                     " (install the same fastps release on every host)")};
  }
  Hello hello;
  try {
    hello = decode_hello(frame.payload.data(), frame.payload.size());
  } catch (const ProtocolError& ex) {
    return {Status::kProtocol, ex.what()};
  }
  if (hello.version != kProtocolVersion) {
    return {Status::kVersion, concat("protocol version mismatch: the client's HELLO says version ", hello.version,
                                     ", this server speaks version ", kProtocolVersion)};
  }
  if (hello.max_payload < kMinMaxPayload) {
    return {Status::kProtocol, concat("client announced a max payload of ", hello.max_payload, " bytes (at least ",
                                      kMinMaxPayload, " required)")};
  }
  rank_ = hello.rank;
  peer_max_payload_ = std::min<uint64_t>(hello.max_payload, kMaxMaxPayload);
  try {
    fill_random(server_nonce_, kNonceSize);
  } catch (const std::exception& ex) {
    return {Status::kInternal, ex.what()};
  }
  reply_payload->resize(kChallengeSize);
  std::memcpy(reply_payload->data(), server_nonce_, kNonceSize);
  store_le64(reply_payload->data() + kNonceSize, max_payload);
  *reply_header = MessageHeader();
  reply_header->op = Op::kChallenge;
  stage_ = Stage::kAwaitAuth;
  return {};
}

HandshakeCheck ServerHandshake::on_auth(const Message& frame, const std::string& secret, MessageHeader* reply_header,
                                        std::vector<uint8_t>* reply_payload) {
  if (frame.header.version != kProtocolVersion || frame.payload.size() != kAuthSize) {
    return {Status::kProtocol, concat("malformed AUTH frame (version ", frame.header.version, ", ",
                                      frame.payload.size(), " bytes)")};
  }
  const uint8_t* client_mac = frame.payload.data();
  const uint8_t* client_nonce = frame.payload.data() + kSha256DigestSize;
  Sha256Digest expected = auth_client_proof(secret, server_nonce_, client_nonce);
  if (!constant_time_equal(expected.data(), client_mac, kSha256DigestSize)) {
    return {Status::kAuth,
            "authentication failed: the client's secret does not match this server's (every process of "
            "a job must use the same secret)"};
  }
  Sha256Digest proof = auth_server_proof(secret, server_nonce_, client_nonce);
  reply_payload->assign(proof.begin(), proof.end());
  *reply_header = MessageHeader();
  reply_header->op = Op::kAuthOk;
  stage_ = Stage::kDone;
  return {};
}

}  // namespace fastps
