r0 = 0
    r1 = 0x5 ll
    r2 = 0x5 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x1
    r1 = 0x4 ll
    r2 = 0x5 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x2
    r1 = 0x5 ll
    r2 = 0x4 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x4
    r1 = 0xffffffffffffffff ll
    r2 = 0x1 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x8
    r1 = 0x1 ll
    r2 = 0xffffffffffffffff ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x10
    r1 = 0x8000000000000000 ll
    r2 = 0x7fffffffffffffff ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x20
    r1 = 0x100000005 ll
    r2 = 0x200000005 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x40
    r1 = 0x180000000 ll
    r2 = 0x7fffffff ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x80
    r1 = 0xa ll
    r2 = 0x4 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x100
    r1 = 0xa ll
    r2 = 0x2 ll
    if r1 & r2 goto +1
    goto +1
    r0 |= 0x200
    exit
