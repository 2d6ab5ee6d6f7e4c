// Pinning torch's OpenMP threads to CPUs, one each (vLLM's CPU backend does the same): a thread that
// stays on its core keeps its caches and is not parked behind another process's thread, which on a
// shared 2-core machine decides whether two threads beat one.
#include <ATen/Parallel.h>
#include <omp.h>
#include <sched.h>
#include <torch/library.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

namespace {

// cpus: the CPU of OpenMP thread i is cpus[i % len]; returns the number of threads pinned
int64_t bind_threads(const std::vector<int64_t>& cpus) {
  TORCH_CHECK(!cpus.empty(), "bind_threads: no CPUs given");
  const int n = at::get_num_threads();
  std::vector<int> errors(n, 0);
#pragma omp parallel num_threads(n)
  {
    const int i = omp_get_thread_num();
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpus[i % cpus.size()]), &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) errors[i] = errno;
  }
  for (int i = 0; i < n; ++i)
    TORCH_CHECK(errors[i] == 0, "bind_threads: thread ", i, ": ", std::strerror(errors[i]));
  return n;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(csps, m) {
  m.def("bind_threads(int[] cpus) -> int");
}

TORCH_LIBRARY_IMPL(csps, CompositeExplicitAutograd, m) { m.impl("bind_threads", &bind_threads); }
