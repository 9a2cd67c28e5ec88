goto +1
r0 += -5
exit
exit
