// Self-test of the transport layer: SHA-256/HMAC vectors, frame codecs and
// limits, and the TCP transport over loopback (echo, pipelining, several
// connections per peer, and every misbehaving peer the protocol names), and
// its shared-memory path (rings smaller than the frames, fallback, forced
// mode, a blocked writer failed by a close), send queues (a peer that does
// not read slows only itself) and liveness (heartbeats, silent peers
// closed). Clean under -fsanitize=thread.
//
// Standalone: builds from csrc/ only (see tests/cpp/CMakeLists.txt), runs in a
// few seconds, prints "N passed, M failed" and exits non-zero on failure. The
// "fastps: closing connection ..." lines on stderr are expected: they are the
// server logging the peers that the tests make misbehave.
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/sha256.h"
#include "protocol/message.h"
#include "transport/shm.h"
#include "transport/transport.h"
#include "transport/ucx_transport.h"

using namespace fastps;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

// --- Minimal harness -----------------------------------------------------------

namespace {

int g_check_failures = 0;

void check_failed(const char* what, const char* file, int line) {
  ++g_check_failures;
  std::fprintf(stderr, "  CHECK FAILED: %s at %s:%d\n", what, file, line);
}

#define CHECK(cond)                                        \
  do {                                                     \
    if (!(cond)) check_failed(#cond, __FILE__, __LINE__);  \
  } while (0)

// Runs `stmt`, expects an exception of `type` whose what() contains `text`.
#define CHECK_THROWS(type, text, stmt)                                                        \
  do {                                                                                        \
    bool caught_ = false;                                                                     \
    try {                                                                                     \
      stmt;                                                                                   \
    } catch (const type& e_) {                                                                \
      caught_ = true;                                                                         \
      const std::string text_ = (text);                                                       \
      if (std::string(e_.what()).find(text_) == std::string::npos) {                          \
        std::fprintf(stderr, "  message was: %s\n", e_.what());                              \
        check_failed(("message contains \"" + text_ + "\"").c_str(), __FILE__, __LINE__);     \
      }                                                                                       \
    } catch (const std::exception& e_) {                                                      \
      std::fprintf(stderr, "  wrong exception: %s\n", e_.what());                            \
    }                                                                                         \
    if (!caught_) check_failed(#stmt " throws " #type, __FILE__, __LINE__);                   \
  } while (0)

struct TestCase {
  const char* name;
  std::function<void()> fn;
};

std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

#define TEST(name)                              \
  void test_##name();                           \
  Register register_##name(#name, test_##name); \
  void test_##name()

std::string hex(const Sha256Digest& d) { return to_hex(d.data(), d.size()); }

std::vector<uint8_t> bytes_of(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

// --- Helpers for transport tests -------------------------------------------------

TransportOptions opts(const std::string& secret = "job-secret") {
  TransportOptions o;
  o.secret = secret;
  o.timeout = Ms(5000);
  return o;
}

// Collects frames and disconnects delivered by a Transport.
struct Inbox {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<ConnId, Message>> frames;
  std::vector<std::pair<ConnId, std::string>> disconnects;

  void attach(Transport& t) {
    t.set_handler([this](ConnId c, Message&& m) {
      std::lock_guard<std::mutex> lock(mu);
      frames.emplace_back(c, std::move(m));
      cv.notify_all();
    });
    t.set_disconnect_handler([this](ConnId c, const std::string& reason) {
      std::lock_guard<std::mutex> lock(mu);
      disconnects.emplace_back(c, reason);
      cv.notify_all();
    });
  }
  bool wait_frames(size_t n, Ms timeout = Ms(5000)) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [&] { return frames.size() >= n; });
  }
  bool wait_disconnects(size_t n, Ms timeout = Ms(3000)) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [&] { return disconnects.size() >= n; });
  }
  Message pop() {
    std::lock_guard<std::mutex> lock(mu);
    Message m = std::move(frames.front().second);
    frames.pop_front();
    return m;
  }
  std::string last_reason() {
    std::lock_guard<std::mutex> lock(mu);
    return disconnects.empty() ? std::string() : disconnects.back().second;
  }
  size_t disconnect_count() {
    std::lock_guard<std::mutex> lock(mu);
    return disconnects.size();
  }
  // The first disconnect reason containing `text`, once there is one.
  std::string wait_reason(const std::string& text, Ms timeout = Ms(3000)) {
    std::unique_lock<std::mutex> lock(mu);
    std::string found;
    cv.wait_for(lock, timeout, [&] {
      for (auto& d : disconnects)
        if (d.second.find(text) != std::string::npos) found = d.second;
      return !found.empty();
    });
    if (found.empty())
      for (auto& d : disconnects) std::fprintf(stderr, "  (disconnect: %s)\n", d.second.c_str());
    return found;
  }
};

// A server that answers every frame with a REPLY (PONG for PING) carrying the
// same request_id, key, count and payload. Sends from the loop thread.
struct EchoServer {
  std::unique_ptr<Transport> t;
  uint16_t port = 0;
  Inbox events;  // only disconnects are recorded
  std::atomic<uint64_t> frames{0};

  // The transport goes first: its loop thread uses the members below.
  ~EchoServer() { t.reset(); }

  explicit EchoServer(const TransportOptions& o = opts(), const char* kind = "tcp") {
    t = Transport::create(kind, o);
    // The handler uses a pointer that never changes: `t` itself is written
    // by reset() while the handler threads may still run.
    Transport* raw = t.get();
    t->set_handler([this, raw](ConnId c, Message&& m) {
      frames.fetch_add(1);
      MessageHeader h = m.header;
      h.op = m.header.op == Op::kPing ? Op::kPong : Op::kReply;
      ConstBuffer seg{m.payload.data(), m.payload.size()};
      raw->send(c, h, &seg, m.payload.empty() ? 0 : 1);
    });
    t->set_disconnect_handler([this](ConnId c, const std::string& reason) {
      std::lock_guard<std::mutex> lock(events.mu);
      events.disconnects.emplace_back(c, reason);
      events.cv.notify_all();
    });
    port = t->listen("127.0.0.1", 0);
  }
};

// A client that sends one frame and waits for its echo; true if the bytes match.
bool echo_roundtrip(uint16_t port, const std::string& secret = "job-secret") {
  Inbox in;
  auto t = Transport::create("tcp", opts(secret));
  in.attach(*t);
  ConnId c = t->connect("127.0.0.1", port, 3);
  std::string text = "hello, parameter server";
  MessageHeader h;
  h.op = Op::kPush;
  h.request_id = 77;
  h.key = 5;
  ConstBuffer seg{text.data(), text.size()};
  t->send(c, h, &seg, 1);
  if (!in.wait_frames(1)) return false;
  Message m = in.pop();
  return m.header.op == Op::kReply && m.header.request_id == 77 && m.header.key == 5 &&
         [&] { auto b = bytes_of(text); return std::equal(m.payload.begin(), m.payload.end(), b.begin(), b.end()); }();
}

// --- Raw sockets: peers that do not follow the rules -----------------------------

int raw_connect(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return fd;
}

bool raw_write(int fd, const void* data, size_t len) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (len > 0) {
    ssize_t r = ::send(fd, p, len, MSG_NOSIGNAL);
    if (r <= 0) return false;
    p += r;
    len -= static_cast<size_t>(r);
  }
  return true;
}

bool raw_read(int fd, void* data, size_t len) {
  uint8_t* p = static_cast<uint8_t*>(data);
  while (len > 0) {
    ssize_t r = ::recv(fd, p, len, 0);
    if (r <= 0) return false;
    p += r;
    len -= static_cast<size_t>(r);
  }
  return true;
}

bool raw_send_frame(int fd, MessageHeader h, const std::vector<uint8_t>& payload) {
  h.payload_len = payload.size();
  uint8_t hb[kHeaderSize];
  encode_header(h, hb);
  return raw_write(fd, hb, kHeaderSize) && raw_write(fd, payload.data(), payload.size());
}

bool raw_read_frame(int fd, Message* m) {
  uint8_t hb[kHeaderSize];
  if (!raw_read(fd, hb, kHeaderSize)) return false;
  m->header = decode_header(hb);
  if (m->header.payload_len > (1 << 20)) return false;
  m->payload.resize(m->header.payload_len);
  return raw_read(fd, m->payload.data(), m->payload.size());
}

// True once the peer has closed `fd` (EOF or reset), skipping any data.
bool raw_wait_closed(int fd, Ms timeout = Ms(3000)) {
  auto deadline = Clock::now() + timeout;
  uint8_t buf[4096];
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    ssize_t r = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return true;
  }
  return false;
}

// Client half of the handshake by hand; true if the server accepted.
bool raw_handshake(int fd, const std::string& secret, int rank = 9) {
  MessageHeader h;
  h.op = Op::kHello;
  Hello hello;
  hello.rank = rank;
  std::vector<uint8_t> p(kHelloSize);
  encode_hello(hello, p.data());
  if (!raw_send_frame(fd, h, p)) return false;
  Message challenge;
  if (!raw_read_frame(fd, &challenge) || challenge.header.op != Op::kChallenge) return false;
  std::vector<uint8_t> auth(kAuthSize);
  for (size_t i = 0; i < kNonceSize; ++i) auth[kSha256DigestSize + i] = static_cast<uint8_t>(i * 3);
  Sha256Digest mac = auth_client_proof(secret, challenge.payload.data(), auth.data() + kSha256DigestSize);
  std::memcpy(auth.data(), mac.data(), mac.size());
  h.op = Op::kAuth;
  if (!raw_send_frame(fd, h, auth)) return false;
  Message ok;
  if (!raw_read_frame(fd, &ok) || ok.header.op != Op::kAuthOk) return false;
  Sha256Digest expected =
      auth_server_proof(secret, challenge.payload.data(), auth.data() + kSha256DigestSize);
  return constant_time_equal(expected.data(), ok.payload.data(), kAuthOkSize);
}

