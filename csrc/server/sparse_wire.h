// Payload codecs of the sparse table ops (SPARSE_CREATE ... SPARSE_LOAD) and
// the id -> server routing that workers and servers share. docs/protocol.md,
// "Sparse tables", is the specification; this file is its code. Like
// transport/message.h, everything is encoded byte by byte (little-endian).
//
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/hash.h"
#include "table/sparse_optim.h"
#include "table/sparse_table.h"

namespace fastps {

constexpr size_t kSparseConfigSize = 80;  // SPARSE_CREATE / SPARSE_LOAD
constexpr size_t kSparseOptimSize = 80;   // SPARSE_PUSH
constexpr uint32_t kSparseStatsCount = 8;  // i64 values in a SPARSE_STATS reply

// Note [Sparse id routing]
// Id i lives on server mix64(i ^ kSparseServerSalt) % S and, inside it, on
// shard mix64(i) % shards (as in the embedded ShardedSparseTable). The salt
// makes the two choices independent: with one hash, S = 2 servers of 2 shards
// each would put all of a server's ids on one shard. Rows start from a
// seeded value of (seed, id) alone, so results never depend on S or shards.
constexpr uint64_t kSparseServerSalt = 0x5bd1e9955bd1e995ULL;
inline int sparse_server_of(int64_t id, int num_servers) {
  return static_cast<int>(mix64(static_cast<uint64_t>(id) ^ kSparseServerSalt) %
                          static_cast<uint64_t>(num_servers));
}
inline int sparse_shard_of(int64_t id, int num_shards) {
  return static_cast<int>(mix64(static_cast<uint64_t>(id)) % static_cast<uint64_t>(num_shards));
}

void encode_sparse_config(const SparseTableConfig& c, uint8_t out[kSparseConfigSize]);
// Throws ProtocolError for a short block or unknown enum values, and
// InvalidArgument (via sparse_config_validate) for an unusable config.
SparseTableConfig decode_sparse_config(const uint8_t* in, size_t len);
// Every field that decides the table's rows and layout; for the idempotent
// SPARSE_CREATE (see docs/protocol.md).
bool same_sparse_config(const SparseTableConfig& a, const SparseTableConfig& b);
// "dim 16, rule SPARSE_ADAM, init uniform(-0.05, 0.05), seed 0, max_rows 0, ..." for errors.
std::string describe_sparse_config(const SparseTableConfig& c);

void encode_sparse_optim(const SparseOptim& o, uint8_t out[kSparseOptimSize]);
// Throws ProtocolError for a short block or an unknown rule, InvalidArgument
// for a hyperparameter the rule cannot use.
SparseOptim decode_sparse_optim(const uint8_t* in, size_t len);

}  // namespace fastps
