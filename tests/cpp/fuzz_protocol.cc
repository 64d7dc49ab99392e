// Seeded fuzzing of everything that decodes bytes a peer or a file controls
// (docs/fuzzing.md: what is fuzzed, how to run longer, how to reproduce).
//
// Targets, each checked against invariants (an oracle), not only "no crash":
//  * header, hello, error_text, optim_config, sparse_config, sparse_optim:
//    the pure codecs of protocol/message.h and protocol/sparse_wire.h, fed
//    mutated bytes; each result is compared with a restatement of
//    docs/protocol.md and must round-trip through its encoder.
//  * table_file: ShardedSparseTable::load() of mutated table files; a load
//    either fails with a typed error and leaves the table exactly as it was,
//    or succeeds only with a valid checksum and re-saves/reloads identically.
//  * server: a live PsServer on loopback. Client sockets send seeded mutated
//    byte streams before the handshake, during it (HELLO/AUTH with correct
//    and wrong HMACs) and after a valid one (well-framed mutated frames, then
//    raw mutated streams). Every connection must be answered or closed within
//    a deadline, the server must accept exactly the handshakes the spec
//    accepts, never send an invalid frame or one larger than the client
//    announced, and a well-behaved client on another connection must get
//    correct answers throughout. Memory held after the fuzz connections are
//    gone must be bounded by the bytes they sent. A connection stalled in
//    the handshake must be closed at the handshake deadline.
//  * client: Transport::connect() against a fake server that mutates
//    CHALLENGE and AUTH_OK, then a stream of frames to the connected client:
//    connect succeeds exactly when the spec says it should (typed errors
//    otherwise, promptly), and the client delivers exactly the valid frames
//    that precede the first invalid one, byte for byte, then disconnects.
//  * stream: one input = raw bytes sent after a valid handshake (the
//    libFuzzer-style entry point's network target).
//
// Every input derives from (--seed, target, iteration) through
// std::mt19937_64, so a failure names the command that reproduces it.
// Prints "N passed, M failed" (one per target) like the other C++ tests and
// exits non-zero on failure.
//
// Built with -DFASTPS_LIBFUZZER (clang -fsanitize=fuzzer, see
// tests/cpp/CMakeLists.txt) the file instead provides LLVMFuzzerTestOneInput:
// the first byte of an input picks a one-input target, the rest is its input.
// `--replay FILE...` runs such inputs through the same code in this driver.
#include <arpa/inet.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FUZZ_SANITIZED 1
// Exported by libasan and libtsan (GCC ships no header for the first).
extern "C" size_t __sanitizer_get_current_allocated_bytes();
extern "C" void __sanitizer_set_death_callback(void (*callback)());
#else
#define FUZZ_SANITIZED 0
#endif

#include "client/sparse_client.h"
#include "common/error.h"
#include "common/futex.h"
#include "common/hash.h"
#include "common/sha256.h"
#include "server/ps_server.h"
#include "server/server.h"
#include "protocol/sparse_wire.h"
#include "table/sparse_table.h"
#include "protocol/message.h"
#include "transport/transport.h"

using namespace fastps;
using Ms = std::chrono::milliseconds;
using Bytes = std::vector<uint8_t>;
using Rng = std::mt19937_64;

