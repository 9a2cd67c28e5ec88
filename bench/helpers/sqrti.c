// The helpers of bench/programs/helper_calls.c (helpers 200 and 201), for
// bench/bench_helpers.py and bench/helper_baselines.py:
//
//   sqrti, nop         plain C functions (uint64_t f(uint64_t)): what uBPF's JIT calls
//                      (bench/ubpf_runner.c built with UBPF_RUNNER_HELPERS), and what
//                      bpfexec calls as native helpers (HelperRegistry.native,
//                      --native-helpers), whose ABI passes r1..r5 first
//   sqrt_sum, nop_sum  the loops of helper_calls.c in C, calling the helpers
//                      through a function pointer: the native baseline
//
// Host C: cc -O2 -shared -fPIC -I "$(python -c 'import bpfexec; print(bpfexec.include_dir())')"

// sqrti is the example native helper's (and buffer_sum comes along, unused).
#include "../../examples/native-helper/sqrti.c"

// Returns its argument: a call and nothing else.
uint64_t nop(uint64_t x) { return x; }

// bpfexec's native helper ABI: an opaque per-call pointer, then r1..r5; r0 is returned.
uint64_t bpfexec_sqrti(void *call, uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4,
                       uint64_t r5) {
  (void)call, (void)r2, (void)r3, (void)r4, (void)r5;
  return sqrti(r1);
}

uint64_t bpfexec_nop(void *call, uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4,
                     uint64_t r5) {
  (void)call, (void)r2, (void)r3, (void)r4, (void)r5;
  return nop(r1);
}

// The loops of helper_calls.c. The helper is read through a volatile pointer, so the
// compiler cannot know which function it calls: no inlining, one indirect call each
// time round, as a JIT's call of a helper.
typedef uint64_t (*helper_fn)(uint64_t x);
static helper_fn volatile sqrti_slot = sqrti;
static helper_fn volatile nop_slot = nop;

static uint64_t helper_loop(helper_fn volatile *slot, uint64_t n) {
  helper_fn helper = *slot;
  uint64_t sum = 0;
  for (uint64_t i = 0; i < n; i++) {
    sum += helper((i * 7919) ^ sum);
  }
  return sum;
}

uint64_t sqrt_sum(uint64_t n) { return helper_loop(&sqrti_slot, n); }

uint64_t nop_sum(uint64_t n) { return helper_loop(&nop_slot, n); }
