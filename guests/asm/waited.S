// waited: n=COUNT waited port reads of the slow-stage scratch device's read counter (port 0x508):
// each read must return the previous value plus one (no read lost, repeated or reordered).
#include "rt.inc"

user_main:
    call    boot_done
    lea     rdi, [rip + key_n]
    mov     esi, 1000
    call    arg_u64
    mov     r12, rax
    mov     dx, 0x508
    in      eax, dx                     // the first value is the base
    mov     r13d, eax
    xor     ebx, ebx
1:  cmp     rbx, r12
    jae     2f
    in      eax, dx
    inc     r13d
    cmp     eax, r13d
    jne     bad
    inc     rbx
    jmp     1b
2:  lea     rsi, [rip + ok1]
    call    puts
    mov     rax, r12
    call    putdec
    lea     rsi, [rip + ok2]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit
bad:
    lea     rsi, [rip + msg]
    jmp     fail

key_n: .asciz "n="
ok1: .asciz "waited reads: "
ok2: .asciz " answered in sequence\n"
msg: .asciz "a waited read returned an out-of-sequence value"