namespace {

// Sanitizers make everything several times slower; deadlines scale with them.
constexpr int kSlow = FUZZ_SANITIZED ? 6 : 1;

// --- Failures and reproduction ---------------------------------------------------

// An invariant broke. Never a fastps::Error, so a checker cannot swallow it.
struct FuzzFailure : std::logic_error {
  using std::logic_error::logic_error;
};

#define FUZZ_CHECK(cond, ...)                                                                        \
  do {                                                                                               \
    if (!(cond))                                                                                     \
      throw FuzzFailure(::fastps::detail::concat("invariant broken at fuzz_protocol.cc:", __LINE__, \
                                                 ": " #cond "; ", __VA_ARGS__));                     \
  } while (0)

// What the process is doing, for a crash or a hang: printed by the watchdog
// and the fatal-signal handler (a fixed buffer, so the handler can print it).
char g_current[512] = "starting";
std::mutex g_current_mu;

void set_current(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_current_mu);
  std::snprintf(g_current, sizeof(g_current), "%s", what.c_str());
}

#if !FUZZ_SANITIZED
void print_current_and_die(int sig) {
  const char head[] = "\nfuzz_protocol: fatal signal while running: ";
  ssize_t ignored = ::write(2, head, sizeof(head) - 1);
  ignored = ::write(2, g_current, std::strlen(g_current));
  ignored = ::write(2, "\n", 1);
  (void)ignored;
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}
#endif

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  return mix64(seed ^ mix64(a * 0x9e3779b97f4a7c15ULL + mix64(b + 0x632be59bd9b4e019ULL)));
}

size_t below(Rng& r, size_t n) { return n == 0 ? 0 : static_cast<size_t>(r() % n); }
bool chance(Rng& r, int percent) { return below(r, 100) < static_cast<size_t>(percent); }

std::string hex_prefix(const uint8_t* p, size_t n, size_t max = 96) {
  std::string s = to_hex(p, std::min(n, max));
  if (n > max) s += detail::concat("... (", n, " bytes)");
  return s;
}

// --- Mutation -----------------------------------------------------------------------

// Values at and around the limits and layouts of docs/protocol.md (header
// and block sizes, staging buffer, max_payload, dim, count, sign boundaries).
const uint64_t kInteresting[] = {
    0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 40, 47, 48, 63, 64, 79, 80, 81, 127, 128, 255, 256, 4095, 4096, 4097,
    65535, 65536, (256u << 10) - 1, 256u << 10, (256u << 10) + 1, (1u << 20) - 1, 1u << 20, (1u << 20) + 1,
    1u << 24, (1u << 24) + 1, 1u << 28, 1u << 30, 0x7fffffffULL, 0x80000000ULL, 0xffffffffULL, 0x100000000ULL,
    0x7fffffffffffffffULL, 0x8000000000000000ULL, 0xfffffffffffffffeULL, 0xffffffffffffffffULL};

uint64_t interesting(Rng& r) {
  uint64_t v = kInteresting[below(r, sizeof(kInteresting) / sizeof(kInteresting[0]))];
  if (chance(r, 10)) v = ~v + 1;  // negated: -1, -4096, ...
  return v;
}

void store_width(uint8_t* p, int width, uint64_t v) {
  for (int i = 0; i < width; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t load_width(const uint8_t* p, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// One to four random edits of `b` (bit flips, interesting integers, inserted,
// erased, duplicated or spliced ranges), never past `max_size` bytes.
void mutate_bytes(Rng& r, Bytes& b, size_t max_size, const std::vector<Bytes>* pool = nullptr) {
  const int edits = 1 + static_cast<int>(below(r, 4));
  for (int e = 0; e < edits; ++e) {
    const int widths[] = {1, 2, 4, 8};
    switch (below(r, 10)) {
      case 0:
        if (!b.empty()) b[below(r, b.size())] ^= static_cast<uint8_t>(1u << below(r, 8));
        break;
      case 1:
        if (!b.empty()) b[below(r, b.size())] = static_cast<uint8_t>(r());
        break;
      case 2: {
        const uint8_t v[] = {0, 1, 0x7f, 0x80, 0xff, 0xc0, 0xe0, 0xf0, 0xed, 0xf4};
        if (!b.empty()) b[below(r, b.size())] = v[below(r, sizeof(v))];
        break;
      }
      case 3:
      case 9: {
        const int w = widths[below(r, 4)];
        if (b.size() < size_t(w)) break;
        // Aligned offsets hit the fields of the fixed layouts more often.
        size_t at = below(r, b.size() - w + 1);
        if (chance(r, 60)) at -= at % w;
        if (e % 2 == 0) {
          store_width(b.data() + at, w, interesting(r));
        } else {
          const int64_t delta = static_cast<int64_t>(below(r, 33)) - 16;
          store_width(b.data() + at, w, load_width(b.data() + at, w) + static_cast<uint64_t>(delta));
        }
        break;
      }
      case 4: {
        const size_t n = 1 + below(r, 16);
        if (b.size() + n > max_size) break;
        Bytes ins(n);
        for (auto& x : ins) x = static_cast<uint8_t>(r());
        b.insert(b.begin() + static_cast<long>(below(r, b.size() + 1)), ins.begin(), ins.end());
        break;
      }
      case 5:
        if (!b.empty()) {
          const size_t at = below(r, b.size());
          const size_t n = 1 + below(r, std::min<size_t>(b.size() - at, 32));
          b.erase(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + n));
        }
        break;
      case 6:
        if (!b.empty()) {
          const size_t at = below(r, b.size());
          const size_t n = 1 + below(r, std::min<size_t>(b.size() - at, 64));
          if (b.size() + n > max_size) break;
          Bytes copy(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + n));
          b.insert(b.begin() + static_cast<long>(below(r, b.size() + 1)), copy.begin(), copy.end());
        }
        break;
      case 7:
        if (!b.empty()) b.resize(below(r, b.size()));
        break;
      case 8:
        if (pool != nullptr && !pool->empty()) {
          const Bytes& other = (*pool)[below(r, pool->size())];
          if (other.empty()) break;
          const size_t from = below(r, other.size());
          const size_t n = 1 + below(r, std::min<size_t>(other.size() - from, 64));
          const size_t at = below(r, b.size() + 1);
          for (size_t i = 0; i < n && at + i < max_size; ++i) {
            if (at + i < b.size()) b[at + i] = other[from + i];
            else b.push_back(other[from + i]);
          }
        }
        break;
    }
  }
}

// --- Frames -------------------------------------------------------------------------

struct Frame {
  MessageHeader h;
  Bytes payload;
};

const uint8_t kKnownOps[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24, 32, 33, 34, 35, 36, 37};

Op random_known_op(Rng& r) { return static_cast<Op>(kKnownOps[below(r, sizeof(kKnownOps))]); }

void append_frame(Bytes& out, const Frame& f) {
  MessageHeader h = f.h;
  h.payload_len = f.payload.size();
  uint8_t hb[kHeaderSize];
  encode_header(h, hb);
  out.insert(out.end(), hb, hb + kHeaderSize);
  out.insert(out.end(), f.payload.begin(), f.payload.end());
}

Bytes serialize(const std::vector<Frame>& frames) {
  Bytes out;
  for (const Frame& f : frames) append_frame(out, f);
  return out;
}

// One random edit of a header field; payload_len follows the payload.
void mutate_header(Rng& r, Frame& f) {
  MessageHeader& h = f.h;
  switch (below(r, 14)) {
    case 0: h.magic = chance(r, 50) ? static_cast<uint32_t>(r()) : h.magic ^ (1u << below(r, 32)); break;
    case 1: h.version = static_cast<uint16_t>(chance(r, 50) ? interesting(r) : h.version + 1); break;
    case 2: h.op = static_cast<Op>(static_cast<uint8_t>(r())); break;
    case 3:
    case 4:
    case 5: h.op = random_known_op(r); break;  // cross-op confusion: the commonest bug class
    case 6: h.flags = chance(r, 50) ? static_cast<uint8_t>(r()) : static_cast<uint8_t>(below(r, 8)); break;
    case 7: h.status = static_cast<uint32_t>(chance(r, 50) ? interesting(r) : below(r, 10)); break;
    case 8: h.count = static_cast<uint32_t>(chance(r, 50) ? interesting(r) : f.payload.size() / (4u << below(r, 2))); break;
    case 9: h.request_id = chance(r, 50) ? r() : interesting(r); break;
    case 10: h.key = chance(r, 70) ? below(r, 10) : interesting(r); break;
    case 11:
    case 12: h.aux = static_cast<uint32_t>(chance(r, 50) ? interesting(r) : below(r, 8)); break;
    case 13: h.reserved = static_cast<uint32_t>(interesting(r) | 1); break;
  }
}

// Edits the frame's header or payload (payload_len stays consistent).
void mutate_frame(Rng& r, Frame& f, size_t max_payload, const std::vector<Bytes>* pool = nullptr) {
  const int edits = 1 + static_cast<int>(below(r, 3));
  for (int e = 0; e < edits; ++e) {
    if (chance(r, 55)) {
      mutate_header(r, f);
    } else {
      mutate_bytes(r, f.payload, max_payload, pool);
    }
  }
}

// The restatement of docs/protocol.md "Frame header" and "Limits" the header
// target checks header_problem() against (written from the spec, not the code).
bool spec_header_ok(const MessageHeader& h, uint64_t max_payload) {
  const uint8_t op = static_cast<uint8_t>(h.op);
  // ops 1-14 (11: HEARTBEAT, 12-14: UCX), 16-25 (25: APPLY), 32-37; flags 0x01-0x10 (docs/protocol.md, version 2)
  const bool known = (op >= 1 && op <= 14) || (op >= 16 && op <= 25) || (op >= 32 && op <= 37);
  const bool handshake = op >= 1 && op <= 4;
  const uint64_t max_count = std::min<uint64_t>(max_payload / 4, 0xffffffffULL);
  return h.magic == 0x31535046 && h.version == 2 && known && !handshake && (h.flags & ~0x1f) == 0 &&
         h.reserved == 0 && (op == 5 ? h.status != 0 : h.status == 0) && h.payload_len <= max_payload &&
         h.count <= max_count && (op != 5 || h.payload_len <= 4096);
}

// --- Pure targets ---------------------------------------------------------------------

void check_header(const uint8_t* data, size_t size) {
  if (size < kHeaderSize) return;
  uint64_t max_payload = kDefaultMaxPayload;
  if (size >= kHeaderSize + 8)
    max_payload = kMinMaxPayload + load_le64(data + kHeaderSize) % (kMaxMaxPayload - kMinMaxPayload + 1);
  const MessageHeader h = decode_header(data);
  uint8_t again[kHeaderSize];
  encode_header(h, again);
  FUZZ_CHECK(std::memcmp(again, data, kHeaderSize) == 0, "encode(decode(b)) != b for ", hex_prefix(data, 48));
  FUZZ_CHECK(decode_header(again) == h, "decode(encode(h)) != h");
  const std::string problem = header_problem(h, max_payload);
  FUZZ_CHECK(problem.empty() == spec_header_ok(h, max_payload), "header_problem says \"", problem,
             "\" but the spec says ", spec_header_ok(h, max_payload) ? "valid" : "invalid", " for ",
             hex_prefix(data, 48), " under max_payload ", max_payload);
  bool threw = false;
  try {
    validate_header(h, max_payload);
  } catch (const ProtocolError& e) {
    threw = true;
    FUZZ_CHECK(problem == e.what(), "validate_header's message differs from header_problem's");
  }
  FUZZ_CHECK(threw == !problem.empty(), "validate_header disagrees with header_problem");
  FUZZ_CHECK(!op_name(h.op).empty() && !status_name(h.status).empty(), "empty op or status name");
}

Bytes gen_header(Rng& r) {
  Frame f;
  f.h.op = chance(r, 90) ? random_known_op(r) : static_cast<Op>(static_cast<uint8_t>(r()));
  if (f.h.op == Op::kError) f.h.status = 1 + static_cast<uint32_t>(below(r, 8));
  f.h.count = static_cast<uint32_t>(below(r, 1000));
  f.h.key = r();
  f.h.request_id = r();
  f.h.aux = static_cast<uint32_t>(below(r, 10));
  f.h.flags = static_cast<uint8_t>(below(r, 8));
  f.h.payload_len = chance(r, 50) ? below(r, 5000) : interesting(r);
  uint8_t hb[kHeaderSize];
  encode_header(f.h, hb);
  Bytes b(hb, hb + kHeaderSize);  // mutated in place: the size stays
  if (chance(r, 80)) {
    for (int i = 0; i < 1 + int(below(r, 3)); ++i) {
      const int widths[] = {1, 2, 4, 8};
      const int w = widths[below(r, 4)];
      size_t at = below(r, kHeaderSize - w + 1);
      at -= at % w;
      if (chance(r, 50)) store_width(b.data() + at, w, interesting(r));
      else b[below(r, kHeaderSize)] ^= static_cast<uint8_t>(1u << below(r, 8));
    }
  }
  const uint64_t max = chance(r, 50) ? interesting(r) : r();
  uint8_t mb[8];
  store_le64(mb, max);
  b.insert(b.end(), mb, mb + 8);
  return b;
}

void check_hello(const uint8_t* data, size_t size) {
  bool threw = false;
  Hello h;
  try {
    h = decode_hello(data, size);
  } catch (const ProtocolError&) {
    threw = true;
  }
  FUZZ_CHECK(threw == (size != kHelloSize), "decode_hello of ", size, " bytes ", threw ? "threw" : "returned");
  if (threw) return;
  FUZZ_CHECK(h.version == load_le32(data) && h.rank == static_cast<int32_t>(load_le32(data + 4)) &&
                 h.max_payload == load_le64(data + 8),
             "decode_hello fields");
  uint8_t again[kHelloSize];
  encode_hello(h, again);
  FUZZ_CHECK(std::memcmp(again, data, kHelloSize) == 0, "encode_hello(decode_hello(b)) != b");
}

Bytes gen_hello(Rng& r) {
  Hello h;
  h.rank = static_cast<int32_t>(below(r, 4)) - 1;
  h.max_payload = interesting(r);
  Bytes b(kHelloSize);
  encode_hello(h, b.data());
  if (chance(r, 70)) mutate_bytes(r, b, 64);
  return b;
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      const uint8_t d = static_cast<uint8_t>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += n;
  }
  return true;
}

bool printable(const std::string& s) {
  for (char ch : s) {
    const uint8_t c = static_cast<uint8_t>(ch);
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

void check_error_text(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const std::string out = sanitize_error_text(data, size);
  FUZZ_CHECK(out.size() == size, "sanitize_error_text changed the length: ", size, " -> ", out.size());
  FUZZ_CHECK(valid_utf8(out) && printable(out), "sanitize_error_text produced invalid or unprintable text from ",
             hex_prefix(data, size));
  FUZZ_CHECK(sanitize_error_text(reinterpret_cast<const uint8_t*>(out.data()), out.size()) == out,
             "sanitize_error_text is not idempotent");
  if (valid_utf8(in) && printable(in)) FUZZ_CHECK(out == in, "sanitize_error_text changed clean text");
  const size_t max = size == 0 ? 0 : data[0] % (size + 1);
  const std::string cut = truncate_utf8(in, max);
  FUZZ_CHECK(in.compare(0, cut.size(), cut) == 0, "truncate_utf8 is not a prefix");
  FUZZ_CHECK(in.size() <= max ? cut == in : cut.size() <= max, "truncate_utf8 to ", max, " bytes gave ", cut.size());
  if (valid_utf8(in)) {
    FUZZ_CHECK(valid_utf8(cut), "truncate_utf8 split a character of ", hex_prefix(data, size));
    if (in.size() > max) FUZZ_CHECK(max - cut.size() < 4, "truncate_utf8 cut more than one character");
  }
  // What a transport does with a message it sends: never longer than the limit.
  FUZZ_CHECK(truncate_utf8(in).size() <= kMaxErrorMessage, "default truncation past kMaxErrorMessage");
}

Bytes gen_error_text(Rng& r) {
  static const char* const kSamples[] = {"plain ascii message", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
                                         "\xed\xa0\x80 surrogate", "\xc0\xaf overlong", "tab\there\nnewline",
                                         "\xf4\x90\x80\x80 too high"};
  const char* s = kSamples[below(r, sizeof(kSamples) / sizeof(kSamples[0]))];
  Bytes b(s, s + std::strlen(s));
  if (chance(r, 30)) b.resize(below(r, 6000), static_cast<uint8_t>('x'));
  mutate_bytes(r, b, 8192);
  return b;
}

void check_optim_config(const uint8_t* data, size_t size) {
  const bool spec_ok = size >= kOptimConfigSize && load_le32(data) >= kOptimConfigSize && load_le32(data) <= size &&
                       data[4] <= 2 && (data[5] & ~0x0f) == 0 && data[6] == 0 && data[7] == 0;
  size_t block = 0;
  OptimHyper h;
  bool ok = true;
  try {
    h = decode_optim_config(data, size, &block);
  } catch (const ProtocolError&) {
    ok = false;
  }
  FUZZ_CHECK(ok == spec_ok, "decode_optim_config ", ok ? "accepted" : "refused", " ", hex_prefix(data, size));
  if (!ok) return;
  FUZZ_CHECK(block == load_le32(data), "block size ", block);
  uint8_t again[kOptimConfigSize];
  encode_optim_config(h, again);
  FUZZ_CHECK(std::memcmp(again + 4, data + 4, kOptimConfigSize - 4) == 0,
             "encode_optim_config(decode_optim_config(b)) differs from b");
}

Bytes gen_optim_config(Rng& r) {
  OptimHyper h;
  h.kind = static_cast<OptimKind>(below(r, 3));
  h.lr = 0.01 * static_cast<double>(below(r, 100));
  h.nesterov = chance(r, 30);
  h.amsgrad = chance(r, 30);
  Bytes b(kOptimConfigSize);
  encode_optim_config(h, b.data());
  if (chance(r, 20)) b.resize(b.size() + below(r, 64), 0);
  if (chance(r, 85)) mutate_bytes(r, b, 256);
  return b;
}

SparseTableConfig random_sparse_config(Rng& r) {
  SparseTableConfig c;
  c.dim = 1 + static_cast<int64_t>(below(r, 16));
  c.rule = static_cast<SparseRule>(below(r, kNumSparseRules));
  c.init = static_cast<SparseInit>(below(r, 3));
  c.init_a = c.init == SparseInit::kNormal ? 0.0 : -0.1;
  c.init_b = 0.1;
  c.seed = below(r, 4);
  c.eviction = static_cast<Eviction>(below(r, 4));
  c.ttl_steps = c.eviction == Eviction::kTtl ? 1 + static_cast<int64_t>(below(r, 4)) : 0;
  c.max_rows = c.eviction == Eviction::kNone && chance(r, 50) ? 0 : 8 + static_cast<int64_t>(below(r, 64));
  c.admit_threshold = static_cast<int64_t>(below(r, 3));
  c.max_pending = 1 + static_cast<int64_t>(below(r, 1000));
  c.eviction_samples = 1 + static_cast<int>(below(r, 32));
  return c;
}

SparseOptim optim_for(SparseRule rule) {
  SparseOptim o;
  o.rule = rule;
  o.lr = 0.1;
  return o;
}

void check_sparse_config(const uint8_t* data, size_t size) {
  const bool framing_ok = size >= kSparseConfigSize && load_le32(data) == kSparseConfigSize &&
                          data[4] < kNumSparseRules && data[5] <= 2 && data[6] <= 3 && data[7] == 0 &&
                          load_le16(data + 76) < load_le16(data + 78);  // the server's place in the job
  SparseTableConfig c;
  SparseSpread spread;
  bool ok = true;
  try {
    c = decode_sparse_config(data, size, &spread);
  } catch (const ProtocolError&) {
    FUZZ_CHECK(!framing_ok, "decode_sparse_config threw ProtocolError for a well-framed block");
    return;
  } catch (const InvalidArgument&) {
    FUZZ_CHECK(framing_ok, "decode_sparse_config threw InvalidArgument for a malformed block");
    ok = false;
  }
  if (!ok) return;
  FUZZ_CHECK(framing_ok, "decode_sparse_config accepted ", hex_prefix(data, size));
  sparse_config_validate(c);  // must not throw: the decoder validated it
  uint8_t again[kSparseConfigSize];
  encode_sparse_config(c, spread, again);
  FUZZ_CHECK(std::memcmp(again, data, kSparseConfigSize) == 0, "encode(decode(b)) != b for ",
             hex_prefix(data, kSparseConfigSize));
  SparseSpread spread_again;
  FUZZ_CHECK(same_sparse_config(c, decode_sparse_config(again, kSparseConfigSize, &spread_again)) || c.init_a != c.init_a ||
                 c.init_b != c.init_b,
             "same_sparse_config(c, decode(encode(c))) is false");
  FUZZ_CHECK(!describe_sparse_config(c).empty(), "empty description");
}

Bytes gen_sparse_config(Rng& r) {
  Bytes b(kSparseConfigSize);
  encode_sparse_config(random_sparse_config(r), SparseSpread{}, b.data());
  if (chance(r, 85)) mutate_bytes(r, b, 200);
  return b;
}

void check_sparse_optim(const uint8_t* data, size_t size) {
  const bool framing_ok = size >= kSparseOptimSize && load_le32(data) == kSparseOptimSize &&
                          data[4] < kNumSparseRules && (data[5] & ~0x01) == 0 && load_le16(data + 6) == 0;
  SparseOptim o;
  try {
    o = decode_sparse_optim(data, size);
  } catch (const ProtocolError&) {
    FUZZ_CHECK(!framing_ok, "decode_sparse_optim threw ProtocolError for a well-framed block");
    return;
  } catch (const InvalidArgument&) {
    FUZZ_CHECK(framing_ok, "decode_sparse_optim threw InvalidArgument for a malformed block");
    return;
  }
  FUZZ_CHECK(framing_ok, "decode_sparse_optim accepted ", hex_prefix(data, size));
  sparse_optim_validate(o);
  uint8_t again[kSparseOptimSize];
  encode_sparse_optim(o, again);
  FUZZ_CHECK(std::memcmp(again, data, kSparseOptimSize) == 0, "encode(decode(b)) != b");
}

Bytes gen_sparse_optim(Rng& r) {
  SparseOptim o = optim_for(static_cast<SparseRule>(below(r, kNumSparseRules)));
  o.maximize = chance(r, 20);
  Bytes b(kSparseOptimSize);
  encode_sparse_optim(o, b.data());
  if (chance(r, 85)) mutate_bytes(r, b, 200);
  return b;
}

// --- Table files ----------------------------------------------------------------------

std::string g_tmp_dir;

const std::string& tmp_dir() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Table files are written with fsync: on tmpfs that costs nothing.
    const char* base = std::getenv("TMPDIR");
    std::string dir = base != nullptr && *base ? base : ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    std::string tmpl = dir + "/fastps-fuzz-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    g_tmp_dir = buf.data();
  });
  return g_tmp_dir;
}

