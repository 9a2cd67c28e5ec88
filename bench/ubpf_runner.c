// Times raw eBPF bytecode on uBPF's x86-64 JIT, for `bench/bench_engines.py --ubpf-lib DIR`.
//
//     ubpf_runner CODE MEMORY RUNS [RODATA RODATA_BASE]
//
// CODE is raw bytecode (8-byte little-endian slots) whose pc 0 is the entry. uBPF
// calls it with r1 = a copy of MEMORY and r2 = its length; bench_engines.py puts
// the case's arguments in that memory and prepends a stub that loads them into
// r1..r5 before calling the benchmarked function. The copy is refreshed before
// every run (outside the timed region), so in-place programs always start from
// the same input.
//
// RODATA is the program's read-only data image and RODATA_BASE the virtual
// address bpfexec's loader gave it: every `lddw` constant inside
// [RODATA_BASE, RODATA_BASE + size] is rewritten to the host address of a copy.
//
// Prints one line: r0=0x... best_ns=... median_ns=... runs=N.
// Only uBPF's public API (ubpf.h) is used. Build:
//     cc -O2 -I DIR bench/ubpf_runner.c DIR/libubpf.a -o ubpf_runner
//
// Helpers mode, for bench/helper_baselines.py: built with -DUBPF_RUNNER_HELPERS and
// linked with bench/helpers/sqrti.c, the runner gives the program the helpers of
// bench/programs/helper_calls.c, 200 (sqrti) and 201 (nop), as plain C functions:
//     cc -O2 -DUBPF_RUNNER_HELPERS -I DIR bench/ubpf_runner.c bench/helpers/sqrti.c
//         DIR/libubpf.a -o ubpf_helper_runner

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ubpf.h"

static void fail(const char *what, const char *detail) {
  fprintf(stderr, "ubpf_runner: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

static unsigned char *slurp(const char *path, size_t *size) {
  FILE *file = fopen(path, "rb");
  if (file == NULL) {
    fail("cannot open", path);
  }
  if (fseek(file, 0, SEEK_END) != 0) {
    fail("cannot seek", path);
  }
  long end = ftell(file);
  if (end < 0 || fseek(file, 0, SEEK_SET) != 0) {
    fail("cannot size", path);
  }
  // At least one byte, so an empty memory image still gets a valid pointer.
  unsigned char *data = calloc((size_t)end + 1, 1);
  if (data == NULL) {
    fail("out of memory reading", path);
  }
  if ((long)fread(data, 1, (size_t)end, file) != end) {
    fail("short read", path);
  }
  fclose(file);
  *size = (size_t)end;
  return data;
}

static uint32_t get32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put32(unsigned char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) {
    p[i] = (unsigned char)(v >> (8 * i));
  }
}

// Point every lddw that names a virtual rodata address at the host copy.
static int relocate_rodata(unsigned char *code, size_t size, uint64_t base,
                           const unsigned char *rodata, size_t rodata_size) {
  int patched = 0;
  size_t slots = size / 8;
  for (size_t pc = 0; pc + 1 < slots; pc++) {
    unsigned char *slot = code + 8 * pc;
    if (slot[0] != 0x18 || (slot[1] >> 4) != 0) {  // lddw with a plain constant
      continue;
    }
    unsigned char *next = slot + 8;
    uint64_t value = (uint64_t)get32(slot + 4) | (uint64_t)get32(next + 4) << 32;
    if (value >= base && value - base <= rodata_size) {
      uint64_t host = (uint64_t)(uintptr_t)rodata + (value - base);
      put32(slot + 4, (uint32_t)host);
      put32(next + 4, (uint32_t)(host >> 32));
      patched++;
    }
    pc++;  // the second half of the lddw
  }
  return patched;
}

#ifdef UBPF_RUNNER_HELPERS
uint64_t sqrti(uint64_t x);  // bench/helpers/sqrti.c
uint64_t nop(uint64_t x);

static const struct {
  uint32_t number;  // the program's helper number
  const char *name;
  uint64_t (*fn)(uint64_t x);
} helpers[] = {{200, "sqrti", sqrti}, {201, "nop", nop}};

// uBPF's helper table has UBPF_MAX_EXT_FUNCS (64) slots, too few for helper numbers
// 200 and 201: helpers[i] is registered in slot i, and every helper call (opcode 0x85,
// src 0) is renumbered to its slot. uBPF calls the slot's function directly with r1..r5.
static void register_helpers(struct ubpf_vm *vm, unsigned char *code, size_t size) {
  size_t count = sizeof helpers / sizeof helpers[0];
  for (size_t pc = 0; pc < size / 8; pc++) {
    unsigned char *slot = code + 8 * pc;
    if (slot[0] != 0x85 || (slot[1] >> 4) != 0) {
      continue;
    }
    size_t i = 0;
    while (i < count && helpers[i].number != get32(slot + 4)) {
      i++;
    }
    if (i == count) {
      fail("the program calls a helper the runner does not have", NULL);
    }
    put32(slot + 4, (uint32_t)i);
  }
  for (size_t i = 0; i < count; i++) {
    if (ubpf_register(vm, (unsigned)i, helpers[i].name,
                      as_external_function_t((void *)helpers[i].fn)) != 0) {
      fail("ubpf_register failed", helpers[i].name);
    }
  }
}
#endif

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int by_value(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 6) {
    fprintf(stderr, "usage: %s CODE MEMORY RUNS [RODATA RODATA_BASE]\n", argv[0]);
    return 2;
  }
  size_t code_size, memory_size, rodata_size = 0;
  unsigned char *code = slurp(argv[1], &code_size);
  unsigned char *image = slurp(argv[2], &memory_size);
  long runs = strtol(argv[3], NULL, 10);
  if (runs < 1) {
    fail("RUNS must be at least 1", argv[3]);
  }
  unsigned char *rodata = NULL;
  if (argc == 6) {
    rodata = slurp(argv[4], &rodata_size);
    relocate_rodata(code, code_size, strtoull(argv[5], NULL, 0), rodata, rodata_size);
  }

  struct ubpf_vm *vm = ubpf_create();
  if (vm == NULL) {
    fail("ubpf_create failed", NULL);
  }
#ifdef UBPF_RUNNER_HELPERS
  register_helpers(vm, code, code_size);
#endif
  char *error = NULL;
  if (ubpf_load(vm, code, (uint32_t)code_size, &error) != 0) {
    fail("ubpf_load", error);
  }
  ubpf_jit_fn program = ubpf_compile(vm, &error);
  if (program == NULL) {
    fail("ubpf_compile", error);
  }

  unsigned char *memory = malloc(memory_size + 1);
  uint64_t *times = calloc((size_t)runs, sizeof(uint64_t));
  if (memory == NULL || times == NULL) {
    fail("out of memory", NULL);
  }
  uint64_t r0 = 0;
  for (long i = 0; i < runs; i++) {
    memcpy(memory, image, memory_size);
    uint64_t start = now_ns();
    uint64_t result = program(memory, memory_size);
    times[i] = now_ns() - start;
    if (i > 0 && result != r0) {
      fail("r0 differs between runs", NULL);
    }
    r0 = result;
  }
  qsort(times, (size_t)runs, sizeof(uint64_t), by_value);
  printf("r0=0x%" PRIx64 " best_ns=%" PRIu64 " median_ns=%" PRIu64 " runs=%ld\n", r0, times[0],
         times[runs / 2], runs);

  ubpf_destroy(vm);
  free(times);
  free(memory);
  free(rodata);
  free(image);
  free(code);
  return 0;
}
