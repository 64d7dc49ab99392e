// Recognises a gradient edit that is one uniform scale (Note [Deferred apply]
// in server/dense_service.cc): after backward a worker's .grad holds the round's
// mean; clip_grad_norm_ and GradScaler.unscale_ multiply it by one float32
// factor, which the worker then sends instead of the whole gradient.
#pragma once

#include <cstdint>

namespace fastps {

// The factor s such that edited == mean * s, or NaN if there is none.
//
// Exact first: if one float32 s gives fl(mean[i] * s) == edited[i] for every
// i (one clip or one unscale), that s; the servers then compute the same
// bits. Otherwise (a chain of scales, such as unscale_ then clip, rounds at
// each step) the least-squares factor, if every element is within
// `max_ulps` units in the last place of fl(mean[i] * s): the servers then
// apply a gradient within that many ulps of the worker's own. Any
// non-finite value, or a zero in `mean` where `edited` is not zero, gives NaN.
// Reads both arrays at most twice; thread-safe (pure).
float uniform_scale(const float* edited, const float* mean, int64_t n, int max_ulps = 2);

}  // namespace fastps