void remove_tmp_dir() {
  if (g_tmp_dir.empty()) return;
  for (const char* name : {"load.bin", "resave.bin"}) ::unlink((g_tmp_dir + "/" + name).c_str());
  ::rmdir(g_tmp_dir.c_str());
}

Bytes read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const uint8_t* data, size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!f) throw std::runtime_error("cannot write " + path);
}

// Tables of a few configurations (ids, admission counts, caps, eviction),
// each with a valid file of itself as the seed.
struct TableFiles {
  static constexpr int kVariants = 4;
  Server server{ServerOptions{2}};
  std::vector<std::unique_ptr<ShardedSparseTable>> tables;
  std::vector<Bytes> seeds;
  std::vector<int64_t> probe_ids;

  static SparseTableConfig config(int v) {
    SparseTableConfig c;
    switch (v) {
      case 0: c.dim = 4; c.rule = SparseRule::kSGD; c.seed = 7; break;
      case 1: c.dim = 3; c.rule = SparseRule::kAdagrad; c.init = SparseInit::kNormal; c.init_a = 0; c.init_b = 0.1;
              c.admit_threshold = 2; break;
      case 2: c.dim = 8; c.rule = SparseRule::kSparseAdam; c.init = SparseInit::kZeros; c.eviction = Eviction::kLru;
              c.max_rows = 24; break;
      default: c.dim = 2; c.rule = SparseRule::kFtrl; c.eviction = Eviction::kTtl; c.ttl_steps = 3; break;
    }
    return c;
  }

  TableFiles() {
    for (int64_t id = -5; id < 40; id += 3) probe_ids.push_back(id * 1000003);
    for (int v = 0; v < kVariants; ++v) {
      const SparseTableConfig c = config(v);
      tables.push_back(std::make_unique<ShardedSparseTable>(server, c));
      ShardedSparseTable& t = *tables.back();
      Rng r(1000 + v);
      for (int64_t step = 1; step <= 3; ++step) {
        std::vector<int64_t> ids;
        for (int64_t id : probe_ids)
          if (chance(r, 60)) ids.push_back(id);
        std::vector<float> grads(ids.size() * size_t(c.dim));
        for (float& g : grads) g = static_cast<float>(static_cast<int>(below(r, 9)) - 4) * 0.25f;
        t.push(ids.data(), int64_t(ids.size()), grads.data(), optim_for(c.rule), step);
      }
      const std::string path = tmp_dir() + "/load.bin";
      t.save(path);
      seeds.push_back(read_file(path));
    }
  }
};

TableFiles& table_files() {
  static TableFiles t;
  return t;
}

struct TableSnapshot {
  int64_t step;
  int64_t size;
  std::vector<float> rows;
  bool operator==(const TableSnapshot& o) const {
    return step == o.step && size == o.size && rows.size() == o.rows.size() &&
           std::memcmp(rows.data(), o.rows.data(), rows.size() * sizeof(float)) == 0;
  }
};

TableSnapshot snapshot(ShardedSparseTable& t, const std::vector<int64_t>& ids) {
  TableSnapshot s;
  s.step = t.step();
  s.rows.resize(ids.size() * size_t(t.dim()));
  t.pull(ids.data(), int64_t(ids.size()), s.rows.data());
  s.size = t.size();  // after the pull: a pull frees rows the TTL expired
  return s;
}

void check_table_file(const uint8_t* data, size_t size) {
  if (size == 0) return;
  TableFiles& tf = table_files();
  const int v = data[0] % TableFiles::kVariants;
  ShardedSparseTable& t = *tf.tables[size_t(v)];
  const std::string path = tmp_dir() + "/load.bin";
  write_file(path, data + 1, size - 1);
  const TableSnapshot before = snapshot(t, tf.probe_ids);
  std::string error;
  try {
    t.load(path);
  } catch (const CheckpointError& e) {
    error = e.what();
  } catch (const InvalidArgument& e) {
    error = e.what();
  } catch (const CapacityError& e) {
    error = e.what();
  } catch (const Error& e) {
    FUZZ_CHECK(false, "load threw an unexpected fastps error: ", e.what());
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, "load of a ", size - 1, "-byte file threw a non-fastps exception: ", e.what());
  }
  if (!error.empty()) {
    FUZZ_CHECK(snapshot(t, tf.probe_ids) == before, "a failed load changed the live table (", error, ")");
    return;
  }
  // Accepted: only with a valid checksum, and it must survive a save/load cycle.
  FUZZ_CHECK(size - 1 >= kSha256DigestSize, "accepted a file shorter than its digest");
  const uint8_t* file = data + 1;
  const size_t body = size - 1 - kSha256DigestSize;
  const Sha256Digest d = sha256(file, body);
  FUZZ_CHECK(std::memcmp(d.data(), file + body, d.size()) == 0, "accepted a file whose checksum is wrong");
  const TableSnapshot loaded = snapshot(t, tf.probe_ids);
  const std::string resave = tmp_dir() + "/resave.bin";
  t.save(resave);
  t.load(resave);
  FUZZ_CHECK(snapshot(t, tf.probe_ids) == loaded, "save/load of a loaded table changed it");
}

Bytes gen_table_file(Rng& r) {
  TableFiles& tf = table_files();
  const int v = static_cast<int>(below(r, TableFiles::kVariants));
  Bytes b = tf.seeds[size_t(v)];
  if (chance(r, 90)) mutate_bytes(r, b, 1 << 16, &tf.seeds);
  // Half the time the checksum is made right again, so the mutation reaches
  // the checks behind it (a corrupt file is caught by the checksum alone).
  if (chance(r, 50) && b.size() >= kSha256DigestSize) {
    const Sha256Digest d = sha256(b.data(), b.size() - kSha256DigestSize);
    std::memcpy(b.data() + b.size() - kSha256DigestSize, d.data(), d.size());
  }
  b.insert(b.begin(), static_cast<uint8_t>(v));
  return b;
}

// --- Raw client sockets ---------------------------------------------------------------

const char kSecret[] = "fuzz-job-secret";
constexpr uint64_t kServerMaxPayload = 1 << 20;  // of the servers under test

// A client socket that reads while it writes (so replies never block the
// server on us), parses and validates every frame the server sends, and
// fails with FuzzFailure past a deadline.
class Peer {
 public:
  explicit Peer(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FUZZ_CHECK(fd_ >= 0, "socket: ", errno_text(errno));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    FUZZ_CHECK(::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0, "connect to the server: ",
               errno_text(errno));
    int one = 1;
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) | O_NONBLOCK);
  }
  ~Peer() {
    if (fd_ >= 0) ::close(fd_);
  }
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  // Frames the server may send from now on, and the largest payload.
  bool authenticated = false;
  uint64_t max_payload = kMaxHandshakePayload;
  // Request ids this client sent (a reply to anything else is a bug).
  std::set<uint64_t> sent_ids;
  uint64_t bytes_sent = 0;

  // Writes all of `data`; false if the server closed the connection first.
  bool send(const uint8_t* data, size_t n, Clock::time_point deadline) {
    while (n > 0) {
      if (!write_closed_) {
        ssize_t w = ::send(fd_, data, n, MSG_NOSIGNAL);
        if (w > 0) {
          data += w;
          n -= size_t(w);
          bytes_sent += uint64_t(w);
          continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
          write_closed_ = true;  // EPIPE, ECONNRESET: the server closed
          return false;
        }
      } else {
        return false;
      }
      pump(POLLOUT, deadline, "writing to the server");
      if (eof_ && !write_closed_) {
        // The server closed; what it did not read is lost, which is fine.
        write_closed_ = true;
        return false;
      }
    }
    return true;
  }
  bool send(const Bytes& b, Clock::time_point deadline) { return send(b.data(), b.size(), deadline); }

  // The next frame from the server, or false at end of stream.
  bool next_frame(Message* m, Clock::time_point deadline, const char* waiting_for) {
    for (;;) {
      if (parse(m)) return true;
      if (eof_) {
        FUZZ_CHECK(in_.size() == in_off_, "the server's stream ended inside a frame (",
                   in_.size() - in_off_, " bytes left over)");
        return false;
      }
      pump(0, deadline, waiting_for);
    }
  }

  void shutdown_write() {
    ::shutdown(fd_, SHUT_WR);
    write_closed_ = true;
  }

  // Reads (and validates) everything until the server closes.
  void wait_closed(Clock::time_point deadline, const char* why) {
    Message m;
    while (next_frame(&m, deadline, why)) {
    }
  }

  bool eof() const { return eof_; }
  int fd() const { return fd_; }

 private:
  // Waits (at most until the deadline, then fails) for the socket to become
  // readable or, with POLLOUT in `extra`, writable; reads what arrived.
  void pump(short extra, Clock::time_point deadline, const char* doing) {
    const auto left = std::chrono::duration_cast<Ms>(deadline - Clock::now()).count();
    pollfd p{fd_, static_cast<short>(POLLIN | extra), 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(left + 1, 100))));
    if (r > 0) {
      if (p.revents & (POLLIN | POLLHUP | POLLERR)) read_available();
      return;
    }
    FUZZ_CHECK(Clock::now() < deadline, "no progress within the deadline while ", doing);
  }

  void read_available() {
    uint8_t buf[64 << 10];
    for (;;) {
      ssize_t r = ::recv(fd_, buf, sizeof(buf), 0);
      if (r > 0) {
        if (in_off_ > (1 << 20) && in_off_ * 2 > in_.size()) {
          in_.erase(in_.begin(), in_.begin() + static_cast<long>(in_off_));
          in_off_ = 0;
        }
        in_.insert(in_.end(), buf, buf + r);
        continue;
      }
      if (r == 0 || (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)) {
        eof_ = true;  // orderly close or reset: either way, closed
        return;
      }
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    }
  }

  bool parse(Message* m) {
    if (in_.size() - in_off_ < kHeaderSize) return false;
    const MessageHeader h = decode_header(in_.data() + in_off_);
    validate_from_server(h);
    if (in_.size() - in_off_ < kHeaderSize + h.payload_len) return false;
    m->header = h;
    const uint8_t* p = in_.data() + in_off_ + kHeaderSize;
    m->payload.assign(p, p + h.payload_len);
    in_off_ += kHeaderSize + h.payload_len;
    if (h.op == Op::kAuthOk) authenticated = true;
    return true;
  }

  // Only frames the protocol lets a server send, within this client's limits.
  void validate_from_server(const MessageHeader& h) const {
    FUZZ_CHECK(h.magic == kProtocolMagic && h.version == kProtocolVersion, "the server sent a bad magic or version");
    if (!authenticated) {
      FUZZ_CHECK(h.op == Op::kChallenge || h.op == Op::kAuthOk || h.op == Op::kError,
                 "the server sent ", op_name(h.op), " before AUTH_OK");
      FUZZ_CHECK(h.payload_len <= kMaxHandshakePayload, "a ", h.payload_len, "-byte frame before AUTH_OK");
      return;
    }
    // A PONG carries the PING's count (docs/protocol.md), which this client
    // chose: it may exceed what the client's own limit allows.
    MessageHeader checked = h;
    if (h.op == Op::kPong) checked.count = 0;
    const std::string problem = header_problem(checked, max_payload);
    FUZZ_CHECK(problem.empty(), "the server sent an invalid frame: ", problem);
    FUZZ_CHECK(h.op == Op::kReply || h.op == Op::kError || h.op == Op::kPong || h.op == Op::kShmDecline ||
                   h.op == Op::kShmAccept || h.op == Op::kHeartbeat || h.op == Op::kUcxDecline ||
                   h.op == Op::kUcxAccept,
               "the server sent ", op_name(h.op));
    FUZZ_CHECK(h.request_id == 0 || h.op == Op::kShmDecline || h.op == Op::kShmAccept || h.op == Op::kHeartbeat ||
                   h.op == Op::kUcxDecline || h.op == Op::kUcxAccept || sent_ids.count(h.request_id) == 1,
               "the server answered request id ", h.request_id, ", which this connection never sent (",
               op_name(h.op), ")");
  }

  int fd_ = -1;
  Bytes in_;
  size_t in_off_ = 0;
  bool eof_ = false;
  bool write_closed_ = false;
};

