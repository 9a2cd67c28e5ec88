r0 = 0
exit
main:
exit
