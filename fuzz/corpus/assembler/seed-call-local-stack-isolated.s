r1 = 7
    *(u64 *)(r10 - 8) = r1
    r6 = r10
    call scribble
    r0 = *(u64 *)(r10 - 8)
    r6 -= r10
    r0 += r6  # + 0 when r10 is restored
    exit
scribble:
    r1 = 99
    *(u64 *)(r10 - 8) = r1
    r0 = 0
    exit