// The request ids of the frames a server parses out of `stream`: frame after
// frame up to the first invalid header, where it closes the connection.
// Returns the bytes of those frames that are not PINGs.
uint64_t add_stream_request_ids(Peer& p, const uint8_t* stream, size_t size) {
  size_t off = 0;
  uint64_t state = 0;
  while (off + kHeaderSize <= size) {
    const MessageHeader h = decode_header(stream + off);
    p.sent_ids.insert(h.request_id);
    if (h.op != Op::kPing) state += kHeaderSize + std::min<uint64_t>(h.payload_len, size - off - kHeaderSize);
    if (!spec_header_ok(h, kServerMaxPayload)) break;
    off += kHeaderSize + h.payload_len;
  }
  return state;
}

Frame hello_frame(int rank, uint64_t max_payload) {
  Frame f;
  f.h.op = Op::kHello;
  Hello hello;
  hello.rank = rank;
  hello.max_payload = max_payload;
  f.payload.resize(kHelloSize);
  encode_hello(hello, f.payload.data());
  return f;
}

Frame auth_frame(const std::string& secret, const uint8_t* server_nonce, Rng& r) {
  Frame f;
  f.h.op = Op::kAuth;
  f.payload.resize(kAuthSize);
  uint8_t* client_nonce = f.payload.data() + kSha256DigestSize;
  for (size_t i = 0; i < kNonceSize; ++i) client_nonce[i] = static_cast<uint8_t>(r());
  const Sha256Digest mac = auth_client_proof(secret, server_nonce, client_nonce);
  std::memcpy(f.payload.data(), mac.data(), mac.size());
  return f;
}

// The server's handshake acceptance rule, from docs/protocol.md "Handshake"
// and "Limits": the frame (header and payload) and, for AUTH, the MAC.
// `strict` also requires the fields the spec says are zero (flags,
// reserved, status): the server currently ignores them during the handshake.
bool spec_hello_ok(const Frame& f, bool strict) {
  const bool ok = f.h.magic == kProtocolMagic && f.h.version == kProtocolVersion && f.h.op == Op::kHello &&
                  f.payload.size() == kHelloSize && load_le32(f.payload.data()) == kProtocolVersion &&
                  load_le64(f.payload.data() + 8) >= kMinMaxPayload;
  return ok && (!strict || (f.h.flags == 0 && f.h.reserved == 0 && f.h.status == 0));
}

bool spec_auth_ok(const Frame& f, const uint8_t* server_nonce, bool strict) {
  bool ok = f.h.magic == kProtocolMagic && f.h.version == kProtocolVersion && f.h.op == Op::kAuth &&
            f.payload.size() == kAuthSize;
  if (ok) {
    const Sha256Digest mac = auth_client_proof(kSecret, server_nonce, f.payload.data() + kSha256DigestSize);
    ok = constant_time_equal(mac.data(), f.payload.data(), mac.size());
  }
  return ok && (!strict || (f.h.flags == 0 && f.h.reserved == 0 && f.h.status == 0));
}

// Runs a correct client handshake; the server must accept it.
void valid_handshake(Peer& p, Rng& r, int rank, uint64_t max_payload, Clock::time_point deadline) {
  Bytes b;
  append_frame(b, hello_frame(rank, max_payload));
  FUZZ_CHECK(p.send(b, deadline), "the server closed before reading a valid HELLO");
  Message m;
  FUZZ_CHECK(p.next_frame(&m, deadline, "waiting for CHALLENGE"), "the server closed instead of CHALLENGE");
  FUZZ_CHECK(m.header.op == Op::kChallenge && m.payload.size() == kChallengeSize, "expected CHALLENGE, got ",
             op_name(m.header.op), " (", sanitize_error_text(m.payload.data(), m.payload.size()), ")");
  const Frame auth = auth_frame(kSecret, m.payload.data(), r);
  b.clear();
  append_frame(b, auth);
  FUZZ_CHECK(p.send(b, deadline), "the server closed before reading a valid AUTH");
  Message ok;
  FUZZ_CHECK(p.next_frame(&ok, deadline, "waiting for AUTH_OK"), "the server closed instead of AUTH_OK");
  FUZZ_CHECK(ok.header.op == Op::kAuthOk, "expected AUTH_OK, got ", op_name(ok.header.op), " (",
             sanitize_error_text(ok.payload.data(), ok.payload.size()), ")");
  const Sha256Digest proof = auth_server_proof(kSecret, m.payload.data(), auth.payload.data() + kSha256DigestSize);
  FUZZ_CHECK(ok.payload.size() == kAuthOkSize && constant_time_equal(proof.data(), ok.payload.data(), kAuthOkSize),
             "the server's AUTH_OK proof is wrong");
  p.max_payload = max_payload;
}

// --- Seed frames for a parameter server ------------------------------------------------

constexpr uint64_t kLegitKey = 0x4c45474954000001ULL;  // "LEGIT": no seed or mutation produces these keys
constexpr uint64_t kLegitSumKey = 0x4c45474954000002ULL;
constexpr uint64_t kLegitTable = 0x4c45474954000003ULL;

// The config a fuzz sparse table id usually has (so seeds reach past the
// "exists with another spec" check).
SparseTableConfig fuzz_table_config(uint64_t table, Rng& r) {
  SparseTableConfig c;
  c.dim = int64_t(1) << (table % 4);  // 1, 2, 4, 8
  c.rule = static_cast<SparseRule>(table % kNumSparseRules);
  c.init = static_cast<SparseInit>(table % 3);
  c.init_a = c.init == SparseInit::kNormal ? 0.0 : -0.1;
  c.init_b = 0.1;
  c.max_rows = table % 2 == 0 ? 0 : 64;
  c.eviction = table % 2 == 0 ? Eviction::kNone : Eviction::kLru;
  c.admit_threshold = table % 3 == 2 ? 2 : 0;
  c.max_pending = 1000;
  if (chance(r, 10)) c = random_sparse_config(r);
  return c;
}

Bytes float_bytes(Rng& r, size_t n) {
  Bytes b(n * 4);
  for (size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(static_cast<int>(below(r, 17)) - 8) * 0.125f;
    std::memcpy(b.data() + 4 * i, &v, 4);
  }
  return b;
}

void append(Bytes& b, const Bytes& more) { b.insert(b.end(), more.begin(), more.end()); }

// A well-formed request of a random op (keys and table ids in a small set, so
// requests of one connection and of others meet).
Frame seed_request(Rng& r, uint64_t request_id, uint64_t max_payload) {
  Frame f;
  f.h.request_id = request_id;
  const uint64_t key = 1 + below(r, 6);
  const uint64_t table = 1 + below(r, 4);
  const uint32_t n = static_cast<uint32_t>(chance(r, 70) ? 1 + below(r, 16) : 1 + below(r, 2000));
  switch (below(r, 16)) {
    case 0:
      f.h.op = Op::kPing;
      f.h.key = r();
      f.h.count = static_cast<uint32_t>(r());
      f.payload.resize(chance(r, 90) ? below(r, 256) : std::min<uint64_t>(max_payload, (256u << 10) + below(r, 4096)));
      for (auto& x : f.payload) x = static_cast<uint8_t>(r());
      break;
    case 1: {
      f.h.op = Op::kRegister;
      f.h.key = key;
      f.h.count = n;
      OptimHyper h;
      h.kind = static_cast<OptimKind>(below(r, 3));
      h.amsgrad = chance(r, 30);
      h.momentum = chance(r, 50) ? 0.9 : 0.0;
      f.h.flags = chance(r, 80) ? kFlagConfig : kFlagSum;
      if (f.h.flags == kFlagConfig) {
        f.payload.resize(kOptimConfigSize);
        encode_optim_config(h, f.payload.data());
      }
      append(f.payload, float_bytes(r, n));
      break;
    }
    case 2:
    case 3:
      f.h.op = chance(r, 50) ? Op::kPush : Op::kPushPull;
      f.h.key = key;
      f.h.count = n;
      f.h.aux = static_cast<uint32_t>(1 + below(r, 4));
      if (chance(r, 15)) {
        f.h.flags = kFlagSkip;
      } else {
        if (chance(r, 20)) {
          f.h.flags = kFlagConfig;
          f.payload.resize(kOptimConfigSize);
          encode_optim_config(OptimHyper(), f.payload.data());
        }
        append(f.payload, float_bytes(r, n));
      }
      break;
    case 4:
      f.h.op = Op::kPull;
      f.h.key = key;
      f.h.count = chance(r, 50) ? 0 : n;
      f.h.aux = static_cast<uint32_t>(below(r, 4));
      break;
    case 5:
      f.h.op = Op::kStateGet;
      f.h.key = key;
      f.h.count = n;
      f.h.aux = chance(r, 20) ? 255 : static_cast<uint32_t>(below(r, 5));
      break;
    case 6:
      f.h.op = Op::kStateSet;
      f.h.key = key;
      f.h.aux = chance(r, 20) ? 255 : static_cast<uint32_t>(below(r, 5));
      f.h.count = f.h.aux == 255 ? 1 : n;
      f.payload = float_bytes(r, f.h.count);
      break;
    case 7:
    case 8: {
      f.h.op = Op::kSparseCreate;
      f.h.key = table;
      f.h.aux = chance(r, 15) ? 1 : 0;
      f.payload.resize(kSparseConfigSize);
      encode_sparse_config(fuzz_table_config(table, r), SparseSpread{}, f.payload.data());
      break;
    }
    case 9:
    case 10: {
      f.h.op = Op::kSparsePull;
      f.h.key = table;
      f.h.count = n % 64;
      f.h.aux = static_cast<uint32_t>(below(r, 4));
      for (uint32_t i = 0; i < f.h.count; ++i) {
        uint8_t id[8];
        store_le64(id, chance(r, 80) ? below(r, 50) : r());
        f.payload.insert(f.payload.end(), id, id + 8);
      }
      break;
    }
    case 11:
    case 12: {
      f.h.op = Op::kSparsePush;
      f.h.key = table;
      const SparseTableConfig c = fuzz_table_config(table, r);
      f.h.count = n % 32;
      f.h.aux = static_cast<uint32_t>(1 + below(r, 4));
      f.payload.resize(kSparseOptimSize);
      encode_sparse_optim(optim_for(c.rule), f.payload.data());
      std::set<uint64_t> ids;
      while (ids.size() < f.h.count) ids.insert(below(r, 50));
      for (uint64_t id : ids) {
        uint8_t b[8];
        store_le64(b, id);
        f.payload.insert(f.payload.end(), b, b + 8);
      }
      append(f.payload, float_bytes(r, size_t(f.h.count) * size_t(c.dim)));
      break;
    }
    case 13:
      f.h.op = chance(r, 50) ? Op::kSparseStats : Op::kSparseExport;
      f.h.key = table;
      f.h.aux = static_cast<uint32_t>(below(r, 3));
      break;
    case 14: {
      f.h.op = Op::kSparseLoad;
      f.h.key = table;
      const SparseTableConfig c = fuzz_table_config(table, r);
      const uint64_t rows = below(r, 5), pending = below(r, 3);
      f.h.count = static_cast<uint32_t>(rows);
      f.payload.resize(kSparseConfigSize + 24);
      encode_sparse_config(c, SparseSpread{}, f.payload.data());
      store_le64(f.payload.data() + kSparseConfigSize, below(r, 5));
      store_le64(f.payload.data() + kSparseConfigSize + 8, rows);
      store_le64(f.payload.data() + kSparseConfigSize + 16, pending);
      const size_t values = size_t(c.dim + sparse_state_floats(c.rule, c.dim));
      for (uint64_t k = 0; k < rows; ++k) {
        Bytes rec(sizeof(RowHeader));
        store_le64(rec.data(), k * 7 + below(r, 3));  // id
        store_le64(rec.data() + 8, below(r, 4));      // last_step
        append(rec, float_bytes(r, values));
        append(f.payload, rec);
      }
      for (uint64_t k = 0; k < pending; ++k) {
        uint8_t p[16];
        store_le64(p, 100 + k);
        store_le64(p + 8, 1 + below(r, 3));
        f.payload.insert(f.payload.end(), p, p + 16);
      }
      break;
    }
    default: {
      // Reserved ops (BARRIER, SHUTDOWN) and a shared-memory offer naming a
      // segment that does not exist.
      const int which = static_cast<int>(below(r, 3));
      if (which == 2) {
        f.h.op = Op::kShmOffer;
        f.payload.resize(kShmOfferFixedSize);
        store_le64(f.payload.data(), 1 << 20);
        const std::string name = "fastps-fuzz-no-such-segment";
        f.payload.insert(f.payload.end(), name.begin(), name.end());
      } else {
        f.h.op = which == 0 ? Op::kBarrier : Op::kShutdown;
        f.h.count = 2;
      }
      break;
    }
  }
  return f;
}

