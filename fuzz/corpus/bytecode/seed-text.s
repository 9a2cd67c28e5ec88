r0 = r1
r0 += 1
exit
