r1 = 5
    call fact
    exit
fact:
    r0 = 1
    if r1 == 0 goto +5
    r6 = r1
    r1 += -1
    call fact
    r0 *= r6
    exit
    exit