// --- The well-behaved client -----------------------------------------------------------

// Runs real requests with known answers on its own keys while the fuzz runs,
// and records the first wrong, missing or late answer.
class LegitClient {
 public:
  LegitClient(uint16_t port, int workers) : workers_(workers) {
    TransportOptions o;
    o.secret = kSecret;
    o.timeout = Ms(10000 * kSlow);
    t_ = Transport::create("tcp", o);
    t_->set_handler([this](ConnId, Message&& m) {
      std::lock_guard<std::mutex> lock(mu_);
      replies_[m.header.request_id] = std::move(m);
      cv_.notify_all();
    });
    t_->set_disconnect_handler([this](ConnId, const std::string& why) {
      std::lock_guard<std::mutex> lock(mu_);
      disconnected_ = why;
      cv_.notify_all();
    });
    conn_ = t_->connect("127.0.0.1", port, 0);
  }
  ~LegitClient() { t_.reset(); }

  // Registers the legit keys and table; throws FuzzFailure on a bad answer.
  void setup() {
    OptimHyper sgd;
    sgd.kind = OptimKind::kSGD;
    sgd.lr = 1.0;
    Bytes p(kOptimConfigSize);
    encode_optim_config(sgd, p.data());
    param_.resize(kNumel);
    for (size_t i = 0; i < kNumel; ++i) param_[i] = static_cast<float>(i);
    append(p, floats_to_bytes(param_));
    MessageHeader h;
    h.op = Op::kRegister;
    h.key = kLegitKey;
    h.count = kNumel;
    h.flags = kFlagConfig;
    expect_empty_reply(call(h, p), "REGISTER");
    if (workers_ == 1) {
      h.key = kLegitSumKey;
      h.flags = kFlagSum;
      expect_empty_reply(call(h, floats_to_bytes(std::vector<float>(kNumel, 0.0f))), "REGISTER (sum)");
    }
    SparseTableConfig c;
    c.dim = kDim;
    c.rule = SparseRule::kSGD;
    c.init = SparseInit::kZeros;
    Bytes cb(kSparseConfigSize);
    encode_sparse_config(c, SparseSpread{}, cb.data());
    MessageHeader s;
    s.op = Op::kSparseCreate;
    s.key = kLegitTable;
    expect_empty_reply(call(s, cb), "SPARSE_CREATE");
    rows_.assign(kSparseIds * kDim, 0.0f);
  }

  // One round of every kind of request; checks each answer.
  void round(Rng& r) {
    ++step_;
    const float w = static_cast<float>(workers_);
    // Dense: PUSH a gradient of even integers, PULL the updated parameters.
    std::vector<float> g(kNumel);
    for (size_t i = 0; i < kNumel; ++i) g[i] = static_cast<float>(2 * ((i + size_t(step_)) % 3));
    MessageHeader h;
    h.op = Op::kPush;
    h.key = kLegitKey;
    h.count = kNumel;
    h.aux = static_cast<uint32_t>(step_);
    expect_empty_reply(call(h, floats_to_bytes(g)), "PUSH");
    for (size_t i = 0; i < kNumel; ++i) param_[i] -= g[i] / w;
    h.op = Op::kPull;
    expect_floats(call(h, {}), param_, "PULL");
    if (workers_ == 1) {
      std::vector<float> v(kNumel);
      for (size_t i = 0; i < kNumel; ++i) v[i] = static_cast<float>((i * size_t(step_)) % 7);
      MessageHeader s;
      s.op = Op::kPushPull;
      s.key = kLegitSumKey;
      s.count = kNumel;
      s.aux = static_cast<uint32_t>(step_);
      expect_floats(call(s, floats_to_bytes(v)), v, "PUSH_PULL (sum)");
    }
    // PING: the payload comes back.
    Bytes ping(below(r, 4096));
    for (auto& x : ping) x = static_cast<uint8_t>(r());
    MessageHeader p;
    p.op = Op::kPing;
    p.key = r();
    Message pong = call(p, ping);
    FUZZ_CHECK(pong.header.op == Op::kPong && pong.payload.size() == ping.size() &&
                   std::equal(ping.begin(), ping.end(), pong.payload.begin()),
               "legit PING: wrong PONG");
    // Sparse: PUSH rows of even integers at this step, PULL them back.
    SparseOptim o = optim_for(SparseRule::kSGD);
    o.lr = 1.0;
    Bytes push(kSparseOptimSize);
    encode_sparse_optim(o, push.data());
    std::vector<float> sg(kSparseIds * kDim);
    for (size_t i = 0; i < sg.size(); ++i) sg[i] = static_cast<float>(2 * ((i + size_t(step_)) % 5)) - 4.0f;
    Bytes ids;
    for (size_t k = 0; k < kSparseIds; ++k) {
      uint8_t b[8];
      store_le64(b, uint64_t(sparse_id(k)));
      ids.insert(ids.end(), b, b + 8);
    }
    append(push, ids);
    append(push, floats_to_bytes(sg));
    MessageHeader sp;
    sp.op = Op::kSparsePush;
    sp.key = kLegitTable;
    sp.count = kSparseIds;
    sp.aux = static_cast<uint32_t>(step_);
    expect_empty_reply(call(sp, push), "SPARSE_PUSH");
    for (size_t i = 0; i < sg.size(); ++i) rows_[i] -= sg[i] / w;
    MessageHeader pl;
    pl.op = Op::kSparsePull;
    pl.key = kLegitTable;
    pl.count = kSparseIds;
    pl.aux = static_cast<uint32_t>(step_);
    expect_floats(call(pl, ids), rows_, "SPARSE_PULL");
    ++rounds_;
  }

  // A PING to keys that cover every shard: once answered, every task queued
  // before it (a closed fuzz connection's cleanup) has run.
  void drain_shards() {
    for (uint64_t key = 0; key < 16; ++key) {
      MessageHeader p;
      p.op = Op::kPing;
      p.key = key;
      call(p, {});
    }
  }

  int rounds() const { return rounds_; }
  double max_latency_ms() const { return max_latency_ms_; }

 private:
  static constexpr uint32_t kNumel = 64;
  static constexpr int64_t kDim = 4;
  static constexpr uint32_t kSparseIds = 3;
  static int64_t sparse_id(size_t k) { return k == 0 ? -3 : k == 1 ? 5 : 77; }

  static Bytes floats_to_bytes(const std::vector<float>& v) {
    Bytes b(v.size() * 4);
    std::memcpy(b.data(), v.data(), b.size());
    return b;
  }

  Message call(MessageHeader h, const Bytes& payload) {
    h.request_id = ++next_id_;
    const auto t0 = Clock::now();
    ConstBuffer seg{payload.data(), payload.size()};
    try {
      t_->send(conn_, h, &seg, payload.empty() ? 0 : 1);
    } catch (const Error& e) {
      FUZZ_CHECK(false, "legit ", op_name(h.op), ": send failed: ", e.what());
    }
    std::unique_lock<std::mutex> lock(mu_);
    const bool got = cv_.wait_for(lock, Ms(10000 * kSlow), [&] {
      return replies_.count(h.request_id) == 1 || !disconnected_.empty();
    });
    FUZZ_CHECK(disconnected_.empty(), "legit connection closed: ", disconnected_);
    FUZZ_CHECK(got, "legit ", op_name(h.op), " not answered within ", 10 * kSlow, " s");
    Message m = std::move(replies_[h.request_id]);
    replies_.erase(h.request_id);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    max_latency_ms_ = std::max(max_latency_ms_, ms);
    FUZZ_CHECK(m.header.op != Op::kError, "legit ", op_name(h.op), " failed: ",
               sanitize_error_text(m.payload.data(), m.payload.size()));
    return m;
  }

  static void expect_empty_reply(const Message& m, const char* what) {
    FUZZ_CHECK(m.header.op == Op::kReply && m.payload.empty(), "legit ", what, ": unexpected ",
               op_name(m.header.op), " with ", m.payload.size(), " bytes");
  }

  static void expect_floats(const Message& m, const std::vector<float>& want, const char* what) {
    FUZZ_CHECK(m.header.op == Op::kReply && m.payload.size() == want.size() * 4, "legit ", what, ": ",
               op_name(m.header.op), " with ", m.payload.size(), " bytes");
    std::vector<float> got(want.size());
    std::memcpy(got.data(), m.payload.data(), m.payload.size());
    for (size_t i = 0; i < want.size(); ++i)
      FUZZ_CHECK(got[i] == want[i], "legit ", what, ": value ", i, " is ", got[i], ", expected ", want[i]);
  }

  const int workers_;
  std::unique_ptr<Transport> t_;
  ConnId conn_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Message> replies_;
  std::string disconnected_;
  uint64_t next_id_ = 0;
  int64_t step_ = 0;
  int rounds_ = 0;
  double max_latency_ms_ = 0;
  std::vector<float> param_;
  std::vector<float> rows_;
};

// --- Memory ---------------------------------------------------------------------------

// What the process holds: `heap`, the bytes allocated and not freed (the
// sanitizer's count under a sanitizer, else glibc's), which is exact; and
// `resident`, its resident memory once free heap pages went back to the
// kernel, which also sees the mmap'd table rows the allocator does not count
// (0 under a sanitizer, whose shadow memory would swamp it).
struct MemoryUse {
  uint64_t heap = 0;
  uint64_t resident = 0;
};

