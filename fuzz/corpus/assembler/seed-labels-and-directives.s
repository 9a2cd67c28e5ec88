.text
.globl foo
.type foo,@function
foo:
    r0 = 0
    if r1 > 3 goto big
    call helper_by_name
    call 7
    goto done
big:
    call bar
done:
    exit
bar:
    r0 = *(u32 *)(r1 + 4)
    lock *(u64 *)(r10 - 8) += r2
    r3 = atomic_fetch_xor((u64 *)(r10 - 8), r3)
    r0 = cmpxchg_64(r10 - 8, r0, r4)
    r5 = (s16)r5
    r6 s/= 3
    w7 = bswap32 w7
    gotol +0
    exit
