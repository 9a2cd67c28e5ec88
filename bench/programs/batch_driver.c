// Native C baselines for bench/bench_batch.py: the batch's functions over packed
// inputs, in a loop in C. The functions come from their own translation units
// (tests/fixtures/c/example.c, bench/programs/compute.c), built without LTO, so
// each input is a real call, as each input of a batch is.

typedef unsigned long long u64;

u64 example(u64 a, u64 b);
u64 collatz(u64 n);

// Five words an input (r1..r5), one result an input: as run_packed lays them out.
void run_example(const u64 *inputs, u64 *results, long count) {
  for (long i = 0; i < count; i++) {
    results[i] = example(inputs[5 * i], inputs[5 * i + 1]);
  }
}

void run_collatz(const u64 *inputs, u64 *results, long count) {
  for (long i = 0; i < count; i++) {
    results[i] = collatz(inputs[5 * i]);
  }
}
