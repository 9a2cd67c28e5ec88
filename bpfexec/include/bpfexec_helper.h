/* Native helpers for bpfexec: eBPF helper functions written in C.
 *
 * A native helper is a function of a shared library that the operator of a
 * bpfexec server (or a local `bpfexec run`) loads with `--native-helpers
 * LIBRARY:SYMBOL=NUMBER`. The JIT calls it directly from native code, and the
 * interpreter through ctypes, with the same results. It is trusted code: it
 * runs in the server's process with the server's rights, and no client can
 * upload one.
 *
 *     #include <bpfexec_helper.h>
 *
 *     uint64_t sqrti(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4,
 *                    uint64_t r5, bpfexec_call *call);
 *
 * r1..r5 are the program's argument registers; the return value goes in r0.
 * `call` comes last, as uBPF's helper cookie does: a helper that needs no VM
 * memory may declare fewer parameters (`uint64_t sqrti(uint64_t x)`), so a
 * helper written for uBPF works unchanged (on x86-64 and arm64, where every
 * integer argument travels in a register).
 * A helper touches the program's memory only through the functions below,
 * by virtual address, bounds-checked exactly like the program's own accesses:
 * the program's addresses are never host addresses.
 *
 * Build: cc -O2 -shared -fPIC -I "$(python -c 'import bpfexec; print(bpfexec.include_dir())')" ...
 */
#ifndef BPFEXEC_HELPER_H
#define BPFEXEC_HELPER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BPFEXEC_HELPER_ABI 1

typedef struct bpfexec_call bpfexec_call;

/* What the VM offers a helper during one call (filled in by bpfexec). */
struct bpfexec_api {
  uint64_t abi; /* BPFEXEC_HELPER_ABI */
  int (*read)(bpfexec_call *call, uint64_t addr, void *dst, uint64_t size);
  int (*write)(bpfexec_call *call, uint64_t addr, const void *src, uint64_t size);
  int (*log)(bpfexec_call *call, const char *text, uint64_t size);
  void (*trap)(bpfexec_call *call, const char *message);
};

/* The first argument of every call; valid only during that call. */
struct bpfexec_call {
  const struct bpfexec_api *api;
  /* bpfexec's own state follows: never read or write it. */
};

typedef uint64_t bpfexec_helper_fn(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4,
                                   uint64_t r5, bpfexec_call *call);

/* Copy `size` bytes of the program's memory at virtual address `addr` to `dst`.
 * 0 on success. -1 if any byte is outside the program's readable memory: then
 * nothing is copied, and the run ends with that MEMORY_FAULT trap when the
 * helper returns (whatever it returns), as an in-process Python helper's
 * failed `ctx.read` does when it lets the fault propagate. */
static inline int bpfexec_read(bpfexec_call *call, uint64_t addr, void *dst, uint64_t size) {
  return call->api->read(call, addr, dst, size);
}

/* Copy `size` bytes from `src` into the program's writable memory at `addr`.
 * 0, or -1 and a MEMORY_FAULT trap as for bpfexec_read (nothing is written). */
static inline int bpfexec_write(bpfexec_call *call, uint64_t addr, const void *src,
                                uint64_t size) {
  return call->api->write(call, addr, src, size);
}

/* Append a line (UTF-8, `size` bytes, no NUL needed) to the execution's log,
 * within the server's log limits. 0, or -1 if the line was dropped at a limit. */
static inline int bpfexec_log(bpfexec_call *call, const char *text, uint64_t size) {
  return call->api->log(call, text, size);
}

/* End the run with a HELPER_ERROR trap, "helper NAME failed: MESSAGE", when the
 * helper returns (its return value is then ignored). The first trap of a call
 * is the one reported. */
static inline void bpfexec_trap(bpfexec_call *call, const char *message) {
  call->api->trap(call, message);
}

#ifdef __cplusplus
}
#endif

#endif /* BPFEXEC_HELPER_H */
