// Linked into every C++ test when it is built with -fsanitize=thread
// (tests/cpp/CMakeLists.txt, FASTPS_SANITIZE=thread).
//
// libstdc++ (GCC 11+) implements a std::timed_mutex wait until a
// steady_clock deadline with pthread_mutex_clocklock, which GCC 12's libtsan
// does not intercept: TSan then misses the lock and reports false races and
// "unlock of an unlocked mutex" on every contended sender. This definition
// takes precedence over libc's for the test executable and routes the call to
// pthread_mutex_timedlock, which TSan does intercept, converting the deadline
// to CLOCK_REALTIME. Test builds only: the shipped library is untouched.
#include <pthread.h>
#include <time.h>

#include <cerrno>

extern "C" int pthread_mutex_clocklock(pthread_mutex_t* mutex, clockid_t clock, const struct timespec* abstime) {
  if (clock == CLOCK_REALTIME) return pthread_mutex_timedlock(mutex, abstime);
  if (clock != CLOCK_MONOTONIC) return EINVAL;
  timespec now_mono, now_real;
  clock_gettime(CLOCK_MONOTONIC, &now_mono);
  clock_gettime(CLOCK_REALTIME, &now_real);
  long long left_ns = (static_cast<long long>(abstime->tv_sec) - now_mono.tv_sec) * 1000000000LL +
                      (abstime->tv_nsec - now_mono.tv_nsec);
  if (left_ns < 0) left_ns = 0;
  long long real_ns = static_cast<long long>(now_real.tv_sec) * 1000000000LL + now_real.tv_nsec + left_ns;
  timespec deadline;
  deadline.tv_sec = static_cast<time_t>(real_ns / 1000000000LL);
  deadline.tv_nsec = static_cast<long>(real_ns % 1000000000LL);
  return pthread_mutex_timedlock(mutex, &deadline);
}
