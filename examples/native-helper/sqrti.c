/* Native helpers: C functions a program calls as helpers 200 and 201.
 *
 *   cc -O2 -shared -fPIC -I "$(python -c 'import bpfexec; print(bpfexec.include_dir())')" \
 *       sqrti.c -o libsqrti.so
 *   bpfexec run sqrt_sum.o --function sqrt_sum --arg 1000 --engine jit \
 *       --native-helpers ./libsqrti.so:sqrti=200 --native-helpers ./libsqrti.so:buffer_sum=201
 *
 * (docs/native-helpers.md; tests/test_native_helpers.py builds and runs this.)
 */
#include <bpfexec_helper.h>

// No VM memory needed: the plain signature of a uBPF helper, one parameter.
uint64_t sqrti(uint64_t x) {
  // Bit by bit: no floating point, exact for all inputs.
  uint64_t root = 0;
  uint64_t bit = 1ull << 62;
  while (bit > x) {
    bit >>= 2;
  }
  while (bit != 0) {
    if (x >= root + bit) {
      x -= root + bit;
      root = (root >> 1) + bit;
    } else {
      root >>= 1;
    }
    bit >>= 2;
  }
  return root;
}

// Sums the program's buffer (r1, r2 bytes) through bpfexec_read, and logs the sum:
// memory is reached by the program's virtual addresses, bounds-checked.
uint64_t buffer_sum(uint64_t addr, uint64_t size, uint64_t r3, uint64_t r4, uint64_t r5,
                    bpfexec_call *call) {
  (void)r3, (void)r4, (void)r5;
  unsigned char chunk[64];
  uint64_t sum = 0;
  while (size > 0) {
    uint64_t n = size < sizeof chunk ? size : sizeof chunk;
    if (bpfexec_read(call, addr, chunk, n) < 0) {
      return 0;  // outside the program's memory: the run ends with MEMORY_FAULT
    }
    for (uint64_t i = 0; i < n; i++) {
      sum += chunk[i];
    }
    addr += n;
    size -= n;
  }
  bpfexec_log(call, "summed", 6);
  return sum;
}