// A listening socket that plays a (mis)behaving server by hand.
struct RawServer {
  int fd = -1;
  uint16_t port = 0;
  RawServer() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ::listen(fd, 16);
    socklen_t len = sizeof(a);
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
  ~RawServer() { ::close(fd); }
  int accept_one() {
    int c = ::accept(fd, nullptr, nullptr);
    timeval tv{5, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return c;
  }
  // Server half of the handshake; `good_proof` false sends a wrong AUTH_OK.
  static bool handshake(int c, const std::string& secret, bool good_proof = true) {
    Message hello;
    if (!raw_read_frame(c, &hello) || hello.header.op != Op::kHello) return false;
    std::vector<uint8_t> challenge(kChallengeSize, 0x42);
    store_le64(challenge.data() + kNonceSize, kDefaultMaxPayload);
    MessageHeader h;
    h.op = Op::kChallenge;
    if (!raw_send_frame(c, h, challenge)) return false;
    Message auth;
    if (!raw_read_frame(c, &auth) || auth.header.op != Op::kAuth) return false;
    std::vector<uint8_t> proof(kAuthOkSize, 0);
    if (good_proof) {
      Sha256Digest d = auth_server_proof(secret, challenge.data(), auth.payload.data() + kSha256DigestSize);
      std::memcpy(proof.data(), d.data(), d.size());
    }
    h.op = Op::kAuthOk;
    return raw_send_frame(c, h, proof);
  }
};

// Accepts one connection on `raw` and completes the server side of the
// handshake on a thread of its own, then publishes the socket in `accepted`.
std::thread accept_and_authenticate(RawServer& raw, std::atomic<int>& accepted) {
  return std::thread([&raw, &accepted] {
    int c = raw.accept_one();
    RawServer::handshake(c, "job-secret");
    accepted.store(c);
  });
}

void close_with_reset(int fd) {
  linger l{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  ::close(fd);
}

}  // namespace

// --- SHA-256 / HMAC ----------------------------------------------------------------

TEST(sha256_fips_vectors) {
  CHECK(hex(sha256("abc", 3)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hex(sha256("", 0)) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const char* two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK(hex(sha256(two_blocks, std::strlen(two_blocks))) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  std::string million(1000000, 'a');
  CHECK(hex(sha256(million.data(), million.size())) ==
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(sha256_padding_boundaries_and_incremental) {
  // Expected digests from Python's hashlib for bytes (i*31+7) & 0xff.
  const std::pair<size_t, const char*> cases[] = {
      {55, "8aa994584139d128848eeebc4e815639ba5ab6e6e39574195a63ac4f14f7c43b"},
      {56, "ad574708f75c044c9b85de64cb568ee7711ff4f36448c6242f053ba8f6cc2b63"},
      {57, "5b46e502092be01b1100193e089fdda95638c12e19a1d24f308eb2c3d3ae849d"},
      {63, "280ed3e8ff1df845b2e7dfe6ac6cee817bef20e783cc65abc41b818b4d2fe076"},
      {64, "c6ab9724ade5b6a7a1edfffb12f3aa9181351355af8fd08c919952ad211339dd"},
      {65, "788367c73c7ddf4c53f65e68cc0d943e6227ab55b0e78ba63ace822b1c6301c0"},
      {119, "3d610547d68216dedf7435a4fb6260353911f6b3fd3f18805ddb8be285d726fe"},
      {120, "1f80156a804cb7862ad113e8200e9d74499723e7c7854d5f48776d3148e09656"},
      {127, "192409cd280e14b743642ad1343fbd3e82d9305de72c078117745a679210cc3d"},
      {128, "cc548ca2dec1f6fe4f58b2e27aa9c7521607df1130d140b55a4dad0665302356"},
      {129, "81e89a7b2911aaa7795f9e3d4910cb47d6cd2b00d83b8399481527261a1a7519"},
      {1000, "5097e7d587352f5097062ae679f37bda5802d9f875aba14c8cb4d1a188ada179"},
  };
  for (const auto& c : cases) {
    std::vector<uint8_t> data(c.first);
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 31 + 7);
    CHECK(hex(sha256(data.data(), data.size())) == c.second);
    // The same digest however the input is split across update() calls.
    for (size_t split : {size_t{1}, size_t{7}, size_t{63}, size_t{64}, size_t{65}}) {
      Sha256 h;
      for (size_t off = 0; off < data.size(); off += split) {
        h.update(data.data() + off, std::min(split, data.size() - off));
      }
      CHECK(hex(h.finish()) == c.second);
    }
  }
}

TEST(hmac_sha256_rfc4231) {
  auto mac = [](const std::vector<uint8_t>& key, const std::string& data) {
    return hex(hmac_sha256(key.data(), key.size(), data.data(), data.size()));
  };
  // Test cases 1 and 2 of RFC 4231, then 3, 4, 6 and 7 (6 and 7: keys longer
  // than a block, which are hashed first).
  CHECK(mac(std::vector<uint8_t>(20, 0x0b), "Hi There") ==
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  CHECK(mac(bytes_of("Jefe"), "what do ya want for nothing?") ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  CHECK(mac(std::vector<uint8_t>(20, 0xaa), std::string(50, '\xdd')) ==
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
  std::vector<uint8_t> key4;
  for (int i = 1; i <= 25; ++i) key4.push_back(static_cast<uint8_t>(i));
  CHECK(mac(key4, std::string(50, '\xcd')) ==
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
  CHECK(mac(std::vector<uint8_t>(131, 0xaa), "Test Using Larger Than Block-Size Key - Hash Key First") ==
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  CHECK(mac(std::vector<uint8_t>(131, 0xaa),
            "This is a test using a larger than block-size key and a larger than block-size data. "
            "The key needs to be hashed before being used by the HMAC algorithm.") ==
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2");
  HmacSha256 inc("Jefe", 4);
  inc.update("what do ya ", 11);
  inc.update("want for nothing?", 17);
  CHECK(hex(inc.finish()) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(constant_time_equal) {
  uint8_t a[32], b[32];
  for (int i = 0; i < 32; ++i) a[i] = b[i] = static_cast<uint8_t>(i);
  CHECK(constant_time_equal(a, b, 32));
  CHECK(constant_time_equal(a, b, 0));
  b[31] ^= 0x80;
  CHECK(!constant_time_equal(a, b, 32));
  b[31] ^= 0x80;
  b[0] ^= 1;
  CHECK(!constant_time_equal(a, b, 32));
}

// --- Frame codecs -------------------------------------------------------------------

TEST(header_layout_and_roundtrip) {
  MessageHeader h;
  h.op = Op::kPushPull;
  h.flags = 0;
  h.status = 0;
  h.count = 0x01020304;
  h.request_id = 0x1122334455667788ULL;
  h.key = 0xa1a2a3a4a5a6a7a8ULL;
  h.payload_len = 0x0000000b0c0d0e0fULL;
  h.aux = 0xdeadbeef;
  uint8_t b[kHeaderSize];
  encode_header(h, b);
  // Offsets of docs/protocol.md, little-endian.
  CHECK(std::memcmp(b, "FPS1", 4) == 0);
  CHECK(b[4] == kProtocolVersion && b[5] == 0);
  CHECK(b[6] == 19 && b[7] == 0);
  CHECK(load_le32(b + 8) == 0);
  CHECK(b[12] == 0x04 && b[15] == 0x01);
  CHECK(b[16] == 0x88 && b[23] == 0x11);
  CHECK(b[24] == 0xa8 && b[31] == 0xa1);
  CHECK(b[32] == 0x0f && b[36] == 0x0b && b[39] == 0);
  CHECK(b[40] == 0xef && b[43] == 0xde);
  CHECK(load_le32(b + 44) == 0);
  CHECK(decode_header(b) == h);

  std::mt19937_64 rng(7);
  for (int i = 0; i < 1000; ++i) {
    MessageHeader r;
    r.magic = static_cast<uint32_t>(rng());
    r.version = static_cast<uint16_t>(rng());
    r.op = static_cast<Op>(rng() & 0xff);
    r.flags = static_cast<uint8_t>(rng());
    r.status = static_cast<uint32_t>(rng());
    r.count = static_cast<uint32_t>(rng());
    r.request_id = rng();
    r.key = rng();
    r.payload_len = rng();
    r.aux = static_cast<uint32_t>(rng());
    r.reserved = static_cast<uint32_t>(rng());
    uint8_t e[kHeaderSize];
    encode_header(r, e);
    CHECK(decode_header(e) == r);
  }
}

TEST(header_validation_limits) {
  const uint64_t limit = 1 << 20;
  MessageHeader ok;
  ok.op = Op::kPush;
  ok.payload_len = limit;
  ok.count = static_cast<uint32_t>(limit / 4);
  validate_header(ok, limit);  // exactly at the limits: accepted

  auto rejects = [&](MessageHeader h, const char* text) {
    CHECK_THROWS(ProtocolError, "", validate_header(h, limit));
    if (header_problem(h, limit).find(text) == std::string::npos) {
      std::fprintf(stderr, "  problem was: %s\n", header_problem(h, limit).c_str());
      check_failed(text, __FILE__, __LINE__);
    }
  };
  MessageHeader h = ok;
  h.payload_len = limit + 1;
  rejects(h, "exceeds the limit");
  h = ok;
  h.payload_len = ~uint64_t{0};
  rejects(h, "exceeds the limit");
  h = ok;
  h.count = static_cast<uint32_t>(limit / 4 + 1);
  rejects(h, "count");
  h = ok;
  h.magic = 0x12345678;
  rejects(h, "bad magic");
  h = ok;
  h.version = kProtocolVersion + 1;
  rejects(h, "version");
  h = ok;
  h.op = static_cast<Op>(99);
  rejects(h, "unknown op");
  h = ok;
  h.op = Op::kAuth;
  rejects(h, "handshake");
  h = ok;
  h.flags = 0x80;
  rejects(h, "flags");
  h = ok;
  h.reserved = 1;
  rejects(h, "reserved");
  h = ok;
  h.status = 3;
  rejects(h, "non-zero status");
  h = ok;
  h.op = Op::kError;
  h.status = 0;
  h.payload_len = 10;
  rejects(h, "status 0");
  h.status = 4;
  validate_header(h, limit);
  h.payload_len = kMaxErrorMessage + 1;
  rejects(h, "ERROR message");
  CHECK(max_count_for(kDefaultMaxPayload) == (uint64_t{1} << 28));
  CHECK(max_count_for(kMaxMaxPayload) == UINT32_MAX);
}

TEST(payload_codecs) {
  Hello hello;
  hello.rank = -1;
  hello.max_payload = 12345678901ULL;
  uint8_t hb[kHelloSize];
  encode_hello(hello, hb);
  Hello back = decode_hello(hb, kHelloSize);
  CHECK(back.version == kProtocolVersion && back.rank == -1 && back.max_payload == 12345678901ULL);
  CHECK_THROWS(ProtocolError, "HELLO payload", decode_hello(hb, kHelloSize - 1));

  uint8_t ns[kNonceSize], nc[kNonceSize];
  for (size_t i = 0; i < kNonceSize; ++i) {
    ns[i] = static_cast<uint8_t>(i);
    nc[i] = static_cast<uint8_t>(255 - i);
  }
  Sha256Digest c1 = auth_client_proof("k", ns, nc);
  CHECK(c1 == auth_client_proof("k", ns, nc));
  CHECK(c1 != auth_client_proof("K", ns, nc));
  CHECK(c1 != auth_server_proof("k", ns, nc));  // distinct labels: no reflection
  // mac_c is HMAC(K, nonce_s || "fastps-auth" || nonce_c), as documented.
  std::string msg(reinterpret_cast<const char*>(ns), kNonceSize);
  msg += "fastps-auth";
  msg.append(reinterpret_cast<const char*>(nc), kNonceSize);
  CHECK(c1 == hmac_sha256("k", 1, msg.data(), msg.size()));

  OptimHyper o;
  o.kind = OptimKind::kAdam;
  o.lr = 3e-4;
  o.weight_decay = 0.01;
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  o.eps = 1e-6;
  o.amsgrad = true;
  o.decoupled_weight_decay = true;
  o.maximize = true;
  uint8_t block[kOptimConfigSize + 8];
  encode_optim_config(o, block);
  CHECK(load_le32(block) == kOptimConfigSize && block[4] == 1 && block[5] == 0x0d);
  size_t size = 0;
  OptimHyper r = decode_optim_config(block, sizeof(block), &size);
  CHECK(size == kOptimConfigSize);
  CHECK(r.kind == o.kind && r.lr == o.lr && r.weight_decay == o.weight_decay && r.beta1 == o.beta1 &&
        r.beta2 == o.beta2 && r.eps == o.eps && r.amsgrad && r.decoupled_weight_decay && r.maximize &&
        !r.nesterov);
  CHECK_THROWS(ProtocolError, "config block", decode_optim_config(block, kOptimConfigSize - 1));
  block[4] = 9;
  CHECK_THROWS(ProtocolError, "kind", decode_optim_config(block, sizeof(block)));

  CHECK(truncate_utf8("abc", 2) == "ab");
  CHECK(truncate_utf8("a\xc3\xa9", 2) == "a");  // never splits "é"
  CHECK(truncate_utf8("a\xc3\xa9", 3) == "a\xc3\xa9");
  const uint8_t bad[] = {'o', 'k', 0xff, '\n', 0xc3, 0xa9, 0xe0, 0x80};
  CHECK(sanitize_error_text(bad, sizeof(bad)) == "ok??\xc3\xa9??");
}

// --- Transport: API contract -----------------------------------------------------------

TEST(factory_and_options) {
  CHECK_THROWS(InvalidArgument, "unknown transport", Transport::create("carrier-pigeon", opts()));
  CHECK_THROWS(InvalidArgument, "'auto' (shared memory", Transport::create("carrier-pigeon", opts()));
  for (const char* kind : {"tcp", "shm", "auto"}) CHECK(Transport::create(kind, opts())->kind() == kind);
  std::string why;
  if (load_ucx_plugin(&why) != nullptr)
    CHECK(Transport::create("ucx", opts())->kind() == "ucx");
  else
    CHECK_THROWS(TransportUnavailable, "FASTPS_TRANSPORT=ucx is not available", Transport::create("ucx", opts()));
  // The shared-memory waits (Note [Shm rings]): -1 picks the default, larger values are checked.
  const ShmWait def = shm_wait(-1, -1);
  CHECK(def.spin.count() == (std::thread::hardware_concurrency() > 4 ? 20 : 0) && def.yield.count() == 0);
  const ShmWait set = shm_wait(5, 7);
  CHECK(set.spin.count() == 5 && set.yield.count() == 7);
  TransportOptions w = opts();
  w.shm_spin_us = -2;
  CHECK_THROWS(InvalidArgument, "shm_spin_us", Transport::create("shm", w));
  w = opts();
  w.shm_yield_us = kShmMaxWaitUs + 1;
  CHECK_THROWS(InvalidArgument, "shm_yield_us", Transport::create("auto", w));
  TransportOptions o = opts();
  o.connections_per_peer = 0;
  CHECK_THROWS(InvalidArgument, "connections_per_peer", Transport::create("tcp", o));
  o = opts();
  o.max_payload = 10;
  CHECK_THROWS(InvalidArgument, "max_payload", Transport::create("tcp", o));
  Inbox in;
  auto t = Transport::create("tcp", opts());
  CHECK(t->kind() == "tcp");
  CHECK_THROWS(InvalidArgument, "set_handler", t->listen());
  in.attach(*t);
  uint16_t port = t->listen();
  CHECK(port != 0);
  CHECK_THROWS(InvalidArgument, "before listen", t->set_handler([](ConnId, Message&&) {}));
  CHECK_THROWS(InvalidArgument, "already listening", t->listen());
  MessageHeader h;
  h.op = Op::kHello;
  CHECK_THROWS(InvalidArgument, "handshake", t->send(1, h));
  CHECK_THROWS(ConnectionError, "closed", t->send(12345, MessageHeader()));
}

// --- Transport: loopback traffic ---------------------------------------------------------

TEST(echo_1kib_and_64mib_scatter_gather) {
  EchoServer server;
  Inbox in;
  auto client = Transport::create("tcp", opts());
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", server.port, 0);
  PeerInfo info = client->peer_info(c);
  CHECK(info.outgoing && info.address == "127.0.0.1:" + std::to_string(server.port));

  // 1 KiB in three segments.
  std::vector<uint8_t> a(300), b(700), d(24);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 7);
  for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<uint8_t>(200 + i);
  ConstBuffer segs[3] = {{a.data(), a.size()}, {b.data(), b.size()}, {d.data(), d.size()}};
  MessageHeader h;
  h.op = Op::kPush;
  h.request_id = 1;
  h.key = (uint64_t{42} << 16) | 3;
  h.count = 256;
  h.aux = 17;
  client->send(c, h, segs, 3);
  CHECK(in.wait_frames(1));
  Message m = in.pop();
  std::vector<uint8_t> expect = a;
  expect.insert(expect.end(), b.begin(), b.end());
  expect.insert(expect.end(), d.begin(), d.end());
  CHECK(m.header.op == Op::kReply && m.header.request_id == 1 && m.header.key == h.key &&
        m.header.count == 256 && m.header.aux == 17);
  CHECK(std::equal(m.payload.begin(), m.payload.end(), expect.begin(), expect.end()));

  // 64 MiB of float32 in four segments (one of them empty), echoed several times.
  const size_t kFloats = (64u << 20) / 4;
  std::vector<float> big(kFloats);
  std::mt19937 rng(3);
  for (auto& v : big) v = static_cast<float>(rng()) * 1e-9f;
  const size_t q = kFloats / 3;
  ConstBuffer bsegs[4] = {{big.data(), q * 4}, {nullptr, 0}, {big.data() + q, q * 4},
                          {big.data() + 2 * q, (kFloats - 2 * q) * 4}};
  const int kRounds = 4;
  auto t0 = Clock::now();
  for (int round = 0; round < kRounds; ++round) {
    h.request_id = 100 + round;
    h.count = static_cast<uint32_t>(kFloats);
    client->send(c, h, bsegs, 4);
    CHECK(in.wait_frames(1, Ms(20000)));
    Message r = in.pop();
    CHECK(r.header.request_id == static_cast<uint64_t>(100 + round));
    CHECK(r.payload.size() == kFloats * 4 && std::memcmp(r.payload.data(), big.data(), kFloats * 4) == 0);
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  double mib = 64.0 * kRounds;
  std::printf("  info: 64 MiB echo over loopback: %.1f ms per round trip, %.0f MiB/s each way "
              "(%.0f MiB/s both directions)\n",
              1e3 * secs / kRounds, mib / secs, 2 * mib / secs);

  TransportStats s = client->stats();
  CHECK(s.messages_sent == 1 + kRounds && s.messages_received == 1 + kRounds);
  CHECK(s.bytes_sent == (1 + kRounds) * kHeaderSize + 1024 + kRounds * kFloats * 4);
  CHECK(s.bytes_received == s.bytes_sent);
  CHECK(server.t->stats().bytes_received == s.bytes_sent);
}

TEST(pipelined_requests_out_of_order_replies) {
  // The server holds each batch of 16 requests and answers it shuffled.
  std::vector<std::pair<ConnId, Message>> held;
  std::mt19937 shuffle_rng(11);
  auto server = Transport::create("tcp", opts());
  server->set_handler([&](ConnId c, Message&& m) {
    held.emplace_back(c, std::move(m));
    if (held.size() < 16) return;
    std::shuffle(held.begin(), held.end(), shuffle_rng);
    for (auto& [conn, req] : held) {
      MessageHeader h = req.header;
      h.op = Op::kReply;
      ConstBuffer seg{req.payload.data(), req.payload.size()};
      server->send(conn, h, &seg, 1);
    }
    held.clear();
  });
  uint16_t port = server->listen();

  Inbox in;
  auto client = Transport::create("tcp", opts());
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", port, 1);
  const int kRequests = 1600;
  for (int id = 0; id < kRequests; ++id) {
    std::vector<uint64_t> body(id % 50 + 1, static_cast<uint64_t>(id) * 2654435761u);
    MessageHeader h;
    h.op = Op::kPull;
    h.request_id = static_cast<uint64_t>(id);
    h.count = static_cast<uint32_t>(body.size());
    ConstBuffer seg{body.data(), body.size() * 8};
    client->send(c, h, &seg, 1);
  }
  CHECK(in.wait_frames(kRequests, Ms(10000)));
  std::set<uint64_t> seen;
  bool out_of_order = false;
  uint64_t previous = 0;
  for (int i = 0; i < kRequests; ++i) {
    Message m = in.pop();
    uint64_t id = m.header.request_id;
    if (i > 0 && id < previous) out_of_order = true;
    previous = id;
    seen.insert(id);
    std::vector<uint64_t> expect(id % 50 + 1, id * 2654435761u);
    CHECK(m.payload.size() == expect.size() * 8 &&
          std::memcmp(m.payload.data(), expect.data(), m.payload.size()) == 0);
  }
  CHECK(seen.size() == static_cast<size_t>(kRequests));
  CHECK(out_of_order);
}

TEST(several_connections_per_peer_concurrent_senders) {
  EchoServer server;
  TransportOptions o = opts();
  o.connections_per_peer = 4;
  Inbox in;
  auto client = Transport::create("tcp", o);
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", server.port, 2);
  const int kThreads = 4, kPerThread = 500;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<uint32_t> body(1000);
      for (int i = 0; i < kPerThread; ++i) {
        uint64_t id = static_cast<uint64_t>(t) * kPerThread + i;
        std::fill(body.begin(), body.end(), static_cast<uint32_t>(id));
        MessageHeader h;
        h.op = Op::kPushPull;
        h.request_id = id;
        h.count = 1000;
        ConstBuffer seg{body.data(), body.size() * 4};
        client->send(c, h, &seg, 1);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(in.wait_frames(kThreads * kPerThread, Ms(10000)));
  std::set<uint64_t> ids;
  std::set<ConnId> conns;
  {
    std::lock_guard<std::mutex> lock(in.mu);
    for (auto& [conn, m] : in.frames) {
      conns.insert(conn);
      ids.insert(m.header.request_id);
      uint32_t first;
      std::memcpy(&first, m.payload.data(), 4);
      CHECK(first == static_cast<uint32_t>(m.header.request_id) && m.payload.size() == 4000);
    }
  }
  CHECK(ids.size() == static_cast<size_t>(kThreads * kPerThread));
  CHECK(conns.size() == 1 && *conns.begin() == c);  // one logical connection on the client
  CHECK(server.frames.load() == static_cast<uint64_t>(kThreads * kPerThread));
}

TEST(peer_max_payload_is_enforced_locally) {
  TransportOptions so = opts();
  so.max_payload = 64 << 10;
  EchoServer server(so);
  Inbox in;
  auto client = Transport::create("tcp", opts());
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", server.port, 0);
  std::vector<uint8_t> body(100 << 10);
  ConstBuffer seg{body.data(), body.size()};
  MessageHeader h;
  h.op = Op::kPush;
  CHECK_THROWS(InvalidArgument, "the peer accepts at most", client->send(c, h, &seg, 1));
  seg.size = 64 << 10;  // exactly the server's limit: fine, and the connection still works
  client->send(c, h, &seg, 1);
  CHECK(in.wait_frames(1));
  CHECK(in.pop().payload.size() == static_cast<size_t>(64 << 10));
}

// --- Transport: handshake failures -------------------------------------------------------

TEST(wrong_secret_rejected_server_keeps_serving) {
  EchoServer server;
  Inbox in;
  auto bad = Transport::create("tcp", opts("not-the-secret"));
  in.attach(*bad);
  CHECK_THROWS(ConnectionError, "authentication failed", bad->connect("127.0.0.1", server.port, 5));
  {
    std::lock_guard<std::mutex> lock(server.events.mu);
    CHECK(server.events.disconnects.empty());  // never established: no disconnect call
  }
  CHECK(echo_roundtrip(server.port));
  CHECK(server.frames.load() == 1);
}

TEST(fake_server_without_secret_is_rejected_by_client) {
  RawServer fake;
  std::thread th([&] {
    int c = fake.accept_one();
    RawServer::handshake(c, "job-secret", /*good_proof=*/false);
    raw_wait_closed(c);
    ::close(c);
  });
  Inbox in;
  auto client = Transport::create("tcp", opts());
  in.attach(*client);
  CHECK_THROWS(ConnectionError, "failed to authenticate itself", client->connect("127.0.0.1", fake.port, 0));
  th.join();
}

TEST(wrong_version_gets_readable_error) {
  EchoServer server;
  int fd = raw_connect(server.port);
  CHECK(fd >= 0);
  MessageHeader h;
  h.op = Op::kHello;
  h.version = kProtocolVersion + 1;
  Hello hello;
  hello.version = kProtocolVersion + 1;
  std::vector<uint8_t> p(kHelloSize);
  encode_hello(hello, p.data());
  CHECK(raw_send_frame(fd, h, p));
  Message reply;
  CHECK(raw_read_frame(fd, &reply));
  CHECK(reply.header.op == Op::kError && reply.header.status == static_cast<uint32_t>(Status::kVersion));
  std::string text = sanitize_error_text(reply.payload.data(), reply.payload.size());
  CHECK(text.find("version " + std::to_string(kProtocolVersion + 1)) != std::string::npos &&
        text.find("version " + std::to_string(kProtocolVersion)) != std::string::npos);
  CHECK(raw_wait_closed(fd));
  ::close(fd);
  CHECK(echo_roundtrip(server.port));
}

TEST(connect_errors_name_the_peer) {
  // Refused: a port that was just free.
  uint16_t port;
  {
    RawServer tmp;
    port = tmp.port;
  }
  Inbox in;
  auto client = Transport::create("tcp", opts());
  in.attach(*client);
  CHECK_THROWS(ConnectionError, "127.0.0.1:" + std::to_string(port), client->connect("127.0.0.1", port, 0));

  // A server that accepts and never answers: the handshake deadline.
  RawServer silent;
  TransportOptions o = opts();
  o.timeout = Ms(300);
  auto impatient = Transport::create("tcp", o);
  impatient->set_handler([](ConnId, Message&&) {});
  auto t0 = Clock::now();
  CHECK_THROWS(TimeoutError, "127.0.0.1:" + std::to_string(silent.port),
               impatient->connect("127.0.0.1", silent.port, 0));
  CHECK(Clock::now() - t0 < Ms(2000));

  // Not a fastps server: it answers with something else.
  std::thread th([&] {
    int c = silent.accept_one();  // the connection of the timed-out attempt
    ::close(c);
    c = silent.accept_one();
    const char http[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n.....................";
    raw_write(c, http, sizeof(http));
    raw_wait_closed(c);
    ::close(c);
  });
  CHECK_THROWS(ProtocolError, "is not a fastps server", client->connect("127.0.0.1", silent.port, 0));
  th.join();
}

TEST(server_closes_silent_unauthenticated_connection) {
  // The handshake has its own short deadline, whatever the (long) request timeout.
  TransportOptions o = opts();
  o.timeout = Ms(600000);
  o.handshake_timeout = Ms(300);
  EchoServer server(o);
  int fd = raw_connect(server.port);
  CHECK(fd >= 0);
  auto t0 = Clock::now();
  CHECK(raw_wait_closed(fd, Ms(3000)));
  CHECK(Clock::now() - t0 >= Ms(250));
  ::close(fd);
  CHECK(echo_roundtrip(server.port));
}

// --- Transport: misbehaving peers ----------------------------------------------------------

TEST(garbage_bytes_before_auth) {
  EchoServer server;
  std::mt19937 rng(5);
  for (int attempt = 0; attempt < 3; ++attempt) {
    int fd = raw_connect(server.port);
    CHECK(fd >= 0);
    std::vector<uint8_t> junk(4096 << attempt);
    for (auto& x : junk) x = static_cast<uint8_t>(rng());
    raw_write(fd, junk.data(), junk.size());  // may fail half-way once the server closed
    CHECK(raw_wait_closed(fd));
    ::close(fd);
  }
  // A plausible header announcing a huge payload before authentication.
  int fd = raw_connect(server.port);
  MessageHeader h;
  h.op = Op::kHello;
  h.payload_len = uint64_t{1} << 40;
  uint8_t hb[kHeaderSize];
  encode_header(h, hb);
  raw_write(fd, hb, kHeaderSize);
  Message reply;
  CHECK(raw_read_frame(fd, &reply) && reply.header.op == Op::kError);
  CHECK(raw_wait_closed(fd));
  ::close(fd);
  CHECK(echo_roundtrip(server.port));
}

TEST(bad_frames_after_auth_close_only_that_connection) {
  EchoServer server;
  // A well-behaved client stays connected throughout.
  Inbox good_in;
  auto good = Transport::create("tcp", opts());
  good_in.attach(*good);
  ConnId gc = good->connect("127.0.0.1", server.port, 0);

  struct Case {
    const char* name;
    std::function<void(MessageHeader&)> corrupt;
    const char* reason;
  };
  const Case cases[] = {
      {"bad magic", [](MessageHeader& h) { h.magic = 0xdeadbeef; }, "bad magic"},
      {"oversized payload", [](MessageHeader& h) { h.payload_len = uint64_t{1} << 40; }, "exceeds the limit"},
      {"oversized count", [](MessageHeader& h) { h.count = 0xffffffffu; }, "count"},
      {"handshake op", [](MessageHeader& h) { h.op = Op::kHello; }, "handshake op"},
      {"unknown op", [](MessageHeader& h) { h.op = static_cast<Op>(200); }, "unknown op"},
      {"error with status 0", [](MessageHeader& h) { h.op = Op::kError; }, "status 0"},
  };
  size_t expected_disconnects = 0;
  for (const Case& c : cases) {
    int fd = raw_connect(server.port);
    CHECK(raw_handshake(fd, "job-secret"));
    MessageHeader h;
    h.op = Op::kPush;
    c.corrupt(h);
    uint8_t hb[kHeaderSize];
    encode_header(h, hb);
    CHECK(raw_write(fd, hb, kHeaderSize));
    CHECK(raw_wait_closed(fd));
    ::close(fd);
    ++expected_disconnects;
    CHECK(server.events.wait_disconnects(expected_disconnects));
    std::string reason = server.events.last_reason();
    if (reason.find(c.reason) == std::string::npos) {
      std::fprintf(stderr, "  case %s: reason was: %s\n", c.name, reason.c_str());
      check_failed(c.reason, __FILE__, __LINE__);
    }
  }
  // The good client's connection was never disturbed.
  MessageHeader h;
  h.op = Op::kPing;
  h.request_id = 5;
  good->send(gc, h);
  CHECK(good_in.wait_frames(1));
  CHECK(good_in.pop().header.op == Op::kPong);
  CHECK(good_in.disconnects.empty());
}

TEST(truncated_frame_then_close) {
  EchoServer server;
  // After authentication: a header announcing 1000 bytes, 10 bytes, close.
  int fd = raw_connect(server.port);
  CHECK(raw_handshake(fd, "job-secret"));
  MessageHeader h;
  h.op = Op::kPush;
  h.payload_len = 1000;
  uint8_t hb[kHeaderSize];
  encode_header(h, hb);
  CHECK(raw_write(fd, hb, kHeaderSize));
  CHECK(raw_write(fd, hb, 10));
  ::close(fd);
  CHECK(server.events.wait_disconnects(1));
  CHECK(server.events.last_reason().find("truncated frame: 58 of 1048 bytes") != std::string::npos);
  // Half a header before authentication.
  fd = raw_connect(server.port);
  CHECK(raw_write(fd, hb, 20));
  ::close(fd);
  CHECK(echo_roundtrip(server.port));
}

TEST(abrupt_disconnect_fires_handler) {
  EchoServer server;
  int fd = raw_connect(server.port);
  CHECK(raw_handshake(fd, "job-secret", 4));
  auto t0 = Clock::now();
  close_with_reset(fd);  // what the kernel does for a killed process with unread data
  CHECK(server.events.wait_disconnects(1, Ms(2000)));
  CHECK(Clock::now() - t0 < Ms(1000));
  std::string reason = server.events.last_reason();
  CHECK(reason.find("reset") != std::string::npos || reason.find("closed") != std::string::npos);

  // A client transport that goes away.
  {
    Inbox in;
    auto client = Transport::create("tcp", opts());
    in.attach(*client);
    ConnId c = client->connect("127.0.0.1", server.port, 8);
    client->send(c, MessageHeader());
    CHECK(in.wait_frames(1));
  }
  CHECK(server.events.wait_disconnects(2, Ms(2000)));
  CHECK(server.events.last_reason() == "peer closed the connection");
}

// A handler that throws closes that connection only; `rounds` times, each on
// a new connection. Over shared memory the handler runs on the connection's
// ring reader, which then tears its own connection down (and is joined by a
// later teardown or the transport's destructor).
static void check_handler_exception_closes_connection_only(const char* kind, const TransportOptions& o,
                                                           int rounds) {
  Inbox events;
  auto server = Transport::create(kind, o);
  std::atomic<int> calls{0};
  server->set_handler([&](ConnId c, Message&& m) {
    calls.fetch_add(1);
    if (m.header.key == 666) throw InvalidArgument("unknown key 666");
    MessageHeader h = m.header;
    h.op = Op::kReply;
    server->send(c, h);
  });
  server->set_disconnect_handler([&](ConnId c, const std::string& r) {
    std::lock_guard<std::mutex> lock(events.mu);
    events.disconnects.emplace_back(c, r);
    events.cv.notify_all();
  });
  uint16_t port = server->listen();
  Inbox in;
  auto client = Transport::create(kind, o);
  in.attach(*client);
  for (int round = 1; round <= rounds; ++round) {
    ConnId c = client->connect("127.0.0.1", port, 0);
    CHECK(client->peer_info(c).shared_memory == (std::string(kind) == "shm"));
    MessageHeader h;
    h.op = Op::kPush;
    h.key = 666;
    client->send(c, h);
    CHECK(events.wait_disconnects(size_t(round)));
    CHECK(events.last_reason() == "the message handler threw");
    CHECK(in.wait_disconnects(size_t(round)));
    CHECK_THROWS(ConnectionError, "closed", client->send(c, h));
  }
  ConnId c2 = client->connect("127.0.0.1", port, 0);
  MessageHeader h;
  h.op = Op::kPush;
  h.key = 1;
  client->send(c2, h);
  CHECK(in.wait_frames(1));
}

TEST(handler_exception_closes_connection_only) { check_handler_exception_closes_connection_only("tcp", opts(), 1); }

TEST(local_close_notifies_both_sides) {
  Inbox sin;
  auto server = Transport::create("tcp", opts());
  sin.attach(*server);
  uint16_t port = server->listen();
  Inbox cin;
  auto client = Transport::create("tcp", opts());
  cin.attach(*client);
  ConnId c = client->connect("127.0.0.1", port, 6);
  client->send(c, MessageHeader());
  CHECK(sin.wait_frames(1));
  ConnId sc;
  {
    std::lock_guard<std::mutex> lock(sin.mu);
    sc = sin.frames.front().first;
  }
  PeerInfo info = server->peer_info(sc);
  CHECK(info.rank == 6 && !info.outgoing && info.address.rfind("127.0.0.1:", 0) == 0);
  server->close(sc);
  CHECK(sin.wait_disconnects(1));
  CHECK(sin.last_reason() == "closed locally");
  CHECK(cin.wait_disconnects(1));
  CHECK(cin.last_reason() == "peer closed the connection");
  CHECK_THROWS(ConnectionError, "closed", server->send(sc, MessageHeader()));
  CHECK_THROWS(ConnectionError, "unknown or closed", server->peer_info(sc));
  server->close(sc);  // already closed: ignored
}

// --- Transport: a blocked sender and a dying peer --------------------------------------------

// A thread that sends 8 frames of `bytes` bytes on `c` until a send throws:
// `failed` once it ended with ConnectionError (its message in `what`); any
// other exception leaves `failed` false and says so in `what`. Join `thread`.
struct BlockedSender {
  std::vector<uint8_t> body;
  std::atomic<bool> failed{false};
  std::string what;
  std::thread thread;
  BlockedSender(Transport& t, ConnId c, size_t bytes) : body(bytes, 0x5a) {
    thread = std::thread([this, &t, c] {
      ConstBuffer seg{body.data(), body.size()};
      MessageHeader h;
      h.op = Op::kPush;
      try {
        for (int i = 0; i < 8; ++i) t.send(c, h, &seg, 1);
      } catch (const ConnectionError& e) {
        what = e.what();
        failed.store(true);
      } catch (const std::exception& e) {
        what = std::string("wrong exception: ") + e.what();
      }
    });
  }
};

// The raw server completes the handshake and then never reads, so the
// client's socket buffers fill and send() blocks.
TEST(blocked_send_fails_when_peer_dies) {
  RawServer raw;
  std::atomic<int> accepted{-1};
  std::thread th = accept_and_authenticate(raw, accepted);
  Inbox in;
  auto client = Transport::create("tcp", opts());
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", raw.port, 0);
  th.join();

  BlockedSender sender(*client, c, 64 << 20);
  std::this_thread::sleep_for(Ms(300));  // the sender is now blocked on a full socket
  CHECK(!sender.failed.load());
  auto t0 = Clock::now();
  close_with_reset(accepted.load());
  sender.thread.join();
  CHECK(sender.failed.load());
  CHECK(Clock::now() - t0 < Ms(2000));
  CHECK(sender.what.find("127.0.0.1:" + std::to_string(raw.port)) != std::string::npos);
  CHECK(in.wait_disconnects(1));
}

TEST(send_deadline_then_connection_closed) {
  RawServer raw;
  std::atomic<int> accepted{-1};
  std::thread th = accept_and_authenticate(raw, accepted);
  TransportOptions o = opts();
  o.timeout = Ms(300);
  Inbox in;
  auto client = Transport::create("tcp", o);
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", raw.port, 0);
  th.join();
  std::vector<uint8_t> body(64 << 20, 1);
  ConstBuffer seg{body.data(), body.size()};
  MessageHeader h;
  h.op = Op::kPush;
  auto t0 = Clock::now();
  CHECK_THROWS(TimeoutError, "timed out after 300 ms sending to", client->send(c, h, &seg, 1));
  CHECK(Clock::now() - t0 < Ms(1500));
  CHECK(in.wait_disconnects(1));
  CHECK(in.last_reason().find("timed out") != std::string::npos);
  CHECK_THROWS(ConnectionError, "closed", client->send(c, h));
  ::close(accepted.load());
}

// --- Shared memory (transport/shm.h) ------------------------------------------------------

std::vector<std::string> shm_names_of_this_process() {
  std::vector<std::string> names;
  const std::string prefix = "fastps-" + std::to_string(::getpid()) + "-";
  if (DIR* d = opendir("/dev/shm")) {
    while (dirent* e = readdir(d))
      if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) names.push_back(e->d_name);
    closedir(d);
  }
  return names;
}

TransportOptions shm_opts(uint64_t ring = 64 << 10) {
  TransportOptions o = opts();
  o.shm_ring_bytes = ring;
  return o;
}

TEST(shm_echo_small_and_larger_than_the_ring) {
  EchoServer server(shm_opts(), "auto");
  Inbox in;
  auto client = Transport::create("shm", shm_opts());
  CHECK(client->kind() == "shm");
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", server.port, 0);
  CHECK(client->peer_info(c).shared_memory);
  CHECK(client->peer_info(c).single_copy);  // one process: it may read itself
  CHECK(shm_names_of_this_process().empty());  // unlinked once mapped

  std::vector<uint8_t> small(1000);
  for (size_t i = 0; i < small.size(); ++i) small[i] = static_cast<uint8_t>(i * 13);
  // 3 MiB + 5 bytes in two segments through 64 KiB rings: every frame wraps.
  std::vector<uint8_t> big((3u << 20) + 5);
  std::mt19937 rng(5);
  for (auto& v : big) v = static_cast<uint8_t>(rng());
  MessageHeader h;
  h.op = Op::kPush;
  for (int round = 0; round < 20; ++round) {
    const bool large = round % 4 == 3;
    const std::vector<uint8_t>& body = large ? big : small;
    ConstBuffer segs[2] = {{body.data(), 7}, {body.data() + 7, body.size() - 7}};
    h.request_id = round;
    client->send(c, h, segs, 2);
    CHECK(in.wait_frames(1, Ms(10000)));
    Message r = in.pop();
    CHECK(r.header.op == Op::kReply && r.header.request_id == static_cast<uint64_t>(round));
    CHECK(r.payload.size() == body.size() && std::memcmp(r.payload.data(), body.data(), body.size()) == 0);
  }
  TransportStats st = client->stats();
  CHECK(st.messages_sent == 20 && st.bytes_received == st.bytes_sent);
  server.t.reset();  // the server goes away: the client hears it through the socket
  CHECK(in.wait_disconnects(1));
}

TEST(shm_handler_exception_closes_connection_only) {
  check_handler_exception_closes_connection_only("shm", shm_opts(), 4);
}

TEST(shm_declined_falls_back_to_tcp_or_fails_when_required) {
  EchoServer server(shm_opts(), "tcp");
  {
    Inbox in;
    auto client = Transport::create("auto", opts());
    in.attach(*client);
    ConnId c = client->connect("127.0.0.1", server.port, 0);
    CHECK(!client->peer_info(c).shared_memory);
    MessageHeader h;
    h.op = Op::kPing;
    client->send(c, h);
    CHECK(in.wait_frames(1));
  }
  Inbox in;
  auto client = Transport::create("shm", opts());
  in.attach(*client);
  CHECK_THROWS(ConnectionError, "TCP only", client->connect("127.0.0.1", server.port, 0));
  CHECK(shm_names_of_this_process().empty());
  MessageHeader h;
  h.op = Op::kShmOffer;
  CHECK_THROWS(InvalidArgument, "transport itself", client->send(1, h));
}

TEST(shm_blocked_send_fails_when_peer_closes) {
  // The server's handler stalls on the first frame, so its ring fills up and
  // the client's sender blocks; a close on the server side must fail it at once.
  auto server = Transport::create("auto", opts());
  std::atomic<ConnId> conn{kInvalidConnId};
  std::atomic<bool> release{false};
  server->set_handler([&](ConnId c, Message&&) {
    conn.store(c);
    while (!release.load()) std::this_thread::sleep_for(Ms(5));
  });
  uint16_t port = server->listen();
  Inbox in;
  auto client = Transport::create("shm", shm_opts());
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", port, 0);
  BlockedSender sender(*client, c, 8 << 20);
  std::this_thread::sleep_for(Ms(300));
  CHECK(!sender.failed.load() && conn.load() != kInvalidConnId);
  auto t0 = Clock::now();
  server->close(conn.load());  // shuts the socket down at once
  std::this_thread::sleep_for(Ms(100));
  release.store(true);
  sender.thread.join();
  if (!sender.failed.load()) std::fprintf(stderr, "  %s\n", sender.what.c_str());
  CHECK(sender.failed.load());
  CHECK(Clock::now() - t0 < Ms(2000));
  CHECK(in.wait_disconnects(1));
}

TEST(shm_byref_send_that_times_out_unwritten_keeps_the_connection_usable) {
  // The server's handler stalls on the first frame, the ring fills up, and a
  // large (by-reference) send times out before its descriptor got in: the
  // connection stays open (nothing was half sent), and once the server reads
  // again the next large send goes through at once.
  TransportOptions so = opts();
  auto server = Transport::create("auto", so);
  std::atomic<int> got{0};
  std::atomic<bool> release{false};
  std::atomic<size_t> last_size{0};
  server->set_handler([&](ConnId, Message&& m) {
    last_size.store(m.payload.size());
    if (got.fetch_add(1) == 0)
      while (!release.load()) std::this_thread::sleep_for(Ms(5));
  });
  uint16_t port = server->listen();
  TransportOptions co = shm_opts(64 << 10);
  co.timeout = Ms(500);
  Inbox in;
  auto client = Transport::create("shm", co);
  in.attach(*client);
  ConnId c = client->connect("127.0.0.1", port, 0);
  CHECK(client->peer_info(c).single_copy);
  MessageHeader h;
  h.op = Op::kPush;
  client->send(c, h);  // the handler stalls on this one
  while (got.load() < 1) std::this_thread::sleep_for(Ms(1));
  std::vector<uint8_t> small(4096 - kHeaderSize, 1);
  ConstBuffer s{small.data(), small.size()};
  for (int i = 0; i < 16; ++i) client->send(c, h, &s, 1);  // exactly fills the 64 KiB ring
  std::vector<uint8_t> big(64 << 10, 2);
  ConstBuffer b{big.data(), big.size()};
  CHECK_THROWS(TimeoutError, "0 of", client->send(c, h, &b, 1));
  CHECK(client->peer_info(c).shared_memory);  // still open
  release.store(true);
  while (got.load() < 17) std::this_thread::sleep_for(Ms(1));
  auto t0 = Clock::now();
  client->send(c, h, &b, 1);
  CHECK(Clock::now() - t0 < Ms(400));
  auto deadline = Clock::now() + Ms(2000);
  while (got.load() < 18 && Clock::now() < deadline) std::this_thread::sleep_for(Ms(1));
  CHECK(got.load() == 18 && last_size.load() == big.size());
  CHECK(in.disconnects.empty());
}

// --- Note [Send queues]: a peer that does not read slows only itself -----------------------

// A server whose replies come from one "shard" thread, as PsServer's do: the
// loop thread hands each frame over, the shard echoes it (PONG for PING).
struct ShardEchoServer {
  std::unique_ptr<Transport> t;
  uint16_t port = 0;
  Inbox events;  // disconnects only
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<ConnId, Message>> work;
  bool stop = false;
  std::thread shard;
  std::atomic<int> send_errors{0};

  explicit ShardEchoServer(const TransportOptions& o, const char* kind = "auto") {
    t = Transport::create(kind, o);
    t->set_handler([this](ConnId c, Message&& m) {
      std::lock_guard<std::mutex> lock(mu);
      work.emplace_back(c, std::move(m));
      cv.notify_all();
    });
    t->set_disconnect_handler([this](ConnId c, const std::string& reason) {
      std::lock_guard<std::mutex> lock(events.mu);
      events.disconnects.emplace_back(c, reason);
      events.cv.notify_all();
    });
    Transport* raw = t.get();
    shard = std::thread([this, raw] {
      for (;;) {
        std::pair<ConnId, Message> item;
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return stop || !work.empty(); });
          if (stop) return;
          item = std::move(work.front());
          work.pop_front();
        }
        Message& m = item.second;
        MessageHeader h = m.header;
        h.op = m.header.op == Op::kPing ? Op::kPong : Op::kReply;
        ConstBuffer seg{m.payload.data(), m.payload.size()};
        try {
          raw->send(item.first, h, &seg, m.payload.empty() ? 0 : 1);
        } catch (const Error&) {
          send_errors.fetch_add(1);
        }
      }
    });
    port = t->listen("127.0.0.1", 0);
  }
  ~ShardEchoServer() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
      cv.notify_all();
    }
    shard.join();
    t.reset();
  }
};

// Round trip of one PING of `bytes` bytes from a fresh client; milliseconds.
double ping_ms(uint16_t port, const TransportOptions& o, const char* kind, size_t bytes) {
  Inbox in;
  auto c = Transport::create(kind, o);
  in.attach(*c);
  ConnId id = c->connect("127.0.0.1", port, 1);
  std::vector<uint8_t> body(bytes, 7);
  ConstBuffer seg{body.data(), body.size()};
  MessageHeader h;
  h.op = Op::kPing;
  h.request_id = 5;
  auto t0 = Clock::now();
  c->send(id, h, &seg, bytes ? 1 : 0);
  if (!in.wait_frames(1, Ms(20000))) return 1e9;
  Message m = in.pop();
  if (m.header.op != Op::kPong || m.payload.size() != bytes) return 1e9;
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Non-default waits (TransportOptions::shm_spin_us / shm_yield_us): spinning
// and yielding before the futex sleep changes timing, never the frames
// ("shm" connects over shared memory or throws).
TEST(shm_echo_with_spin_and_yield_set) {
  TransportOptions o = shm_opts();
  o.shm_spin_us = 50;
  o.shm_yield_us = 100;
  EchoServer server(o, "auto");
  for (size_t bytes : {size_t{0}, size_t{100}, size_t{200} << 10}) CHECK(ping_ms(server.port, o, "shm", bytes) < 10000);
}

// A client by hand that sends `n` PINGs of 1 MiB and never reads; it stays
// alive (heartbeats) until stop is set.
struct NonReader {
  int fd = -1;
  int sent = 0;
  std::atomic<bool> stop{false};
  std::thread beats;
  explicit NonReader(uint16_t port, int n) {
    fd = raw_connect(port);
    CHECK(fd >= 0 && raw_handshake(fd, "job-secret"));
    int small = 64 << 10;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    std::vector<uint8_t> body(1 << 20, 3);
    MessageHeader h;
    h.op = Op::kPing;
    h.version = kProtocolVersion;
    for (int i = 0; i < n; ++i) {
      h.request_id = i + 1;
      if (!raw_send_frame(fd, h, body)) break;  // the server may close us before we are done
      ++sent;
    }
    beats = std::thread([this] {
      MessageHeader hb;
      hb.op = Op::kHeartbeat;
      while (!stop.load()) {
        if (!raw_send_frame(fd, hb, {})) return;
        std::this_thread::sleep_for(Ms(50));
      }
    });
  }
  ~NonReader() {
    stop.store(true);
    beats.join();
    ::close(fd);
  }
};

TransportOptions stall_opts() {
  TransportOptions o = opts();
  o.socket_buffer_bytes = 64 << 10;  // the kernel absorbs little: the queue shows
  o.shm_ring_bytes = 64 << 10;
  return o;
}

// The case over TCP: 16 x 1 MiB PINGs from a peer that never reads.
// Before Note [Send queues] the shard blocked on that peer until the send
// deadline (5 s here), and every other client's request waited behind it.
TEST(peer_that_does_not_read_does_not_stall_the_server_tcp) {
  TransportOptions so = stall_opts();
  so.liveness_timeout = Ms(1500);  // also the stall window of a queue
  ShardEchoServer server(so, "tcp");
  NonReader bad(server.port, 16);
  // The shard has taken all 16 (its replies wait in a queue) ...
  auto deadline = Clock::now() + Ms(3000);
  while (server.t->stats().queued_bytes < (8u << 20) && Clock::now() < deadline) std::this_thread::sleep_for(Ms(5));
  TransportStats st = server.t->stats();
  CHECK(st.queued_bytes >= (8u << 20) && st.queued_peak <= 16 * ((1u << 20) + kHeaderSize));
  CHECK(st.frames_queued >= 1);
  // ... and another client is served at once, small and large.
  CHECK(ping_ms(server.port, opts(), "tcp", 100) < 1000);
  CHECK(ping_ms(server.port, opts(), "tcp", 1 << 20) < 1000);
  // The peer stays alive (heartbeats) but takes nothing: closed after the window.
  CHECK(!server.events.wait_reason("is not reading its replies", Ms(5000)).empty());
  deadline = Clock::now() + Ms(2000);
  while (server.t->stats().queued_bytes != 0 && Clock::now() < deadline) std::this_thread::sleep_for(Ms(5));
  CHECK(server.t->stats().queued_bytes == 0);  // freed with the connection
  CHECK(ping_ms(server.port, opts(), "tcp", 100) < 1000);
}

TEST(send_queue_limit_closes_a_peer_that_does_not_read) {
  TransportOptions so = stall_opts();
  so.send_queue_limit = 4 << 20;
  ShardEchoServer server(so, "tcp");
  NonReader bad(server.port, 16);
  const std::string why = server.events.wait_reason("is not reading its replies");
  CHECK(why.find("FASTPS_SEND_QUEUE_BYTES") != std::string::npos);
  CHECK(server.t->stats().queued_peak <= (4u << 20));
  // That peer's later replies fail; nobody waits. (The reason is logged inside
  // the send that fails, before it throws: poll, or this races the shard.)
  const auto until = Clock::now() + Ms(2000);
  while (server.send_errors.load() < 1 && Clock::now() < until) std::this_thread::sleep_for(Ms(5));
  CHECK(server.send_errors.load() >= 1);
  CHECK(ping_ms(server.port, opts(), "tcp", 1 << 20) < 1000);
}

// The same over shared memory: a client whose reader stops (its handler
// blocks) after the first reply. By-reference replies (Note [Single copy])
// used to hold the shard until the reader copied them.
TEST(peer_that_does_not_read_does_not_stall_the_server_shm) {
  TransportOptions so = stall_opts();
  so.liveness_timeout = Ms(1500);
  ShardEchoServer server(so);
  std::atomic<bool> release{false};
  std::atomic<int> got{0};
  Inbox bad_events;
  auto bad = Transport::create("shm", stall_opts());
  bad->set_handler([&](ConnId, Message&&) {
    got.fetch_add(1);
    while (!release.load()) std::this_thread::sleep_for(Ms(2));
  });
  bad->set_disconnect_handler([&](ConnId c, const std::string& r) {
    std::lock_guard<std::mutex> lock(bad_events.mu);
    bad_events.disconnects.emplace_back(c, r);
    bad_events.cv.notify_all();
  });
  ConnId bc = bad->connect("127.0.0.1", server.port, 7);
  CHECK(bad->peer_info(bc).single_copy);
  std::vector<uint8_t> body(1 << 20, 9);
  ConstBuffer seg{body.data(), body.size()};
  MessageHeader h;
  h.op = Op::kPing;
  for (int i = 0; i < 16; ++i) bad->send(bc, h, &seg, 1);
  auto deadline = Clock::now() + Ms(3000);
  while (server.t->stats().queued_bytes < (8u << 20) && Clock::now() < deadline) std::this_thread::sleep_for(Ms(5));
  CHECK(server.t->stats().queued_bytes >= (8u << 20));
  CHECK(ping_ms(server.port, shm_opts(), "shm", 100) < 1000);
  // A live reader still gets its large replies by reference, never queued.
  const uint64_t queued_before = server.t->stats().frames_queued;
  CHECK(ping_ms(server.port, shm_opts(), "shm", 1 << 20) < 1000);
  CHECK(server.t->stats().frames_queued == queued_before);
  CHECK(ping_ms(server.port, opts(), "tcp", 1 << 20) < 1000);
  // The stalled connection is closed once its queue has not moved for the window.
  CHECK(!server.events.wait_reason("is not reading its replies", Ms(5000)).empty());
  release.store(true);
  CHECK(bad_events.wait_disconnects(1, Ms(3000)));
  CHECK(got.load() >= 1);
}

// Sends 40 PUSHes of 70-300 KiB to an echo server over `kind`; the client's
// handler (its reader thread) sleeps `stall(i)` on reply i. Every reply must
// arrive, in order and intact, and the server must close nothing.
// True where the ucx transport loads (this build has the plugin and the host
// libucp); otherwise says why the ucx case is skipped.
bool ucx_here() {
  std::string why;
  if (load_ucx_plugin(&why) != nullptr) return true;
  std::printf("  (ucx skipped: %s)\n", why.c_str());
  return false;
}

void check_slow_reader_gets_every_reply(const char* kind, const TransportOptions& o,
                                        const std::function<Ms(size_t)>& stall) {
  // A ucx client needs a ucx server; shm and tcp ones talk to "auto".
  ShardEchoServer server(o, std::string(kind) == "ucx" ? "ucx" : "auto");
  std::mutex mu;
  std::vector<Message> replies;
  auto c = Transport::create(kind, o);
  c->set_handler([&](ConnId, Message&& m) {
    size_t i;
    {
      std::lock_guard<std::mutex> lock(mu);
      i = replies.size();
    }
    std::this_thread::sleep_for(stall(i));
    std::lock_guard<std::mutex> lock(mu);
    replies.push_back(std::move(m));
  });
  ConnId id = c->connect("127.0.0.1", server.port, 2);
  std::mt19937 rng(3);
  std::vector<std::vector<uint8_t>> bodies;
  MessageHeader h;
  h.op = Op::kPush;
  for (int i = 0; i < 40; ++i) {
    std::vector<uint8_t> b((i % 4 == 0 ? 300 << 10 : 70 << 10) + i);
    for (auto& v : b) v = static_cast<uint8_t>(rng());
    bodies.push_back(std::move(b));
    ConstBuffer seg{bodies.back().data(), bodies.back().size()};
    h.request_id = i;
    c->send(id, h, &seg, 1);
  }
  auto deadline = Clock::now() + Ms(20000);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (replies.size() == bodies.size() || Clock::now() > deadline) break;
    }
    std::this_thread::sleep_for(Ms(5));
  }
  std::lock_guard<std::mutex> lock(mu);
  if (replies.size() != bodies.size())
    std::fprintf(stderr, "  %s: %zu of %zu replies arrived\n", kind, replies.size(), bodies.size());
  CHECK(replies.size() == bodies.size());
  for (size_t i = 0; i < replies.size() && i < bodies.size(); ++i) {
    CHECK(replies[i].header.request_id == i);
    CHECK(replies[i].payload.size() == bodies[i].size() &&
          std::memcmp(replies[i].payload.data(), bodies[i].data(), bodies[i].size()) == 0);
  }
  CHECK(server.events.disconnect_count() == 0);
}

// A reader that is slow but alive gets every reply, in order and intact,
// whichever way each went (by reference, revoked and queued, or copied; over
// UCX eager or rendezvous, sent at once or copied and posted).
TEST(slow_reader_gets_every_reply_intact_tcp_shm_and_ucx) {
  for (const char* kind : {"tcp", "shm", "ucx"}) {
    if (std::string(kind) == "ucx" && !ucx_here()) continue;
    // Past kByRefGrace now and then.
    check_slow_reader_gets_every_reply(kind, stall_opts(), [](size_t i) { return Ms(i % 3 == 0 ? 15 : 0); });
  }
}

// Note [No handlers under UCX's lock]: a server whose handler takes a lock that
// its shard thread holds while it sends a reply (as a handler running a task
// inline on a busy shard does). With handlers run inside UCX's callbacks the
// two waited for each other for good; every reply must arrive.
TEST(ucx_handler_waiting_for_a_sending_shard_does_not_deadlock) {
  if (!ucx_here()) return;
  TransportOptions o = opts();
  auto server = Transport::create("ucx", o);
  std::mutex shard_mu;  // the "shard": held by the shard thread while it sends
  std::mutex q_mu;
  std::condition_variable q_cv;
  std::deque<std::pair<ConnId, Message>> work;
  bool stop = false;
  server->set_handler([&](ConnId c, Message&& m) {
    { std::lock_guard<std::mutex> shard(shard_mu); }  // waits for a send under way
    std::lock_guard<std::mutex> lock(q_mu);
    work.emplace_back(c, std::move(m));
    q_cv.notify_all();
  });
  uint16_t port = server->listen("127.0.0.1", 0);
  Transport* raw = server.get();
  std::thread shard([&] {
    for (;;) {
      std::pair<ConnId, Message> item;
      {
        std::unique_lock<std::mutex> lock(q_mu);
        q_cv.wait(lock, [&] { return stop || !work.empty(); });
        if (stop) return;
        item = std::move(work.front());
        work.pop_front();
      }
      std::lock_guard<std::mutex> shard(shard_mu);
      MessageHeader h = item.second.header;
      h.op = Op::kReply;
      ConstBuffer seg{item.second.payload.data(), item.second.payload.size()};
      try {
        raw->send(item.first, h, &seg, 1);
      } catch (const Error&) {
      }
    }
  });
  Inbox in;
  auto client = Transport::create("ucx", o);
  in.attach(*client);
  ConnId id = client->connect("127.0.0.1", port, 1);
  std::vector<uint8_t> body(64 << 10, 7);
  const size_t n = 300;
  std::atomic<bool> send_failed{false};
  std::thread sender([&] {
    MessageHeader h;
    h.op = Op::kPush;
    try {
      for (size_t i = 0; i < n; ++i) {
        h.request_id = i;
        ConstBuffer seg{body.data(), body.size() / (1 + i % 7)};
        client->send(id, h, &seg, 1);
      }
    } catch (const Error& e) {
      std::fprintf(stderr, "  send failed: %s\n", e.what());
      send_failed = true;
    }
  });
  sender.join();
  CHECK(!send_failed && in.wait_frames(n, Ms(30000)));
  {
    std::lock_guard<std::mutex> lock(q_mu);
    stop = true;
    q_cv.notify_all();
  }
  shard.join();
}

// The demo's failure: with a ring roomy enough for a revoked payload to drain
// into while the reader sleeps, the server revokes the next by-reference reply
// too, before the reader reaches the first. The reader must take both as
// revoked (it closed the connection as "out of step" before the fix).
TEST(shm_reader_stalled_past_two_revoked_replies_gets_them_all) {
  TransportOptions o = opts();
  o.shm_ring_bytes = 8 << 20;
  check_slow_reader_gets_every_reply("shm", o, [](size_t i) { return Ms(i % 8 == 0 ? 60 : 0); });
}

// Note [By-reference frame states], on one segment mapped twice in this
// process: every way a frame can end, decided by whichever side moves first.
TEST(shm_byref_frames_end_copied_or_revoked_claimed_or_not) {
  std::unique_ptr<ShmSegment> client = ShmSegment::create(kShmMinRingBytes);
  std::string why;
  std::unique_ptr<ShmSegment> server = ShmSegment::open(client->name(), client->token(), client->ring_bytes(), &why);
  CHECK(server != nullptr);
  if (!server) return;
  ShmRing& tx = server->tx();  // server -> client
  ShmRing& rx = client->rx();
  // 1: copied; a late revoke finds it so.
  uint64_t seq = tx.next_byref_seq();
  CHECK(rx.claim_byref() == ShmRing::Claim::kClaimed);
  CHECK(!tx.revoke_byref(seq, false));
  CHECK(rx.byref_copied());
  CHECK(!tx.revoke_byref(seq, true));
  // 2: revoked while the reader copies (a stopped reader): its copy is dropped.
  seq = tx.next_byref_seq();
  CHECK(rx.claim_byref() == ShmRing::Claim::kClaimed);
  CHECK(!tx.revoke_byref(seq, false));
  CHECK(tx.revoke_byref(seq, true));
  CHECK(!rx.byref_copied());
  // 3 and 4: revoked before the reader reached either; both read as revoked.
  seq = tx.next_byref_seq();
  CHECK(tx.revoke_byref(seq, false));
  seq = tx.next_byref_seq();
  CHECK(tx.revoke_byref(seq, false));
  CHECK(rx.claim_byref() == ShmRing::Claim::kRevoked);
  CHECK(rx.claim_byref() == ShmRing::Claim::kRevoked);
  // 5: claimed and copied as usual afterwards.
  seq = tx.next_byref_seq();
  CHECK(rx.claim_byref() == ShmRing::Claim::kClaimed);
  CHECK(rx.byref_copied());
  const std::atomic<bool> never{false};
  CHECK(tx.wait_byref(seq, never, Clock::now() + Ms(100)));
  // A reader claiming a frame the writer never announced is out of step.
  CHECK(rx.claim_byref() == ShmRing::Claim::kClaimed);  // (frame 6: claimable from 5's final state)
  CHECK(rx.claim_byref() == ShmRing::Claim::kBroken);   // frame 7 while 6 is claimed
}

// --- Note [Liveness] --------------------------------------------------------------------------

TEST(idle_connections_stay_open_on_heartbeats_tcp_shm_and_ucx) {
  TransportOptions o = opts();
  o.liveness_timeout = Ms(300);
  for (const char* kind : {"tcp", "shm", "ucx"}) {
    if (std::string(kind) == "ucx" && !ucx_here()) continue;
    ShardEchoServer server(o, std::string(kind) == "ucx" ? "ucx" : "auto");
    Inbox in;
    auto c = Transport::create(kind, o);
    in.attach(*c);
    ConnId id = c->connect("127.0.0.1", server.port, 1);
    std::this_thread::sleep_for(Ms(1500));  // five windows with nothing but heartbeats
    CHECK(in.disconnect_count() == 0 && server.events.disconnect_count() == 0);
    MessageHeader h;
    h.op = Op::kPing;
    c->send(id, h);
    CHECK(in.wait_frames(1));
    CHECK(c->stats().messages_received == 1);  // heartbeats are not messages
  }
}

TEST(server_closes_a_silent_peer_and_names_it) {
  TransportOptions o = opts();
  o.liveness_timeout = Ms(400);
  ShardEchoServer server(o, "tcp");
  int fd = raw_connect(server.port);
  CHECK(fd >= 0 && raw_handshake(fd, "job-secret", 5));
  // The server's heartbeats arrive while this side says nothing ...
  Message m;
  CHECK(raw_read_frame(fd, &m) && m.header.op == Op::kHeartbeat && m.header.payload_len == 0);
  // ... and it gives up on this side after the window.
  auto t0 = Clock::now();
  CHECK(raw_wait_closed(fd, Ms(3000)));
  CHECK(Clock::now() - t0 < Ms(1500));
  CHECK(server.events.wait_disconnects(1));
  const std::string why = server.events.last_reason();
  CHECK(why.find("(rank 5) sent nothing for 0.4 s") != std::string::npos &&
        why.find("FASTPS_LIVENESS_TIMEOUT") != std::string::npos);
  ::close(fd);
}

TEST(client_closes_a_silent_server_and_names_it) {
  RawServer raw;
  std::atomic<int> accepted{-1};
  std::thread th = accept_and_authenticate(raw, accepted);
  TransportOptions o = opts();
  o.liveness_timeout = Ms(400);
  Inbox in;
  auto client = Transport::create("tcp", o);
  in.attach(*client);
  auto t0 = Clock::now();
  client->connect("127.0.0.1", raw.port, 0);
  th.join();
  CHECK(in.wait_disconnects(1, Ms(3000)));
  CHECK(Clock::now() - t0 < Ms(1500));
  CHECK(in.last_reason().find("server 127.0.0.1:" + std::to_string(raw.port) + " sent nothing") != std::string::npos);
  ::close(accepted.load());
}

TEST(liveness_off_keeps_a_silent_peer) {
  TransportOptions o = opts();
  o.liveness_timeout = Ms(0);
  ShardEchoServer server(o, "tcp");
  int fd = raw_connect(server.port);
  CHECK(fd >= 0 && raw_handshake(fd, "job-secret", 5));
  CHECK(!raw_wait_closed(fd, Ms(800)));
  ::close(fd);
}

// ---------------------------------------------------------------------------------------

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  // UCX over loopback: its TCP transport on lo (docs/ucx.md); the environment wins.
  setenv("UCX_TLS", "tcp,self", 0);
  setenv("UCX_NET_DEVICES", "lo", 0);
  // Rendezvous from 128 KiB (UCX's TCP default is higher): the 300 KiB replies of
  // slow_reader_gets_every_reply complete after the 70 KiB eager ones behind them,
  // which must still be delivered in order.
  setenv("UCX_RNDV_THRESH", "128k", 0);
  int passed = 0, failed = 0;
  auto all0 = Clock::now();
  for (auto& t : registry()) {
    if (filter != nullptr && std::strstr(t.name, filter) == nullptr) continue;
    int before = g_check_failures;
    auto t0 = Clock::now();
    std::printf("[ RUN  ] %s\n", t.name);
    std::fflush(stdout);
    bool ok = true;
    try {
      t.fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  unexpected exception: %s\n", e.what());
      ok = false;
    }
    ok = ok && g_check_failures == before;
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    std::printf("[ %s ] %s (%.0f ms)\n", ok ? " OK " : "FAIL", t.name, ms);
    std::fflush(stdout);
    (ok ? passed : failed)++;
  }
  double secs = std::chrono::duration<double>(Clock::now() - all0).count();
  std::printf("%d passed, %d failed (%.1f s)\n", passed, failed, secs);
  return failed == 0 ? 0 : 1;
}