MemoryUse memory_in_use() {
  MemoryUse m;
#if FUZZ_SANITIZED
  m.heap = __sanitizer_get_current_allocated_bytes();
#else
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 info = ::mallinfo2();
  m.heap = info.uordblks + info.hblkhd;
#endif
  ::malloc_trim(0);
  std::ifstream f("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  f >> size >> resident;
  m.resident = resident * uint64_t(::sysconf(_SC_PAGESIZE));
#endif
  return m;
}

// --- Driver options and the target registry ---------------------------------------------

struct Options {
  uint64_t seed = 1;
  int64_t iterations = -1;  // per target; -1: bounded by time only
  int64_t first = 0;        // first iteration (reproduce one input: --first I --iterations 1)
  double seconds = -1;      // total, split over the targets; default 5 unless --iterations
  int threads = 2;          // fuzz connections at a time (server target)
  std::string target = "all";
  std::string save_dir;
  std::vector<std::string> replay;
};

Options g_opt;

struct Budget {
  Clock::time_point end;
  int64_t iterations;
  bool more(int64_t done) const { return (iterations < 0 || done < iterations) && Clock::now() < end; }
};

// Pure (one-input) targets: a generator of seeded inputs and a checker.
struct OneInputTarget {
  const char* name;
  std::function<Bytes(Rng&)> generate;
  void (*check)(const uint8_t*, size_t);
};

void check_stream(const uint8_t* data, size_t size);
Bytes gen_stream(Rng& r);

const std::vector<OneInputTarget>& one_input_targets() {
  static const std::vector<OneInputTarget> targets = {
      {"header", gen_header, check_header},
      {"hello", gen_hello, check_hello},
      {"error_text", gen_error_text, check_error_text},
      {"optim_config", gen_optim_config, check_optim_config},
      {"sparse_config", gen_sparse_config, check_sparse_config},
      {"sparse_optim", gen_sparse_optim, check_sparse_optim},
      {"table_file", gen_table_file, check_table_file},
      {"stream", gen_stream, check_stream},
  };
  return targets;
}

std::string reproduce_line(const std::string& target, int64_t iteration, const char* extra = "") {
  return detail::concat("fuzz_protocol --target ", target, " --seed ", g_opt.seed, " --first ", iteration,
                        " --iterations 1", extra);
}

void save_failure(int index, const std::string& target, int64_t iteration, const Bytes& input) {
  if (g_opt.save_dir.empty()) return;
  const std::string path =
      detail::concat(g_opt.save_dir, "/fail-", target, "-seed", g_opt.seed, "-", iteration, ".bin");
  Bytes file;
  file.push_back(static_cast<uint8_t>(index));
  append(file, input);
  write_file(path, file.data(), file.size());
  std::printf("  input saved: %s (replay: fuzz_protocol --replay %s)\n", path.c_str(), path.c_str());
}

bool run_one_input_target(int index, const Budget& budget) {
  const OneInputTarget& t = one_input_targets()[size_t(index)];
  int64_t done = 0;
  for (int64_t i = g_opt.first; budget.more(done); ++i, ++done) {
    Rng r(mix_seed(g_opt.seed, uint64_t(index) + 1, uint64_t(i)));
    const Bytes input = t.generate(r);
    set_current(detail::concat(t.name, " input ", i, "; reproduce: ", reproduce_line(t.name, i)));
    try {
      t.check(input.data(), input.size());
    } catch (const std::exception& e) {
      const bool invariant = dynamic_cast<const FuzzFailure*>(&e) != nullptr;
      std::printf("  %s input %lld: %s%s\n  input: %s\n  reproduce: %s\n", t.name, static_cast<long long>(i),
                  invariant ? "" : "unexpected exception: ", e.what(), hex_prefix(input.data(), input.size()).c_str(),
                  reproduce_line(t.name, i).c_str());
      save_failure(index, t.name, i, input);
      return false;
    }
  }
  std::printf("  %s: %lld inputs\n", t.name, static_cast<long long>(done));
  return true;
}

// --- The stream target (one input: bytes after a valid handshake) -----------------------

struct StreamServer {
  std::unique_ptr<PsServer> server;
  std::unique_ptr<LegitClient> legit;
  StreamServer() {
    PsServerOptions o;
    o.num_workers = 1;
    o.num_shards = 2;
    o.transport.secret = kSecret;
    o.transport.max_payload = kServerMaxPayload;
    o.transport.timeout = Ms(3000 * kSlow);
    server = std::make_unique<PsServer>(o);
    legit = std::make_unique<LegitClient>(server->port(), 1);
    legit->setup();
  }
  ~StreamServer() {
    legit.reset();
    server.reset();
  }
};

std::unique_ptr<StreamServer> g_stream;

void check_stream(const uint8_t* data, size_t size) {
  if (!g_stream) g_stream = std::make_unique<StreamServer>();
  const auto deadline = Clock::now() + Ms(10000 * kSlow);
  Rng r(size);
  Peer p(g_stream->server->port());
  valid_handshake(p, r, 0, 1 << 20, deadline);
  add_stream_request_ids(p, data, size);
  p.send(data, size, deadline);
  p.shutdown_write();
  p.wait_closed(deadline, "waiting for the server to close after the client did");
  Rng lr(size + 1);
  g_stream->legit->round(lr);
}

Bytes gen_stream(Rng& r) {
  std::vector<Frame> frames;
  const int n = 1 + static_cast<int>(below(r, 8));
  for (int i = 0; i < n; ++i) frames.push_back(seed_request(r, uint64_t(i + 1), 1 << 20));
  Bytes b = serialize(frames);
  mutate_bytes(r, b, 1 << 20);
  return b;
}

// --- The server target ---------------------------------------------------------------

struct ServerPhase {
  const char* name;
  int workers;
  int staleness;
  const char* transport;  // Transport::create() name of the server
};

struct ServerFuzz {
  uint16_t port = 0;
  int workers = 1;
  std::atomic<uint64_t> bytes_sent{0};
  // Bytes of requests that may leave state behind (all but PINGs): what the
  // memory a server keeps is bounded by.
  std::atomic<uint64_t> state_bytes{0};
  std::atomic<int64_t> connections{0};
  std::atomic<int64_t> handshakes_fuzzed{0};
  std::atomic<int64_t> spec_lenient{0};  // handshake frames the spec refuses and the server accepted
  std::atomic<int64_t> probes_answered{0};
  std::atomic<int64_t> closed_by_server{0};
};

constexpr uint64_t kProbeBit = 0x8000000000000000ULL;
const Ms kHandshakeTimeout(1000 * kSlow);

std::string describe_frames(const std::vector<Frame>& frames) {
  std::string s;
  for (const Frame& f : frames)
    s += detail::concat(s.empty() ? "" : ", ", op_name(f.h.op), "(key ", f.h.key, ", count ", f.h.count, ", aux ",
                        f.h.aux, ", flags ", unsigned(f.h.flags), ", ", f.payload.size(), " B)");
  return s;
}

// Well-framed requests (some mutated), then a PING probe that must be
// answered unless the server closed the connection; then the server must
// close once the client does.
void fuzz_framed(Peer& p, Rng& r, ServerFuzz& fz, Clock::time_point deadline, int64_t iteration) {
  std::vector<Frame> frames;
  const int n = 1 + static_cast<int>(below(r, 12));
  std::vector<Bytes> pool;
  for (int i = 0; i < n; ++i) {
    Frame f = seed_request(r, uint64_t(iteration) * 64 + uint64_t(i) + 1, p.max_payload);
    pool.push_back(f.payload);
    frames.push_back(std::move(f));
  }
  for (Frame& f : frames)
    if (chance(r, 50)) mutate_frame(r, f, 1 << 16, &pool);
  if (chance(r, 10) && frames.size() > 1) std::swap(frames[0], frames[frames.size() - 1]);
  if (chance(r, 10)) frames.push_back(frames[below(r, frames.size())]);
  // Frames the spec accepts never close the connection: then the probe must
  // be answered (a shared-memory offer is declined, the connection goes on).
  bool must_answer = true;
  for (const Frame& f : frames) {
    p.sent_ids.insert(f.h.request_id);
    MessageHeader h = f.h;
    h.payload_len = f.payload.size();
    if (h.op != Op::kPing) fz.state_bytes.fetch_add(kHeaderSize + h.payload_len);
    if (!spec_header_ok(h, kServerMaxPayload)) must_answer = false;
    if (is_transport_op(h.op) && (h.op != Op::kShmOffer || f.payload.size() <= kShmOfferFixedSize ||
                                  f.payload.size() > kShmOfferFixedSize + kShmMaxNameSize))
      must_answer = false;
  }
  Frame probe;
  probe.h.op = Op::kPing;
  probe.h.request_id = kProbeBit | uint64_t(iteration);
  probe.h.key = r();
  probe.h.count = static_cast<uint32_t>(below(r, 1000));
  probe.payload.resize(1 + below(r, 64));
  for (auto& x : probe.payload) x = static_cast<uint8_t>(r());
  p.sent_ids.insert(probe.h.request_id);
  Bytes stream = serialize(frames);
  append_frame(stream, probe);
  p.send(stream, deadline);
  Message m;
  bool answered = false;
  while (!answered && p.next_frame(&m, deadline, "waiting for the PONG of the probe")) {
    if (m.header.request_id != probe.h.request_id) continue;
    FUZZ_CHECK(m.header.op == Op::kPong && m.header.key == probe.h.key && m.header.count == probe.h.count &&
                   std::equal(m.payload.begin(), m.payload.end(), probe.payload.begin(), probe.payload.end()),
               "the probe was answered by ", op_name(m.header.op), " (", m.payload.size(), " bytes)");
    answered = true;
  }
  FUZZ_CHECK(answered || !must_answer, "the server closed a connection whose frames were all valid before "
             "answering the probe; frames: ", describe_frames(frames));
  if (answered) fz.probes_answered.fetch_add(1);
  else fz.closed_by_server.fetch_add(1);
  p.shutdown_write();
  p.wait_closed(deadline, "waiting for the server to close after the client did");
}

// Raw bytes: a serialized request stream with byte-level edits (framing may
// break anywhere). The server must close once the client does.
void fuzz_raw(Peer& p, Rng& r, ServerFuzz& fz, Clock::time_point deadline, int64_t iteration) {
  std::vector<Frame> frames;
  const int n = 1 + static_cast<int>(below(r, 8));
  for (int i = 0; i < n; ++i) frames.push_back(seed_request(r, uint64_t(iteration) * 64 + uint64_t(i) + 1, p.max_payload));
  Bytes stream = serialize(frames);
  mutate_bytes(r, stream, 1 << 20);
  fz.state_bytes.fetch_add(add_stream_request_ids(p, stream.data(), stream.size()));
  p.send(stream, deadline);
  p.shutdown_write();
  p.wait_closed(deadline, "waiting for the server to close after the client did");
}

// The handshake, with each client frame possibly mutated or cut short; the
// server must answer exactly as docs/protocol.md says (CHALLENGE / AUTH_OK
// for a valid frame, an optional ERROR and a close otherwise).
void fuzz_handshake(Peer& p, Rng& r, ServerFuzz& fz, Clock::time_point deadline, int64_t iteration) {
  fz.handshakes_fuzzed.fetch_add(1);
  const uint64_t max_payload = chance(r, 30) ? kMinMaxPayload : uint64_t(1) << 20;
  struct Answer {
    bool answered = false;
    Message m;
  };
  // Sends `f` (sometimes only a prefix, then the client closes) and returns
  // the server's answer. A refusal (optional ERROR, then a close) must come
  // well before the handshake deadline.
  auto exchange = [&](const Frame& f, bool valid, const char* step) {
    Answer a;
    Bytes b;
    append_frame(b, f);
    const bool cut = chance(r, 8);
    if (cut) b.resize(below(r, b.size()));
    p.send(b, deadline);
    if (cut) p.shutdown_write();
    const bool expect = valid && !cut;
    const auto reject_deadline = std::min(deadline, Clock::now() + kHandshakeTimeout * 4 / 5);
    a.answered = p.next_frame(&a.m, expect ? deadline : reject_deadline, step);
    if (a.answered && a.m.header.op == Op::kError) {
      FUZZ_CHECK(!expect, "the server refused a valid ", step, ": ",
                 sanitize_error_text(a.m.payload.data(), a.m.payload.size()));
      p.wait_closed(reject_deadline, "waiting for the close that follows a handshake ERROR");
      a.answered = false;
      return a;
    }
    FUZZ_CHECK(a.answered || !expect, "the server closed the connection on a valid ", step);
    FUZZ_CHECK(!a.answered || expect, "the server answered ", cut ? "a truncated" : "an invalid", " ", step,
               " with ", op_name(a.m.header.op), "; the frame: ", describe_frames({f}));
    return a;
  };

  Frame hello = hello_frame(static_cast<int>(below(r, size_t(fz.workers) + 1)) - (chance(r, 10) ? 1 : 0), max_payload);
  if (chance(r, 60)) {
    if (chance(r, 15)) hello = seed_request(r, 1, max_payload);  // any other frame instead of HELLO
    else mutate_frame(r, hello, kMaxHandshakePayload + 64);
  }
  const Answer challenged = exchange(hello, spec_hello_ok(hello, false), "HELLO");
  if (!challenged.answered) return;
  const Message& challenge = challenged.m;
  FUZZ_CHECK(challenge.header.op == Op::kChallenge && challenge.payload.size() == kChallengeSize,
             "HELLO answered by ", op_name(challenge.header.op));
  FUZZ_CHECK(load_le64(challenge.payload.data() + kNonceSize) == kServerMaxPayload,
             "CHALLENGE announces max_payload ", load_le64(challenge.payload.data() + kNonceSize));
  if (!spec_hello_ok(hello, true)) fz.spec_lenient.fetch_add(1);
  Frame auth = auth_frame(kSecret, challenge.payload.data(), r);
  switch (below(r, 6)) {
    case 0: auth = auth_frame("not-the-secret", challenge.payload.data(), r); break;
    case 1: auth.payload[below(r, kSha256DigestSize)] ^= 1; break;   // a MAC bit
    case 2: auth.payload[kSha256DigestSize + below(r, kNonceSize)] ^= 0x80; break;  // the nonce it covers
    case 3: mutate_frame(r, auth, kMaxHandshakePayload + 64); break;
    default: break;  // valid
  }
  const Answer accepted = exchange(auth, spec_auth_ok(auth, challenge.payload.data(), false), "AUTH");
  if (!accepted.answered) return;
  const Message& ok = accepted.m;
  FUZZ_CHECK(ok.header.op == Op::kAuthOk, "AUTH answered by ", op_name(ok.header.op));
  const Sha256Digest proof =
      auth_server_proof(kSecret, challenge.payload.data(), auth.payload.data() + kSha256DigestSize);
  FUZZ_CHECK(ok.payload.size() == kAuthOkSize && constant_time_equal(proof.data(), ok.payload.data(), kAuthOkSize),
             "wrong AUTH_OK proof");
  if (!spec_auth_ok(auth, challenge.payload.data(), true)) fz.spec_lenient.fetch_add(1);
  p.max_payload = max_payload;
  fuzz_framed(p, r, fz, deadline, iteration);
}

void server_connection(ServerFuzz& fz, Rng& r, int64_t iteration) {
  const auto deadline = Clock::now() + Ms(15000 * kSlow);
  Peer p(fz.port);
  const size_t mode = below(r, 100);
  try {
    if (mode < 25) {
      fuzz_handshake(p, r, fz, deadline, iteration);
    } else {
      const uint64_t max_payload = chance(r, 20) ? kMinMaxPayload : uint64_t(1) << 20;
      valid_handshake(p, r, static_cast<int>(below(r, size_t(fz.workers))), max_payload, deadline);
      if (mode < 75) fuzz_framed(p, r, fz, deadline, iteration);
      else fuzz_raw(p, r, fz, deadline, iteration);
    }
  } catch (...) {
    fz.bytes_sent.fetch_add(p.bytes_sent);
    throw;
  }
  fz.bytes_sent.fetch_add(p.bytes_sent);
  fz.connections.fetch_add(1);
}

bool run_server_phase(const ServerPhase& phase, int phase_index, const Budget& budget) {
  // Everything a server allocates is freed when it is destroyed.
  const uint64_t heap_before_server = memory_in_use().heap;
  PsServerOptions o;
  o.num_workers = phase.workers;
  o.num_shards = 2;
  o.staleness = phase.staleness;
  o.transport.secret = kSecret;
  o.transport.max_payload = kServerMaxPayload;
  o.transport.timeout = kHandshakeTimeout;
  o.transport.handshake_timeout = kHandshakeTimeout;  // its own setting (protocol version 2)
  o.transport_name = phase.transport;
  auto server = std::make_unique<PsServer>(o);
  ServerFuzz fz;
  fz.port = server->port();
  fz.workers = phase.workers;

  std::mutex fail_mu;
  std::string failure;
  std::atomic<bool> stop{false};
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(fail_mu);
    if (failure.empty()) failure = what;
    stop.store(true);
  };

  std::unique_ptr<LegitClient> legit;
  try {
    legit = std::make_unique<LegitClient>(fz.port, phase.workers);
    legit->setup();
  } catch (const std::exception& e) {
    std::printf("  server/%s: the well-behaved client could not start: %s\n", phase.name, e.what());
    return false;
  }
  // A connection that stalls in the middle of HELLO: closed at the deadline.
  const auto stalled_at = Clock::now();
  Peer stalled(fz.port);
  {
    Bytes b;
    append_frame(b, hello_frame(0, 1 << 20));
    b.resize(20);
    stalled.send(b, stalled_at + Ms(5000));
  }
  const MemoryUse memory_before = memory_in_use();

  // Watches the stalled connection while the fuzz runs.
  std::thread stalled_thread([&] {
    try {
      stalled.wait_closed(stalled_at + kHandshakeTimeout + Ms(3000 * kSlow),
                          "waiting for the server to close a connection stalled in the handshake");
    } catch (const std::exception& e) {
      fail(e.what());
    }
  });
  std::thread legit_thread([&] {
    Rng r(mix_seed(g_opt.seed, 100 + phase_index, 0));
    try {
      while (!stop.load()) legit->round(r);
    } catch (const std::exception& e) {
      fail(detail::concat("well-behaved client: ", e.what()));
    }
  });
  std::atomic<int64_t> next{g_opt.first};
  std::atomic<int64_t> done{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < std::max(1, g_opt.threads); ++t) {
    workers.emplace_back([&] {
      while (!stop.load() && budget.more(done.load())) {
        const int64_t i = next.fetch_add(1);
        Rng r(mix_seed(g_opt.seed, 200 + phase_index, uint64_t(i)));
        try {
          server_connection(fz, r, i);
        } catch (const std::exception& e) {
          fail(detail::concat("connection ", i, ": ", e.what()));
        }
        done.fetch_add(1);
      }
    });
  }
  for (auto& w : workers) w.join();
  stop.store(true);
  legit_thread.join();

  stalled_thread.join();
  MemoryUse memory_after;
  const uint64_t state_allowance = 16 * fz.state_bytes.load();
  if (failure.empty()) {
    try {
      legit->drain_shards();
      memory_after = memory_in_use();
      // What peers may make a server keep (registered chunks with optimizer
      // state, tables and their rows; all bounded by the bytes that created
      // them), plus a fixed allowance: 8 MiB of heap (allocator caches), 64
      // MiB of resident memory (thread stacks, arenas, touched table pages).
      auto check = [&](const char* what, uint64_t before, uint64_t after, uint64_t slack) {
        FUZZ_CHECK(after <= before + slack + state_allowance, what, " grew by ", (after - before) >> 10, " KiB after ",
                   fz.connections.load(), " fuzz connections that sent ", fz.bytes_sent.load() >> 10, " KiB, ",
                   fz.state_bytes.load() >> 10, " KiB of them in requests other than PING (allowed: ",
                   (slack + state_allowance) >> 10, " KiB)");
      };
      if (memory_before.heap > 0) check("heap memory", memory_before.heap, memory_after.heap, 8u << 20);
      if (memory_before.resident > 0)
        check("resident memory", memory_before.resident, memory_after.resident, 64u << 20);
    } catch (const std::exception& e) {
      fail(e.what());
    }
  }
  const int rounds = legit->rounds();
  const double latency = legit->max_latency_ms();
  legit.reset();
  const auto t0 = Clock::now();
  server.reset();
  const double stop_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  if (failure.empty() && rounds < 1) failure = "the well-behaved client completed no round";
  if (failure.empty() && stop_ms > 10000.0 * kSlow)
    failure = detail::concat("the server took ", stop_ms, " ms to stop");
  const uint64_t heap_after_server = memory_in_use().heap;
  if (failure.empty() && heap_after_server > heap_before_server + (1u << 20))
    failure = detail::concat("the server leaked: ", (heap_after_server - heap_before_server) >> 10,
                             " KiB of heap more than before it started are still allocated after it stopped");

  std::printf("  server/%s: %lld connections (%lld handshakes fuzzed, %lld probes answered, %lld closed by the "
              "server), %llu KiB sent (%llu KiB not PING); legit: %d rounds, max latency %.0f ms; heap %+lld KiB, "
              "resident %+lld KiB (allowed: 16 x the bytes not PING = %llu KiB, plus slack); stop %.0f ms, "
              "heap after it %+lld KiB\n",
              phase.name, static_cast<long long>(fz.connections.load()),
              static_cast<long long>(fz.handshakes_fuzzed.load()), static_cast<long long>(fz.probes_answered.load()),
              static_cast<long long>(fz.closed_by_server.load()),
              static_cast<unsigned long long>(fz.bytes_sent.load() >> 10),
              static_cast<unsigned long long>(fz.state_bytes.load() >> 10), rounds, latency,
              memory_after.heap ? (static_cast<long long>(memory_after.heap) - static_cast<long long>(memory_before.heap)) / 1024 : 0LL,
              memory_after.resident ? (static_cast<long long>(memory_after.resident) - static_cast<long long>(memory_before.resident)) / 1024 : 0LL,
              static_cast<unsigned long long>(state_allowance >> 10), stop_ms,
              (static_cast<long long>(heap_after_server) - static_cast<long long>(heap_before_server)) / 1024);
  if (fz.spec_lenient.load() > 0)
    std::printf("  note: %lld handshake frames with non-zero flags/reserved/status were accepted "
                "(docs/protocol.md \"Limits\" says such frames close the connection)\n",
                static_cast<long long>(fz.spec_lenient.load()));
  if (!failure.empty()) {
    std::printf("  server/%s: %s\n  reproduce: fuzz_protocol --target server --seed %llu --threads 1 "
                "(connections run concurrently with --threads > 1, so the server's state may differ)\n",
                phase.name, failure.c_str(), static_cast<unsigned long long>(g_opt.seed));
    return false;
  }
  return true;
}

