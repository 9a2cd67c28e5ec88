// bench/bench_maps.py: hash counting. n pseudo-random keys out of 10,000
// distinct ones, each looked up in a hash map and its count incremented, or
// inserted with a count of 1 the first time; the sum of the counts seen.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, 16384);
  __type(key, __u32);
  __type(value, __u64);
} counts SEC(".maps");

SEC("syscall")
__u64 hash_count(__u64 n) {
  __u64 x = 12345, seen = 0, one = 1;
  for (__u64 i = 0; i < n; i++) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    __u32 key = (x >> 33) % 10000;
    __u64 *count = bpf_map_lookup_elem(&counts, &key);
    if (count) {
      *count += 1;
      seen += *count;
    } else {
      bpf_map_update_elem(&counts, &key, &one, BPF_ANY);
      seen += 1;
    }
  }
  return seen;
}

char LICENSE[] SEC("license") = "GPL";
