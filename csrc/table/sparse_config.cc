// Sparse table settings and the seeded initial values (table/sparse_config.h).
//
// Contraction stays off here as well: the initial values must be the same
// bits on every platform (a + (b - a) * u must not become an fma on one and
// not on another).

#include "table/sparse_config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cpu.h"
#include "common/error.h"
#include "common/hash.h"

namespace fastps {

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix(uint64_t x) { return mix64(x); }

inline double unit(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }  // [0, 1)

}  // namespace

const char* sparse_init_name(SparseInit init) {
  switch (init) {
    case SparseInit::kZeros: return "zeros";
    case SparseInit::kUniform: return "uniform";
    case SparseInit::kNormal: return "normal";
  }
  return "?";
}

const char* eviction_name(Eviction e) {
  switch (e) {
    case Eviction::kNone: return "none";
    case Eviction::kLru: return "lru";
    case Eviction::kLfu: return "lfu";
    case Eviction::kTtl: return "ttl";
  }
  return "?";
}

void sparse_config_validate(const SparseTableConfig& c) {
  FASTPS_CHECK(c.dim >= 1 && c.dim <= (int64_t{1} << 24), "fastps: sparse table dim must be in [1, 2^24], got ",
               c.dim);
  FASTPS_CHECK(static_cast<int>(c.rule) < kNumSparseRules, "fastps: unknown sparse rule ",
               static_cast<int>(c.rule));
  FASTPS_CHECK(static_cast<int>(c.init) <= 2, "fastps: unknown initialiser ", static_cast<int>(c.init));
  FASTPS_CHECK(static_cast<int>(c.eviction) <= 3, "fastps: unknown eviction policy ",
               static_cast<int>(c.eviction));
  if (c.init == SparseInit::kUniform)
    FASTPS_CHECK(std::isfinite(c.init_a) && std::isfinite(c.init_b) && c.init_a <= c.init_b,
                 "fastps: uniform initialiser needs finite low <= high, got (", c.init_a, ", ", c.init_b, ")");
  if (c.init == SparseInit::kNormal)
    FASTPS_CHECK(std::isfinite(c.init_a) && std::isfinite(c.init_b) && c.init_b >= 0.0,
                 "fastps: normal initialiser needs a finite mean and std >= 0, got (", c.init_a, ", ",
                 c.init_b, ")");
  FASTPS_CHECK(c.max_rows >= 0, "fastps: max_rows must be >= 0 (0: no cap), got ", c.max_rows);
  FASTPS_CHECK(c.ttl_steps >= 0, "fastps: ttl_steps must be >= 0, got ", c.ttl_steps);
  if (c.eviction == Eviction::kTtl)
    FASTPS_CHECK(c.ttl_steps >= 1, "fastps: eviction 'ttl' needs ttl_steps >= 1");
  FASTPS_CHECK(c.admit_threshold >= 0 && c.admit_threshold <= (int64_t{1} << 32),
               "fastps: admit_threshold must be in [0, 2^32], got ", c.admit_threshold);
  FASTPS_CHECK(c.max_pending >= 1, "fastps: max_pending must be >= 1, got ", c.max_pending);
  FASTPS_CHECK(c.eviction_samples >= 1 && c.eviction_samples <= 1024,
               "fastps: eviction_samples must be in [1, 1024], got ", c.eviction_samples);
}

namespace {
// The uniform initialiser's loop, compiled twice (as the sparse optimizer
// kernels are): the 64-bit multiplies of mix64 vectorise only with AVX-512DQ
// (vpmullq), so a row's initial values take ~8x fewer instructions there.
// Same bits either way: integer hashing, exact int -> double conversion,
// then a + width * u as a double multiply and a double add (contraction is
// off in this file), rounded to float once.
inline __attribute__((always_inline)) void uniform_fill(uint64_t base, double a, double width, float* out,
                                                        int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    const double u = unit(mix(base + static_cast<uint64_t>(j + 1) * kGolden));
    out[j] = static_cast<float>(a + width * u);
  }
}

void uniform_fill_generic(uint64_t base, double a, double width, float* out, int64_t dim) {
  uniform_fill(base, a, width, out, dim);
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512dq,avx512vl"))) void uniform_fill_avx512(uint64_t base, double a,
                                                                              double width, float* out,
                                                                              int64_t dim) {
  uniform_fill(base, a, width, out, dim);
}
#endif
}  // namespace

void sparse_init_values(const SparseTableConfig& c, int64_t id, float* out) {
  const int64_t dim = c.dim;
  if (c.init == SparseInit::kZeros) {
    std::fill(out, out + dim, 0.0f);
    return;
  }
  const uint64_t base = mix(static_cast<uint64_t>(id) ^ mix(c.seed + kGolden));
  const double a = c.init_a, b = c.init_b;
  if (c.init == SparseInit::kUniform) {
#if defined(__x86_64__)
    if (cpu_has_avx512dq_vl()) return uniform_fill_avx512(base, a, b - a, out, dim);
#endif
    return uniform_fill_generic(base, a, b - a, out, dim);
  }
  constexpr double kTwoPi = 2.0 * 3.141592653589793;
  for (int64_t j = 0; j < dim; ++j) {
    const uint64_t k = static_cast<uint64_t>(2 * j);
    const double u1 = 1.0 - unit(mix(base + (k + 1) * kGolden));  // (0, 1]
    const double u2 = unit(mix(base + (k + 2) * kGolden));
    const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
    out[j] = static_cast<float>(a + b * z);
  }
}

void sparse_check_cap_split(const SparseTableConfig& c, int parts, const char* parts_name,
                            const SparseSpread* server) {
  const int64_t share = server ? sparse_server_rows(c, *server) : c.max_rows;
  if (c.max_rows == 0 || share >= parts) return;
  throw InvalidArgument(detail::concat(
      "fastps: max_rows=", c.max_rows,
      server ? detail::concat(" over ", server->servers, " server(s) gives server ", server->server)
             : std::string(" gives the table"),
      " a share of ", share, " row(s), below its number of ", parts_name, " (", parts,
      "); raise max_rows (0: no cap) or use fewer ", parts_name));
}

void sparse_check_push(const SparseTableConfig& c, const SparseOptim& o, int64_t step, const char* table,
                       int64_t key) {
  if (o.rule == c.rule && step >= 1) return;
  const std::string name = key >= 0 ? detail::concat(table, " ", key) : std::string(table);
  FASTPS_CHECK(o.rule == c.rule, "fastps: push with rule '", sparse_rule_name(o.rule), "' to ", name,
               ", created for '", sparse_rule_name(c.rule), "' (the optimizer state layout differs)");
  FASTPS_CHECK(step >= 1, "fastps: the table step of a push to ", name, " must be >= 1, got ", step);
}

void sparse_check_file_rows(const SparseTableConfig& c, int64_t rows, int64_t cap, const std::string& where) {
  FASTPS_CHECK_TYPED(CapacityError, cap == 0 || rows <= cap,
                     "fastps: the file holds more rows than this table's cap (max_rows=", c.max_rows, where,
                     "); load it into a table with a larger max_rows");
}

}  // namespace fastps
