r1 = 0xf0f0f0f800000ff ll
    *(u64 *)(r10 - 8) = r1
    r2 = 0xf0f01234ffffff01 ll
    r0 = 0xf0f0f0f80000100 ll
    r0 = cmpxchg_64(r10 - 8, r0, r2)
    r3 = *(u64 *)(r10 - 8)
    r4 = 0xf0f0f0f800000ff ll
    if r3 == r4 goto +1
    r0 = -1  # memory is wrong
    exit
