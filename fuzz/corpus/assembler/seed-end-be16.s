r0 = 0x1122334455667788 ll
    r0 = be16 r0
    exit
