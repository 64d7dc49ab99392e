// The consistency module the network server's dense chunks and sparse tables
// share (Note [Consistency] in server/consistency.h): when a waiting request
// is ready, when a dead worker makes it unreachable, who joined a round, and
// the sparse request decoders of protocol/sparse_wire.h.
//
// Prints "N passed, M failed" like the other C++ tests; exits non-zero on failure.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "protocol/sparse_wire.h"
#include "server/consistency.h"
#include "report.h"

using namespace fastps;
using namespace fastps_test;

namespace {

void rounds_wait_for_their_version() {
  Consistency bsp(0, 2, 0);
  const std::vector<uint32_t> clock = {0, 0};
  Progress p{true, 3, &clock};
  report(bsp.bsp() && bsp.ready(p, 3) && !bsp.ready(p, 4) && bsp.ready(p, 0), "rounds_wait_for_their_version");
  // A sum-only chunk goes in rounds under SSP too; the version decides, not the clocks.
  Consistency ssp(0, 2, 1);
  report(ssp.ready(p, 3) && !ssp.ready(p, 4), "sum_only_rounds_ignore_staleness");
}

void ssp_waits_for_the_slowest_clock() {
  Consistency ssp(0, 3, 2);
  const std::vector<uint32_t> clock = {5, 3, 4};
  Progress p{false, 0, &clock};
  report(!ssp.bsp() && ssp.ready(p, 5) && !ssp.ready(p, 6), "ssp_waits_for_the_slowest_clock");
  Consistency asp(0, 3, -1);
  report(asp.ready(p, 1000000), "asp_never_waits");
}

void dead_workers_block_only_what_waits_for_them() {
  Consistency bsp(7, 2, 0);
  const std::vector<uint32_t> clock = {4, 1};
  Progress rounds{true, 1, &clock};
  report(!bsp.unreachable(rounds, 2) && !bsp.any_dead(), "nobody_dead_nothing_unreachable");
  report(!bsp.worker_died(2, "out of range") && !bsp.any_dead(), "worker_outside_the_job_is_ignored");
  bsp.worker_died(1, "peer sent nothing for 30 s");
  report(bsp.unreachable(rounds, 2), "a_round_needs_every_worker");
  report(bsp.dead_text() == "server 7: worker rank 1 disconnected (peer sent nothing for 30 s)",
         "dead_text_names_the_first_dead_worker", bsp.dead_text());

  Consistency ssp(0, 2, 1);
  ssp.worker_died(1, "");
  Progress clocked{false, 0, &clock};
  // Rank 1 stays at clock 1: a pull needing 2 (1 + staleness 1) is fine, 3 is not.
  report(!ssp.unreachable(clocked, 2) && ssp.unreachable(clocked, 3), "ssp_blocks_beyond_the_dead_clock");
  report(ssp.describe_dead(1) == "worker rank 1 disconnected", "describe_dead_without_reason");
}

void round_members() {
  RoundMembers r;
  r.start(3);
  r.join(2);
  r.join(0);
  report(r.count() == 2 && r.has(0) && !r.has(1) && r.has(2) && r.list() == "0, 2", "round_members_join",
         r.list());
  r.close();
  report(r.count() == 0, "round_members_close");
  r.start(3);
  report(r.count() == 0 && !r.has(0) && !r.has(2), "round_members_start_forgets_the_last_round");
}

void sparse_decoders() {
  MessageHeader h;
  h.op = Op::kSparsePull;
  h.count = 2;
  h.aux = 9;
  uint8_t ids[16];
  const int64_t a = -5, b = 1LL << 40;
  std::memcpy(ids, &a, 8);
  std::memcpy(ids + 8, &b, 8);
  SparsePullRequest pull = decode_sparse_pull(h, ids, sizeof(ids));
  report(pull.ids.n == 2 && pull.ids[0] == a && pull.ids[1] == b && pull.step == 9, "decode_sparse_pull");
  bool threw = false;
  try {
    decode_sparse_pull(h, ids, 8);
  } catch (const Error&) {
    threw = true;
  }
  report(threw, "decode_sparse_pull_checks_the_payload");
  report(is_sparse_op(Op::kSparseCreate) && is_sparse_op(Op::kSparseLoad) && !is_sparse_op(Op::kApply),
         "is_sparse_op");
  SparseTableConfig c;
  c.dim = 4;
  uint8_t block[kSparseConfigSize];
  encode_sparse_config(c, SparseSpread{0, 1}, block);
  h.op = Op::kSparseCreate;
  h.count = 0;
  h.aux = kSparseCreateReplace;
  SparseCreateRequest create = decode_sparse_create(h, block, sizeof(block));
  h.aux = 0;
  report(create.replace && create.config.dim == 4 && !decode_sparse_create(h, block, sizeof(block)).replace,
         "decode_sparse_create_replace");
}

}  // namespace

int main() {
  rounds_wait_for_their_version();
  ssp_waits_for_the_slowest_clock();
  dead_workers_block_only_what_waits_for_them();
  round_members();
  sparse_decoders();
  return summary();
}
