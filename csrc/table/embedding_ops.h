// Worker-side helpers of fastps.nn embeddings: the batch's unique ids, the
// gather of pulled rows into the output and the gradient's segment sum.
//
// Note [Worker-side embedding ops]
// ================================
// A forward of fastps.nn.Embedding turns n ids into their u unique ids and an
// inverse index, pulls the u rows and writes out[i] = rows[inverse[i]]; its
// backward sums the output gradient per unique id (the worker-side dedup of
// the push). For the benchmark's batches (16384 Zipf ids, 6.9k unique, dim 64;
// warm caches; bench/README.md) these loops take
// 0.17 ms (unique; 0.28 sorted), 0.32 ms (gather) and 0.36 ms (segment sum)
// where np.unique took 0.5-0.6, torch's index_select 0.23 (two threads) and
// index_add_ 0.58. They run on the calling thread, for two reasons besides
// speed:
//   * Order: unique ids come in order of first appearance (a hash pass; the
//     sorted variant radix-sorts only the u unique ids), and the segment sum
//     adds the rows of one id in input order, starting from +0.0, exactly as a
//     sequential index_add into zeros does. Results do not depend on threads.
//   * No OpenMP: a parallel torch op leaves torch's OpenMP workers spinning
//     for 1-2 ms (libgomp's default wait policy), holding the cores the table's
//     shard threads need for the push that follows at step(); with torch's
//     index_select/index_add in forward and backward the benchmark's Adagrad
//     step took 1.63 ms, with these loops 1.11 ms (push 1.31 -> 0.79 ms).
// In the embedded mode the gather is folded into the pull: embedding_chains()
// links each unique id's positions and SparseTable::pull_scatter writes each
// row to all of them on its shard thread (two threads instead of one, no
// (u, dim) intermediate; forward 1.93-2.10 -> 1.71-1.81 ms, interleaved).
// The Python side (fastps/nn/embedding.py) checks dtypes, shapes and
// contiguity; these functions trust their arguments.
#pragma once

#include <cstdint>

namespace fastps {

struct UniqueResult {
  int64_t count = 0;  // unique ids written to uids[0, count)
  int64_t min = 0;    // smallest and largest id (0, 0 when n == 0)
  int64_t max = 0;
};

// uids[0, count): the distinct values of ids[0, n), in ascending order if
// `sorted`, else in order of first appearance; inverse[i]: the position of
// ids[i] in uids. uids must hold n.
UniqueResult unique_inverse(const int64_t* ids, int64_t n, int64_t* uids, int64_t* inverse, bool sorted);

// The positions of each unique id as chains: first[u] = the first i with
// inverse[i] == u, next[i] = the next such position after i, -1 at the end
// (first: n_unique entries, next: n), for SparseTable::pull_scatter.
void embedding_chains(const int64_t* inverse, int64_t n, int64_t n_unique, int64_t* first, int64_t* next);

// out[i, :] = rows[inverse[i], :] for i < n; rows of dim floats.
void gather_rows(const float* rows, const int64_t* inverse, int64_t n, int64_t dim, float* out);

// out[u, :] = +0.0 + sum of grads[i, :] over i with inverse[i] == u, in order
// of i, for u < n_unique (every inverse[i] < n_unique); out is overwritten.
void segment_sum(const float* grads, const int64_t* inverse, int64_t n, int64_t dim, int64_t n_unique,
                 float* out);

}  // namespace fastps
