// hello: prints a greeting over COM1, signals boot done, and exits through the debug-exit port.
#include "rt.inc"

user_main:
    call    boot_done
    lea     rsi, [rip + msg]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit

msg: .asciz "Hello from a bhyve-rs test guest (ring 3, long mode)\n"
