#include "protocol/sparse_wire.h"

#include <cstring>

#include "common/error.h"
#include "protocol/message.h"

namespace fastps {

void encode_sparse_config(const SparseTableConfig& c, const SparseSpread& spread, uint8_t out[kSparseConfigSize]) {
  std::memset(out, 0, kSparseConfigSize);
  store_le32(out, uint32_t(kSparseConfigSize));
  out[4] = uint8_t(c.rule);
  out[5] = uint8_t(c.init);
  out[6] = uint8_t(c.eviction);
  store_le64(out + 8, uint64_t(c.dim));
  store_f64(out + 16, c.init_a);
  store_f64(out + 24, c.init_b);
  store_le64(out + 32, c.seed);
  store_le64(out + 40, uint64_t(c.max_rows));
  store_le64(out + 48, uint64_t(c.ttl_steps));
  store_le64(out + 56, uint64_t(c.admit_threshold));
  store_le64(out + 64, uint64_t(c.max_pending));
  store_le32(out + 72, uint32_t(c.eviction_samples));
  store_le16(out + 76, uint16_t(spread.server));
  store_le16(out + 78, uint16_t(spread.servers));
}

SparseTableConfig decode_sparse_config(const uint8_t* in, size_t len, SparseSpread* spread) {
  FASTPS_CHECK_TYPED(ProtocolError, len >= kSparseConfigSize && load_le32(in) == kSparseConfigSize,
                     "sparse config block of ", len, " bytes, expected ", kSparseConfigSize);
  FASTPS_CHECK_TYPED(ProtocolError, in[4] < kNumSparseRules && in[5] <= 2 && in[6] <= 3 && in[7] == 0,
                     "sparse config block with an unknown rule, init or eviction");
  spread->server = load_le16(in + 76);
  spread->servers = load_le16(in + 78);
  FASTPS_CHECK_TYPED(ProtocolError, spread->server < spread->servers, "sparse config block for server ",
                     spread->server, " of ", spread->servers);
  SparseTableConfig c;
  c.rule = SparseRule(in[4]);
  c.init = SparseInit(in[5]);
  c.eviction = Eviction(in[6]);
  c.dim = int64_t(load_le64(in + 8));
  c.init_a = load_f64(in + 16);
  c.init_b = load_f64(in + 24);
  c.seed = load_le64(in + 32);
  c.max_rows = int64_t(load_le64(in + 40));
  c.ttl_steps = int64_t(load_le64(in + 48));
  c.admit_threshold = int64_t(load_le64(in + 56));
  c.max_pending = int64_t(load_le64(in + 64));
  c.eviction_samples = int32_t(load_le32(in + 72));
  sparse_config_validate(c);
  return c;
}

bool same_sparse_config(const SparseTableConfig& a, const SparseTableConfig& b) {
  return a.dim == b.dim && a.rule == b.rule && a.init == b.init && a.init_a == b.init_a &&
         a.init_b == b.init_b && a.seed == b.seed && a.max_rows == b.max_rows &&
         a.eviction == b.eviction && a.ttl_steps == b.ttl_steps &&
         a.admit_threshold == b.admit_threshold && a.max_pending == b.max_pending &&
         a.eviction_samples == b.eviction_samples;
}

std::string describe_sparse_config(const SparseTableConfig& c) {
  return detail::concat("dim ", c.dim, ", rule ", sparse_rule_name(c.rule), ", init ",
                        sparse_init_name(c.init), "(", c.init_a, ", ", c.init_b, "), seed ", c.seed,
                        ", max_rows ", c.max_rows, ", eviction ", eviction_name(c.eviction),
                        ", ttl_steps ", c.ttl_steps, ", admit_threshold ", c.admit_threshold,
                        ", max_pending ", c.max_pending);
}

void encode_sparse_optim(const SparseOptim& o, uint8_t out[kSparseOptimSize]) {
  std::memset(out, 0, kSparseOptimSize);
  store_le32(out, uint32_t(kSparseOptimSize));
  out[4] = uint8_t(o.rule);
  out[5] = o.maximize ? 0x01 : 0x00;
  store_f64(out + 8, o.lr);
  store_f64(out + 16, o.eps);
  store_f64(out + 24, o.lr_decay);
  store_f64(out + 32, o.initial_accumulator_value);
  store_f64(out + 40, o.beta1);
  store_f64(out + 48, o.beta2);
  store_f64(out + 56, o.l1);
  store_f64(out + 64, o.l2);
  store_f64(out + 72, o.ftrl_beta);
}

SparseOptim decode_sparse_optim(const uint8_t* in, size_t len) {
  FASTPS_CHECK_TYPED(ProtocolError, len >= kSparseOptimSize && load_le32(in) == kSparseOptimSize,
                     "sparse optimizer block of ", len, " bytes, expected ", kSparseOptimSize);
  FASTPS_CHECK_TYPED(ProtocolError, in[4] < kNumSparseRules && (in[5] & ~0x01) == 0 && load_le16(in + 6) == 0,
                     "sparse optimizer block with an unknown rule or flag");
  SparseOptim o;
  o.rule = SparseRule(in[4]);
  o.maximize = (in[5] & 0x01) != 0;
  o.lr = load_f64(in + 8);
  o.eps = load_f64(in + 16);
  o.lr_decay = load_f64(in + 24);
  o.initial_accumulator_value = load_f64(in + 32);
  o.beta1 = load_f64(in + 40);
  o.beta2 = load_f64(in + 48);
  o.l1 = load_f64(in + 56);
  o.l2 = load_f64(in + 64);
  o.ftrl_beta = load_f64(in + 72);
  sparse_optim_validate(o);
  return o;
}

SparseCreateRequest decode_sparse_create(const MessageHeader& h, const uint8_t* p, size_t len) {
  FASTPS_CHECK(len == kSparseConfigSize, "SPARSE_CREATE payload of ", len, " bytes, expected ", kSparseConfigSize);
  SparseCreateRequest r;
  r.config = decode_sparse_config(p, len, &r.spread);
  r.replace = h.aux == kSparseCreateReplace;
  return r;
}

SparsePullRequest decode_sparse_pull(const MessageHeader& h, const uint8_t* p, size_t len) {
  SparsePullRequest r;
  r.ids = SparseIds{p, int64_t(h.count)};
  FASTPS_CHECK(len == size_t(r.ids.n) * 8, "SPARSE_PULL payload of ", len, " bytes for ", r.ids.n, " ids");
  r.step = h.aux;
  return r;
}

SparsePushRequest decode_sparse_push(const MessageHeader& h, const uint8_t* p, size_t len) {
  FASTPS_CHECK(len >= kSparseOptimSize, "SPARSE_PUSH payload of ", len, " bytes has no optimizer block");
  SparsePushRequest r;
  r.optim = decode_sparse_optim(p, len);
  const int64_t n = h.count;
  const uint64_t rest = len - kSparseOptimSize;
  FASTPS_CHECK(rest >= uint64_t(n) * 8, "SPARSE_PUSH payload too short for ", n, " ids");
  r.ids = SparseIds{p + kSparseOptimSize, n};
  r.grads = r.ids.data + size_t(n) * 8;
  r.grad_bytes = rest - uint64_t(n) * 8;
  r.step = h.aux;
  return r;
}

uint32_t decode_sparse_stats(const MessageHeader& h, size_t len) {
  FASTPS_CHECK(len == 0, "SPARSE_STATS carries no payload");
  return h.aux;
}

void encode_sparse_stats_reply(const SparseStatsSum& s, uint8_t out[8 * kSparseStatsCount]) {
  const SparseTableStats& t = s.stats;
  const int64_t v[kSparseStatsCount] = {t.rows,     t.admitted, t.evicted,      t.expired,
                                        t.rejected, t.pending,  t.memory_bytes, s.step};
  for (uint32_t i = 0; i < kSparseStatsCount; ++i) store_le64(out + 8 * i, uint64_t(v[i]));
}

SparseStatsSum decode_sparse_stats_reply(const uint8_t* in, size_t len, int server) {
  FASTPS_CHECK_TYPED(ProtocolError, len == 8 * kSparseStatsCount, "fastps: parameter server ", server,
                     " sent a sparse stats reply of ", len, " bytes");
  int64_t v[kSparseStatsCount];
  for (uint32_t i = 0; i < kSparseStatsCount; ++i) v[i] = int64_t(load_le64(in + 8 * i));
  SparseStatsSum s;
  s.stats = SparseTableStats{v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
  s.step = v[7];
  return s;
}

uint32_t decode_sparse_export(const MessageHeader& h, size_t len) {
  FASTPS_CHECK(len == 0, "SPARSE_EXPORT carries no payload");
  return h.aux;
}

SparseLoadRequest decode_sparse_load(const MessageHeader&, const uint8_t* p, size_t len) {
  FASTPS_CHECK(len >= kSparseLoadHeadSize, "SPARSE_LOAD payload of ", len, " bytes is too short");
  SparseLoadRequest r;
  r.config = decode_sparse_config(p, kSparseConfigSize, &r.spread);
  r.step = int64_t(load_le64(p + kSparseConfigSize));
  r.rows = load_le64(p + kSparseConfigSize + 8);
  r.pending_ids = load_le64(p + kSparseConfigSize + 16);
  FASTPS_CHECK(r.step >= 0, "SPARSE_LOAD with a negative step");
  r.record_bytes =
      int64_t(sizeof(RowHeader)) + 4 * (r.config.dim + sparse_state_floats(r.config.rule, r.config.dim));
  const uint64_t body = len - kSparseLoadHeadSize;
  FASTPS_CHECK(r.rows <= body / uint64_t(r.record_bytes) && r.pending_ids <= body / 16 &&
                   r.rows * uint64_t(r.record_bytes) + r.pending_ids * 16 == body,
               "SPARSE_LOAD payload of ", len, " bytes does not hold ", r.rows, " rows and ", r.pending_ids,
               " pending ids");
  r.records = p + kSparseLoadHeadSize;
  r.pending = r.records + r.rows * uint64_t(r.record_bytes);
  return r;
}

}  // namespace fastps
