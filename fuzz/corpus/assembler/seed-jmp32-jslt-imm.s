r0 = 0
    r1 = 0x5 ll
    if w1 s< 5 goto +1
    goto +1
    r0 |= 0x1
    r1 = 0x4 ll
    if w1 s< 5 goto +1
    goto +1
    r0 |= 0x2
    r1 = 0x5 ll
    if w1 s< 4 goto +1
    goto +1
    r0 |= 0x4
    r1 = 0xffffffffffffffff ll
    if w1 s< -1 goto +1
    goto +1
    r0 |= 0x8
    r1 = 0xffffffff ll
    if w1 s< -1 goto +1
    goto +1
    r0 |= 0x10
    r1 = 0x1 ll
    if w1 s< -1 goto +1
    goto +1
    r0 |= 0x20
    r1 = 0xfffffffffffffffe ll
    if w1 s< -1 goto +1
    goto +1
    r0 |= 0x40
    r1 = 0x100000000 ll
    if w1 s< 0 goto +1
    goto +1
    r0 |= 0x80
    r1 = 0x80000000 ll
    if w1 s< 2147483647 goto +1
    goto +1
    r0 |= 0x100
    r1 = 0xa ll
    if w1 s< 2 goto +1
    goto +1
    r0 |= 0x200
    exit
