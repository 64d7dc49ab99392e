// What one shard owns: its dense chunks, its sparse tables and its view of
// the job's consistency (rounds, staleness, dead workers).
//
// Note [One shard state]
// A shard's state is one object, held by the Shard and touched only by its
// thread (Note [Shard ownership] in server/shard.h), whichever server the
// shard belongs to:
//  - dense chunks, borrowed or owned. `borrowed` holds the embedded server's
//    chunks: views on the caller's parameter and optimizer-state tensors,
//    updated in place (zero copies), the step counter kept by the caller
//    with the tensors. `owned` holds the network server's chunks (PsChunk):
//    their own memory and step counter, plus the rounds, waiting requests
//    and deferred-apply state of Note [Consistency]. Both apply through
//    optim_update. They stay two maps because a borrowed chunk has none of
//    an owned chunk's round state and an owned chunk must never point into a
//    worker's memory.
//  - sparse tables: table id -> this shard's slice (SparseSlice), for both
//    servers. The embedded ShardedSparseTable uses a slice's table; the
//    network server's SparseService also its rounds, clocks and waiters.
//  - the consistency rules with the dead workers this shard knows of (the
//    network server's; an embedded server's shards keep one worker, BSP, and
//    never consult them).
#pragma once

#include "server/consistency.h"
#include "server/dense_service.h"
#include "server/sparse_service.h"
#include "table/dense_table.h"

namespace fastps {

struct ShardState {
  ShardState(int server_id, int num_workers, int staleness) : consistency(server_id, num_workers, staleness) {}

  Consistency consistency;
  DenseTable borrowed;  // embedded server: chunks over the caller's tensors
  DenseChunks owned;    // network server: chunks with their own memory and rounds
  SparseTables sparse;  // table id -> this shard's slice
};

}  // namespace fastps
