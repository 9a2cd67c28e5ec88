// Compute kernels for bench/bench_engines.py: the same source is compiled to eBPF
// (clang -target bpf) and natively (cc -O2), and both are timed on the same inputs.
// Plain C only: no headers, no libc, so both targets build it unchanged.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;

// 1 + 2 + ... + n. The empty asm hides the running total from the optimizer, which
// would otherwise replace the loop by a closed form on both targets.
u64 sum(u64 n) {
  u64 total = 0;
  for (u64 i = 1; i <= n; i++) {
    __asm__ volatile("" : "+r"(total));
    total += i;
  }
  return total;
}

u64 fib_iter(u64 n) {
  u64 a = 0, b = 1;
  for (u64 i = 0; i < n; i++) {
    u64 t = a + b;
    __asm__ volatile("" : "+r"(t));
    a = b;
    b = t;
  }
  return a;
}

__attribute__((noinline)) u64 fib_rec(u64 n) {
  if (n < 2) {
    return n;
  }
  return fib_rec(n - 1) + fib_rec(n - 2);
}

u64 byte_sum(const u8 *p, u64 n) {
  u64 total = 0;
  for (u64 i = 0; i < n; i++) {
    total += p[i];
  }
  return total;
}

// FNV-1a over a buffer, repeated `rounds` times (a loop-carried multiply chain).
u64 fnv1a(const u8 *p, u64 n, u64 rounds) {
  u64 h = 0xcbf29ce484222325ULL;
  for (u64 r = 0; r < rounds; r++) {
    for (u64 i = 0; i < n; i++) {
      h ^= p[i];
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

// Bitwise CRC-32 (branchy inner loop, 32-bit arithmetic).
u64 crc32(const u8 *p, u64 n) {
  u32 crc = 0xffffffffu;
  for (u64 i = 0; i < n; i++) {
    crc ^= p[i];
    for (int k = 0; k < 8; k++) {
      crc = (crc >> 1) ^ (0xedb88320u & -(crc & 1));
    }
  }
  return ~crc;
}

// Insertion sort of the buffer's bytes, in place (loads and stores in a loop).
u64 sort_bytes(u8 *p, u64 n) {
  for (u64 i = 1; i < n; i++) {
    u8 key = p[i];
    u64 j = i;
    while (j > 0 && p[j - 1] > key) {
      p[j] = p[j - 1];
      j--;
    }
    p[j] = key;
  }
  return p[0];
}

// Sieve of Eratosthenes over the buffer (stores in a strided inner loop); returns
// how many numbers below n are prime.
u64 sieve(u8 *p, u64 n) {
  for (u64 i = 0; i < n; i++) {
    p[i] = 0;
  }
  u64 count = 0;
  for (u64 i = 2; i < n; i++) {
    if (p[i]) {
      continue;
    }
    count++;
    for (u64 j = i * i; j < n; j += i) {
      p[j] = 1;
    }
  }
  return count;
}

// Total Collatz steps of 1..n (a data-dependent branch in a loop of unknown length).
u64 collatz(u64 n) {
  u64 steps = 0;
  for (u64 i = 1; i <= n; i++) {
    u64 x = i;
    while (x != 1) {
      x = (x & 1) ? 3 * x + 1 : x / 2;
      steps++;
    }
  }
  return steps;
}

// The sum of the entries of A * A for the n x n matrix A of 32-bit words in the buffer
// (two loads a step, one of them strided).
u64 matmul(const u32 *a, u64 n) {
  u64 total = 0;
  for (u64 i = 0; i < n; i++) {
    for (u64 j = 0; j < n; j++) {
      u32 dot = 0;
      for (u64 k = 0; k < n; k++) {
        dot += a[i * n + k] * a[k * n + j];
      }
      total += dot;
    }
  }
  return total;
}

// A histogram of the buffer's low nibbles in a stack array (loads and stores at
// computed offsets from the frame pointer), folded into one number.
u64 histogram(const u8 *p, u64 n) {
  u32 counts[16];
  for (int b = 0; b < 16; b++) {
    counts[b] = 0;
  }
  for (u64 i = 0; i < n; i++) {
    counts[p[i] & 15]++;
  }
  u64 h = 0;
  for (int b = 0; b < 16; b++) {
    h = h * 31 + counts[b];
  }
  return h;
}

// Follows a linked list through the buffer, `steps` times: every load is through a
// pointer the previous load produced (a cycle of n 16-byte nodes, built first).
u64 list_walk(u64 *nodes, u64 n, u64 steps) {
  for (u64 i = 0; i < n; i++) {
    nodes[2 * i] = (u64)&nodes[2 * ((i * 7 + 1) % n)];
    nodes[2 * i + 1] = i;
  }
  u64 total = 0;
  u64 *p = nodes;
  for (u64 s = 0; s < steps; s++) {
    total += p[1];
    p = (u64 *)p[0];
  }
  return total;
}
