// Helper calls for bench/bench_helpers.py: loops that call a helper n times, kernel-style
// (a function pointer to the helper's number), so that a run's time is mostly the
// helpers' calls. bench/helpers/sqrti.c holds the helpers and the same loops in C
// (bench/helper_baselines.py times those and uBPF's JIT on this bytecode).
//
// Only for eBPF: compiled natively (as bench/bench_engines.py compiles every program
// here), the helper pointers are not functions and nothing may call the loops.

typedef unsigned long long u64;

static u64 (*sqrti)(u64 x) = (void *)200;  // floor(sqrt(x))
static u64 (*nop)(u64 x) = (void *)201;    // x: the bare cost of a call

// Each input depends on the previous results, so calls cannot overlap.
u64 sqrt_sum(u64 n) {
  u64 sum = 0;
  for (u64 i = 0; i < n; i++) {
    sum += sqrti((i * 7919) ^ sum);
  }
  return sum;
}

u64 nop_sum(u64 n) {
  u64 sum = 0;
  for (u64 i = 0; i < n; i++) {
    sum += nop((i * 7919) ^ sum);
  }
  return sum;
}