bool run_server_target(const Budget& budget) {
  const ServerPhase phases[] = {{"bsp", 1, 0, "tcp"}, {"asp-2-workers-shm", 2, -1, "auto"}};
  const auto now = Clock::now();
  bool ok = true;
  for (int i = 0; i < 2 && ok; ++i) {
    Budget b = budget;
    b.end = now + (budget.end - now) * (i + 1) / 2;
    ok = run_server_phase(phases[i], i, b);
  }
  return ok;
}

// --- The client target -------------------------------------------------------------------

struct FakeServer {
  int fd = -1;
  uint16_t port = 0;
  FakeServer() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    FUZZ_CHECK(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 && ::listen(fd, 16) == 0,
               "listen: ", errno_text(errno));
    socklen_t len = sizeof(a);
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
  ~FakeServer() { ::close(fd); }
  int accept_one(Clock::time_point deadline) {
    pollfd p{fd, POLLIN, 0};
    const int wait = static_cast<int>(std::chrono::duration_cast<Ms>(deadline - Clock::now()).count());
    FUZZ_CHECK(::poll(&p, 1, std::max(wait, 0)) == 1, "the client did not connect");
    return ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
  }
};

// Blocking exact read with a deadline; false at end of stream.
bool read_exact(int fd, uint8_t* p, size_t n, Clock::time_point deadline) {
  while (n > 0) {
    pollfd q{fd, POLLIN, 0};
    const int wait = static_cast<int>(std::chrono::duration_cast<Ms>(deadline - Clock::now()).count());
    FUZZ_CHECK(wait > 0 && ::poll(&q, 1, wait) == 1, "the client sent nothing within the deadline");
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r == 0) return false;
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= size_t(r);
  }
  return true;
}

bool read_frame(int fd, Message* m, Clock::time_point deadline) {
  uint8_t hb[kHeaderSize];
  if (!read_exact(fd, hb, kHeaderSize, deadline)) return false;
  m->header = decode_header(hb);
  FUZZ_CHECK(m->header.payload_len <= kMaxHandshakePayload, "the client sent a ", m->header.payload_len,
             "-byte handshake frame");
  m->payload.resize(m->header.payload_len);
  return read_exact(fd, m->payload.data(), m->payload.size(), deadline);
}

void write_quietly(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) {
      if (w < 0 && errno == EINTR) continue;
      return;  // the client closed: fine, it may have refused what it read
    }
    p += w;
    n -= size_t(w);
  }
}

struct ClientFuzz {
  int64_t connects = 0, accepted = 0, frames_delivered = 0;
};

// A frame a connected client must deliver (docs/protocol.md "Limits").
bool client_must_deliver(const MessageHeader& h, uint64_t max_payload) {
  return spec_header_ok(h, max_payload) && !is_transport_op(h.op);
}

Frame seed_server_frame(Rng& r, uint64_t max_payload) {
  Frame f;
  f.h.request_id = r();
  f.h.key = below(r, 8);
  switch (below(r, 5)) {
    case 0: {
      f.h.op = Op::kError;
      f.h.status = 1 + static_cast<uint32_t>(below(r, 8));
      const std::string text = "server says no \xe2\x9c\x97";
      f.payload.assign(text.begin(), text.end());
      break;
    }
    case 1:
      f.h.op = Op::kPong;
      f.payload.resize(below(r, 100));
      break;
    case 2:
      f.h.op = chance(r, 50) ? Op::kShmAccept : Op::kShmDecline;  // never unprompted
      break;
    default:
      f.h.op = Op::kReply;
      f.h.count = static_cast<uint32_t>(below(r, 64));
      f.payload.resize(chance(r, 95) ? size_t(f.h.count) * 4 : std::min<uint64_t>(max_payload, (256u << 10) + 4));
      break;
  }
  for (auto& x : f.payload)
    if (f.h.op != Op::kError) x = static_cast<uint8_t>(r());
  return f;
}

