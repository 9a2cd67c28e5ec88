// bench/bench_maps.py: LPM routing. 64 routes (/8, /16 and /24 prefixes) are
// inserted, then n pseudo-random IPv4 addresses looked up; the sum of the next
// hops found (0 for no route).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct route_key {
  __u32 prefixlen;
  __u32 addr;  // network byte order, as the kernel's trie compares it
};

struct {
  __uint(type, BPF_MAP_TYPE_LPM_TRIE);
  __uint(max_entries, 256);
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __type(key, struct route_key);
  __type(value, __u32);
} routes SEC(".maps");

SEC("syscall")
__u64 lpm_route(__u64 n) {
  __u64 x = 12345, seen = 0;
  for (__u32 r = 0; r < 64; r++) {
    struct route_key route = {8 + 8 * (r % 3), (r * 0x9E3779B9u) & 0xffffff};
    __u32 hop = r + 1;
    bpf_map_update_elem(&routes, &route, &hop, BPF_ANY);
  }
  for (__u64 i = 0; i < n; i++) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    struct route_key key = {32, (__u32)(x >> 40)};
    __u32 *hop = bpf_map_lookup_elem(&routes, &key);
    if (hop)
      seen += *hop;
  }
  return seen;
}

char LICENSE[] SEC("license") = "GPL";
