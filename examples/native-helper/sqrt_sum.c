// The eBPF side: calls helper 200 (sqrti) kernel-style, through a function pointer.
//
//     clang -O2 -target bpf -c sqrt_sum.c -o sqrt_sum.o
typedef unsigned long long uint64_t;  // no libc headers: nothing but -target bpf needed
typedef unsigned char uint8_t;

static uint64_t (*sqrti)(uint64_t x) = (void *)200;
static uint64_t (*buffer_sum)(const void *data, uint64_t size) = (void *)201;

uint64_t sqrt_sum(uint64_t n) {
  uint64_t sum = 0;
  for (uint64_t i = 0; i < n; i++) {
    sum += sqrti(i * 7919);
  }
  return sum;
}

uint64_t checksum(const uint8_t *data, uint64_t size) {
  return buffer_sum(data, size);
}