void client_connection(FakeServer& fs, Rng& r, ClientFuzz& cf) {
  const uint64_t client_max = 1 << 20;  // past the transport's 256 KiB staging buffer
  TransportOptions o;
  o.secret = kSecret;
  o.timeout = Ms(1500 * kSlow);
  o.max_payload = client_max;
  // Declared before the transport: its loop thread uses them until it is destroyed.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Message> delivered;
  std::string disconnected;
  auto t = Transport::create("tcp", o);
  t->set_handler([&](ConnId, Message&& m) {
    std::lock_guard<std::mutex> lock(mu);
    delivered.push_back(std::move(m));
  });
  t->set_disconnect_handler([&](ConnId, const std::string& why) {
    std::lock_guard<std::mutex> lock(mu);
    disconnected = why.empty() ? "?" : why;
    cv.notify_all();
  });
  const auto deadline = Clock::now() + o.timeout + Ms(5000 * kSlow);
  std::atomic<bool> connect_done{false};
  bool connected = false;
  std::string connect_error;
  bool untyped_error = false;
  std::thread connector([&] {
    try {
      t->connect("127.0.0.1", fs.port, 0);
      connected = true;
    } catch (const Error& e) {
      connect_error = e.what();
    } catch (const std::exception& e) {
      connect_error = e.what();
      untyped_error = true;
    }
    connect_done.store(true);
  });
  struct Joiner {
    std::thread& t;
    ~Joiner() {
      if (t.joinable()) t.join();
    }
  } joiner{connector};
  ++cf.connects;

  int fd = fs.accept_one(deadline);
  FUZZ_CHECK(fd >= 0, "accept failed");
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  // The client's HELLO must be exactly the spec's.
  Message hello;
  FUZZ_CHECK(read_frame(fd, &hello, deadline), "the client closed before HELLO");
  FUZZ_CHECK(hello.header.op == Op::kHello && spec_hello_ok(Frame{hello.header, Bytes(hello.payload.begin(),
                                                                                      hello.payload.end())},
                                                            true) &&
                 load_le64(hello.payload.data() + 8) == client_max,
             "the client's HELLO is not valid");
  // CHALLENGE, maybe mutated.
  Frame ch;
  ch.h.op = Op::kChallenge;
  ch.payload.resize(kChallengeSize);
  for (size_t i = 0; i < kNonceSize; ++i) ch.payload[i] = static_cast<uint8_t>(r());
  const uint64_t server_max = chance(r, 50) ? kDefaultMaxPayload : interesting(r);
  store_le64(ch.payload.data() + kNonceSize, server_max);
  if (chance(r, 40)) mutate_frame(r, ch, kMaxHandshakePayload + 64);
  const bool ch_ok = ch.h.magic == kProtocolMagic && ch.h.version == kProtocolVersion && ch.h.op == Op::kChallenge &&
                     ch.payload.size() == kChallengeSize && load_le64(ch.payload.data() + kNonceSize) >= kMinMaxPayload;
  Bytes b;
  append_frame(b, ch);
  write_quietly(fd, b.data(), b.size());
  bool expect_ok = false;
  if (ch_ok) {
    Message auth;
    FUZZ_CHECK(read_frame(fd, &auth, deadline) && auth.header.op == Op::kAuth && auth.payload.size() == kAuthSize,
               "the client did not answer a valid CHALLENGE with AUTH");
    const Sha256Digest mac = auth_client_proof(kSecret, ch.payload.data(), auth.payload.data() + kSha256DigestSize);
    FUZZ_CHECK(constant_time_equal(mac.data(), auth.payload.data(), mac.size()), "the client's AUTH MAC is wrong");
    Frame ok;
    ok.h.op = Op::kAuthOk;
    const Sha256Digest proof = auth_server_proof(chance(r, 15) ? "not-the-secret" : kSecret, ch.payload.data(),
                                                 auth.payload.data() + kSha256DigestSize);
    ok.payload.assign(proof.begin(), proof.end());
    if (chance(r, 30)) mutate_frame(r, ok, kMaxHandshakePayload + 64);
    const Sha256Digest right = auth_server_proof(kSecret, ch.payload.data(), auth.payload.data() + kSha256DigestSize);
    expect_ok = ok.h.magic == kProtocolMagic && ok.h.version == kProtocolVersion && ok.h.op == Op::kAuthOk &&
                ok.payload.size() == kAuthOkSize &&
                constant_time_equal(right.data(), ok.payload.data(), kAuthOkSize);
    b.clear();
    append_frame(b, ok);
    write_quietly(fd, b.data(), b.size());
  }
  if (!expect_ok) ::shutdown(fd, SHUT_WR);  // a refusing client must not wait for more
  const auto connect_deadline = Clock::now() + o.timeout + Ms(2000 * kSlow);
  while (!connect_done.load()) {
    FUZZ_CHECK(Clock::now() < connect_deadline, "connect() did not return within its timeout");
    std::this_thread::sleep_for(Ms(1));
  }
  connector.join();
  FUZZ_CHECK(!untyped_error, "connect() threw a non-fastps exception: ", connect_error);
  FUZZ_CHECK(connected == expect_ok, "connect() ", connected ? "succeeded" : "failed (" + connect_error + ")",
             " but the handshake was ", expect_ok ? "valid" : "invalid");
  if (!connected) return;
  ++cf.accepted;

  // After the handshake: frames to the client.
  std::vector<Frame> frames;
  const int n = 1 + static_cast<int>(below(r, 10));
  for (int i = 0; i < n; ++i) {
    Frame f = seed_server_frame(r, client_max);
    if (chance(r, 30)) mutate_frame(r, f, client_max + 64);
    frames.push_back(std::move(f));
  }
  const bool raw = chance(r, 25);
  Bytes stream = serialize(frames);
  if (raw) mutate_bytes(r, stream, 1 << 20);
  // Random pieces, so frames and headers arrive split.
  for (size_t off = 0; off < stream.size();) {
    const size_t piece = chance(r, 50) ? stream.size() - off : std::min(stream.size() - off, 1 + below(r, 100));
    write_quietly(fd, stream.data() + off, piece);
    off += piece;
  }
  ::shutdown(fd, SHUT_WR);
  {
    std::unique_lock<std::mutex> lock(mu);
    FUZZ_CHECK(cv.wait_for(lock, Ms(5000 * kSlow), [&] { return !disconnected.empty(); }),
               "the client did not close a connection whose server closed");
  }
  t.reset();  // no more deliveries
  cf.frames_delivered += int64_t(delivered.size());
  for (const Message& m : delivered)
    FUZZ_CHECK(client_must_deliver(m.header, client_max) && m.payload.size() == m.header.payload_len,
               "the client delivered an invalid frame (", op_name(m.header.op), ")");
  if (raw) return;
  size_t valid = 0;
  while (valid < frames.size()) {
    MessageHeader h = frames[valid].h;
    h.payload_len = frames[valid].payload.size();
    if (!client_must_deliver(h, client_max)) break;
    ++valid;
  }
  FUZZ_CHECK(delivered.size() == valid, "the client delivered ", delivered.size(), " frames; the first ", valid,
             " of the ", frames.size(), " sent are valid");
  for (size_t i = 0; i < valid; ++i) {
    MessageHeader h = frames[i].h;
    h.payload_len = frames[i].payload.size();
    FUZZ_CHECK(delivered[i].header == h && std::equal(frames[i].payload.begin(), frames[i].payload.end(),
                                                      delivered[i].payload.begin(), delivered[i].payload.end()),
               "frame ", i, " was delivered altered");
  }
}

bool run_client_target(const Budget& budget) {
  FakeServer fs;
  ClientFuzz cf;
  int64_t done = 0;
  for (int64_t i = g_opt.first; budget.more(done); ++i, ++done) {
    Rng r(mix_seed(g_opt.seed, 300, uint64_t(i)));
    set_current(detail::concat("client connection ", i, "; reproduce: ", reproduce_line("client", i)));
    try {
      client_connection(fs, r, cf);
    } catch (const std::exception& e) {
      std::printf("  client connection %lld: %s\n  reproduce: %s\n", static_cast<long long>(i), e.what(),
                  reproduce_line("client", i).c_str());
      return false;
    }
  }
  std::printf("  client: %lld connects (%lld accepted), %lld frames delivered\n", static_cast<long long>(cf.connects),
              static_cast<long long>(cf.accepted), static_cast<long long>(cf.frames_delivered));
  return true;
}

// --- Main ------------------------------------------------------------------------------

void usage() {
  std::printf(
      "usage: fuzz_protocol [--seed N] [--seconds S] [--iterations N] [--first I] [--threads T]\n"
      "                     [--target NAME] [--save-failures DIR] [--replay FILE...]\n"
      "targets: all, header, hello, error_text, optim_config, sparse_config, sparse_optim,\n"
      "         table_file, stream, server, client\n"
      "Without --seconds or --iterations it runs for 5 seconds (all targets). See docs/fuzzing.md.\n");
}

bool parse_args(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--seed") g_opt.seed = std::stoull(value());
    else if (a == "--seconds") g_opt.seconds = std::stod(value());
    else if (a == "--iterations") g_opt.iterations = std::stoll(value());
    else if (a == "--first") g_opt.first = std::stoll(value());
    else if (a == "--threads") g_opt.threads = std::stoi(value());
    else if (a == "--target") g_opt.target = value();
    else if (a == "--save-failures") g_opt.save_dir = value();
    else if (a == "--replay") {
      while (i + 1 < argc && argv[i + 1][0] != '-') g_opt.replay.push_back(argv[++i]);
    } else if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown argument " + a);
    }
  }
  if (g_opt.seconds < 0 && g_opt.iterations < 0) g_opt.seconds = 5;
  return true;
}

#if FUZZ_SANITIZED
void sanitizer_death_callback() {
  const char head[] = "\nfuzz_protocol: the sanitizer stopped the run while running: ";
  ssize_t ignored = ::write(2, head, sizeof(head) - 1);
  ignored = ::write(2, g_current, std::strlen(g_current));
  ignored = ::write(2, "\n", 1);
  (void)ignored;
}
#endif

void install_crash_reporting() {
#if FUZZ_SANITIZED
  __sanitizer_set_death_callback(sanitizer_death_callback);
#else
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) ::signal(sig, print_current_and_die);
#endif
}

// Aborts the process (naming what it was doing) if the run hangs.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::seconds limit)
      : thread_([this, limit] {
          std::unique_lock<std::mutex> lock(mu_);
          if (cv_.wait_for(lock, limit, [this] { return done_; })) return;
          std::lock_guard<std::mutex> cur(g_current_mu);
          std::fprintf(stderr, "fuzz_protocol: hang: no result after %lld s while running: %s\n",
                       static_cast<long long>(limit.count()), g_current);
          std::abort();
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

int replay(const std::vector<std::string>& files) {
  int passed = 0, failed = 0;
  const auto& targets = one_input_targets();
  for (const std::string& path : files) {
    const Bytes input = read_file(path);
    if (input.empty()) {
      std::printf("[ FAIL ] %s: empty or unreadable\n", path.c_str());
      ++failed;
      continue;
    }
    const OneInputTarget& t = targets[input[0] % targets.size()];
    try {
      t.check(input.data() + 1, input.size() - 1);
      std::printf("[  OK  ] %s (%s)\n", path.c_str(), t.name);
      ++passed;
    } catch (const std::exception& e) {
      std::printf("[ FAIL ] %s (%s): %s\n", path.c_str(), t.name, e.what());
      ++failed;
    }
  }
  g_stream.reset();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace

#ifdef FASTPS_LIBFUZZER
// libFuzzer: the first byte picks the one-input target, the rest is its input.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto& targets = one_input_targets();
  const OneInputTarget& t = targets[data[0] % targets.size()];
  try {
    t.check(data + 1, size - 1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_protocol (%s): %s\n", t.name, e.what());
    std::abort();
  }
  return 0;
}
#else
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  ::signal(SIGPIPE, SIG_IGN);
  try {
    parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_protocol: %s\n", e.what());
    usage();
    return 2;
  }
  install_crash_reporting();
  if (!g_opt.replay.empty()) {
    const int rc = replay(g_opt.replay);
    remove_tmp_dir();
    return rc;
  }
  struct Entry {
    std::string name;
    double share;  // of the time budget
    std::function<bool(const Budget&)> run;
  };
  std::vector<Entry> entries;
  const auto& one = one_input_targets();
  for (size_t i = 0; i < one.size(); ++i) {
    const double share = one[i].name == std::string("table_file") || one[i].name == std::string("stream") ? 0.07 : 0.03;
    entries.push_back({one[i].name, share, [i](const Budget& b) { return run_one_input_target(int(i), b); }});
  }
  entries.push_back({"server", 0.48, run_server_target});
  entries.push_back({"client", 0.12, run_client_target});
  if (g_opt.target != "all") {
    std::vector<Entry> chosen;
    for (auto& e : entries)
      if (e.name == g_opt.target) chosen.push_back(e);
    if (chosen.empty()) {
      std::fprintf(stderr, "fuzz_protocol: unknown target '%s'\n", g_opt.target.c_str());
      usage();
      return 2;
    }
    chosen[0].share = 1.0;
    entries.swap(chosen);
  }
  double total_share = 0;
  for (auto& e : entries) total_share += e.share;
  const double seconds = g_opt.seconds < 0 ? 1e9 : g_opt.seconds;
  Watchdog watchdog(std::chrono::seconds(static_cast<long long>(std::min(seconds, 1e6)) * 2 + 120 * kSlow));
  std::printf("fuzz_protocol: seed %llu, %s%s\n", static_cast<unsigned long long>(g_opt.seed),
              g_opt.seconds < 0 ? "" : detail::concat(g_opt.seconds, " s").c_str(),
              g_opt.iterations < 0 ? "" : detail::concat(" ", g_opt.iterations, " iterations per target").c_str());
  int passed = 0, failed = 0;
  const auto all0 = Clock::now();
  for (auto& e : entries) {
    const auto t0 = Clock::now();
    Budget b;
    b.iterations = g_opt.iterations;
    b.end = g_opt.seconds < 0 ? Clock::time_point::max()
                              : t0 + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(seconds * e.share / total_share));
    std::printf("[ RUN  ] %s\n", e.name.c_str());
    bool ok;
    try {
      ok = e.run(b);
    } catch (const std::exception& ex) {
      std::printf("  %s: %s\n", e.name.c_str(), ex.what());
      ok = false;
    }
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    std::printf("[ %s ] %s (%.0f ms)\n", ok ? " OK " : "FAIL", e.name.c_str(), ms);
    (ok ? passed : failed)++;
  }
  g_stream.reset();
  remove_tmp_dir();
  const double secs = std::chrono::duration<double>(Clock::now() - all0).count();
  std::printf("%d passed, %d failed (%.1f s)\n", passed, failed, secs);
  return failed == 0 ? 0 : 1;
}
#endif
