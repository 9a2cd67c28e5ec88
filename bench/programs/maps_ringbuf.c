// bench/bench_maps.py: ring buffer output. n 16-byte records written with
// bpf_ringbuf_output; the number written.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
  __uint(type, BPF_MAP_TYPE_RINGBUF);
  __uint(max_entries, 1 << 24);
} events SEC(".maps");

SEC("syscall")
__u64 ringbuf_output(__u64 n) {
  __u64 written = 0;
  for (__u64 i = 0; i < n; i++) {
    __u64 record[2] = {i, i * i};
    if (bpf_ringbuf_output(&events, record, sizeof(record), 0) == 0)
      written++;
  }
  return written;
}

char LICENSE[] SEC("license") = "GPL";
