// bench/bench_maps.py: an array histogram. n pseudo-random keys (an LCG's top
// byte), each looked up in a 256-element array and its count incremented; the
// sum of the counts seen, so that every engine's work is checked.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, 256);
  __type(key, __u32);
  __type(value, __u64);
} hist SEC(".maps");

SEC("syscall")
__u64 array_histogram(__u64 n) {
  __u64 x = 12345, seen = 0;
  for (__u64 i = 0; i < n; i++) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    __u32 key = x >> 56;
    __u64 *count = bpf_map_lookup_elem(&hist, &key);
    if (count) {
      *count += 1;
      seen += *count;
    }
  }
  return seen;
}

char LICENSE[] SEC("license") = "GPL";
