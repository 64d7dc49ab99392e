// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), written from the
// standards, for the connection handshake (see docs/protocol.md). Not a
// general crypto library: no SIMD paths, no other hashes.
//
// Thread safety: Sha256 and HmacSha256 objects are plain values, one thread at
// a time; the free functions are reentrant.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace fastps {

constexpr size_t kSha256DigestSize = 32;
constexpr size_t kSha256BlockSize = 64;
using Sha256Digest = std::array<uint8_t, kSha256DigestSize>;

// Incremental SHA-256. update() any number of times, then finish() once;
// after finish() the object is reset and may hash a new message.
class Sha256 {
 public:
  Sha256() { reset(); }
  void reset();
  void update(const void* data, size_t len);
  Sha256Digest finish();

 private:
  void compress(const uint8_t* block);

  uint32_t state_[8];
  uint64_t total_len_;  // bytes hashed so far
  uint8_t buffer_[kSha256BlockSize];
  size_t buffered_;
};

// Incremental HMAC-SHA256 with key `key` (any length; keys longer than a
// block are hashed first, as RFC 2104 says).
class HmacSha256 {
 public:
  HmacSha256(const void* key, size_t key_len);
  void update(const void* data, size_t len) { inner_.update(data, len); }
  // Returns the MAC; the object must not be used afterwards.
  Sha256Digest finish();

 private:
  Sha256 inner_;
  uint8_t outer_key_pad_[kSha256BlockSize];
};

Sha256Digest sha256(const void* data, size_t len);
Sha256Digest hmac_sha256(const void* key, size_t key_len, const void* data, size_t len);

// True if the `len` bytes at a and b are equal. The running time depends only
// on `len`, not on where the bytes differ (for comparing MACs).
bool constant_time_equal(const void* a, const void* b, size_t len);

// Lower-case hex of `len` bytes (for tests and log lines).
std::string to_hex(const void* data, size_t len);

}  // namespace fastps
