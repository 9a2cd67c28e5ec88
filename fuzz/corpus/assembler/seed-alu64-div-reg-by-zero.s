r0 = 0x1234 ll
    r1 = 0x0 ll
    r0 /= r1
    exit
