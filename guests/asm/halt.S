// halt: halts with interrupts off in ring 0 (nothing can ever wake it). With halt detection on,
// the monitor ends the VM with bhyve's halt status (2).
#define RING0_HOOK lea rsi, [rip + msg]; call puts; cli; hlt; jmp .
#include "rt.inc"

user_main:
    lea     rsi, [rip + nope]
    jmp     fail

msg: .asciz "halting with interrupts off\n"
nope: .asciz "came back from hlt"
