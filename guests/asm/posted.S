// posted: n=COUNT posted port writes to the slow-stage scratch device (port 0x500), then one waited
// read of its write counter (0x504): every posted write must have arrived, in order.
#include "rt.inc"

user_main:
    call    boot_done
    lea     rdi, [rip + key_n]
    mov     esi, 1000
    call    arg_u64
    mov     r12, rax                    // n
    xor     ebx, ebx
    mov     dx, 0x500
1:  cmp     rbx, r12
    jae     2f
    mov     eax, ebx
    out     dx, eax
    inc     rbx
    jmp     1b
2:  mov     dx, 0x504                   // writes seen by the device
    in      eax, dx
    cmp     rax, r12
    jne     bad_count
    mov     dx, 0x500                   // last value written
    in      eax, dx
    lea     rcx, [r12 - 1]
    test    r12, r12
    jz      3f
    cmp     eax, ecx
    jne     bad_last
3:  lea     rsi, [rip + ok1]
    call    puts
    mov     rax, r12
    call    putdec
    lea     rsi, [rip + ok2]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit
bad_count:
    lea     rsi, [rip + msg_count]
    jmp     fail
bad_last:
    lea     rsi, [rip + msg_last]
    jmp     fail

key_n: .asciz "n="
ok1: .asciz "posted writes: "
ok2: .asciz " arrived in order\n"
msg_count: .asciz "device counted a different number of writes"
msg_last: .asciz "last value written is not the last value seen"
