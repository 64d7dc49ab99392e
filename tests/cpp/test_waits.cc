// Waits that end early (Ctrl-C slices, deadlines) against requests that finish
// right at that moment (STYLE.md "Faults and races": every wait that can end
// early re-checks whether the result arrived before it reports a failure).
//
// Future::wait waits in slices; a request completed by another thread as a
// slice times out must return its result, not the slice's TimeoutError. The
// test makes that race likely: tiny slices, and a completer that finishes the
// request at a random point around the first slice boundaries, thousands of
// times. Before the fix about 1% of waits threw a spurious TimeoutError.
//
// Prints "N passed, M failed" like the other C++ tests; exits non-zero on failure.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

#include "client/ps_client.h"
#include "common/error.h"
#include "report.h"

using namespace fastps;
using namespace fastps_test;

namespace {

// Spins (no sleep: the kernel's timer slack would blur the boundary) until `t`.
void spin_until(Clock::time_point t) {
  while (Clock::now() < t) cpu_relax();
}

// `iterations` waits with `slice`-long slices, each completed by another
// thread at a random offset in [0, 3 * slice). Returns spurious timeouts.
int slice_boundary_race(int iterations, std::chrono::microseconds slice, bool with_error) {
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int64_t> offset_us(0, 3 * slice.count());
  int spurious = 0;
  for (int i = 0; i < iterations; ++i) {
    auto completion = std::make_shared<Completion>(1);
    Future future(completion, "test request", std::chrono::milliseconds(10000));
    const auto start = Clock::now();
    const auto at = start + std::chrono::microseconds(offset_us(rng));
    std::thread completer([&] {
      spin_until(at);
      completion->done(with_error ? std::make_exception_ptr(std::runtime_error("request's own error")) : nullptr);
    });
    try {
      future.wait(0, [] {}, slice);
      if (with_error) ++spurious;  // the request's own error was lost
    } catch (const TimeoutError&) {
      ++spurious;
    } catch (const std::runtime_error& e) {
      if (!with_error || std::string(e.what()) != "request's own error") ++spurious;
    }
    completer.join();
  }
  return spurious;
}

}  // namespace

int main() {
  {
    int bad = slice_boundary_race(4000, std::chrono::microseconds(50), false);
    report(bad == 0, "future_wait_never_times_out_when_the_result_landed_at_a_slice_end",
           std::to_string(bad) + " of 4000 waits threw TimeoutError");
  }
  {
    int bad = slice_boundary_race(2000, std::chrono::microseconds(50), true);
    report(bad == 0, "future_wait_rethrows_the_requests_own_error_at_a_slice_end",
           std::to_string(bad) + " of 2000 waits lost the request's error");
  }
  {
    // The deadline itself still ends a wait that nothing completes.
    auto completion = std::make_shared<Completion>(1);
    Future future(completion, "never answered", std::chrono::milliseconds(10000));
    const auto start = Clock::now();
    bool timed_out = false;
    try {
      future.wait(0.02, [] {}, std::chrono::microseconds(1000));
    } catch (const TimeoutError&) {
      timed_out = true;
    }
    const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
    report(timed_out && took >= 20 && took < 2000, "future_wait_times_out_at_its_deadline",
           std::to_string(took) + " ms");
    completion->done();
  }
  {
    // An exception from `between` ends the wait (Ctrl-C).
    auto completion = std::make_shared<Completion>(1);
    Future future(completion, "interrupted", std::chrono::milliseconds(10000));
    bool interrupted = false;
    try {
      future.wait(0, [] { throw std::runtime_error("KeyboardInterrupt"); }, std::chrono::microseconds(1000));
    } catch (const std::runtime_error& e) {
      interrupted = std::string(e.what()) == "KeyboardInterrupt";
    }
    report(interrupted, "future_wait_ends_when_between_throws");
    completion->done();
  }
  return summary();
}
