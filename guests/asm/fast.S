// fast: n=COUNT port writes and n port reads to the fast-stage scratch device (port 0x510), handled
// inline on the vCPU thread; checks the device's counters.
#include "rt.inc"

user_main:
    call    boot_done
    lea     rdi, [rip + key_n]
    mov     esi, 1000
    call    arg_u64
    mov     r12, rax
    xor     ebx, ebx
    mov     dx, 0x510
1:  cmp     rbx, r12
    jae     2f
    mov     eax, ebx
    out     dx, eax
    inc     rbx
    jmp     1b
2:  mov     dx, 0x514
    in      eax, dx
    cmp     rax, r12
    jne     bad
    // n reads of the read counter, in sequence
    mov     dx, 0x518
    in      eax, dx
    mov     r13d, eax
    xor     ebx, ebx
3:  cmp     rbx, r12
    jae     4f
    in      eax, dx
    inc     r13d
    cmp     eax, r13d
    jne     bad
    inc     rbx
    jmp     3b
4:  lea     rsi, [rip + ok1]
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
ok1: .asciz "fast-stage accesses: "
ok2: .asciz " writes and reads checked\n"
msg: .asciz "fast-stage scratch device counters are wrong"
