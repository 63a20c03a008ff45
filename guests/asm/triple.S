// triple: loads an empty IDT in ring 0 and raises #UD: no handler, no double-fault handler, so the
// CPU shuts down (a triple fault). The monitor must end with bhyve's status 3.
#define RING0_HOOK lidt [rip + null_idt]; ud2
#include "rt.inc"

null_idt:
    .word   0
    .quad   0

user_main:
    lea     rsi, [rip + msg]
    jmp     fail
msg: .asciz "the triple fault did not happen"
