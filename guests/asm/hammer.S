// hammer: reads and writes unclaimed ports (0x9000..0x9fff) and unclaimed MMIO (0xe0000000 +
// 0..1 MiB) in a loop: n=COUNT rounds (0 = forever). Unclaimed reads must return all-ones.
#include "rt.inc"

user_main:
    call    boot_done
    lea     rsi, [rip + hello]
    call    puts
    lea     rdi, [rip + key_n]
    xor     esi, esi
    call    arg_u64
    mov     r12, rax
    xor     r13, r13                    // rounds done
    mov     r14, 0xe0000000
1:  test    r12, r12
    jz      2f
    cmp     r13, r12
    jae     9f
2:  mov     rax, r13
    and     eax, 0xfff
    lea     edx, [rax + 0x9000]
    out     dx, al
    in      al, dx
    cmp     al, 0xff
    jne     bad
    in      eax, dx
    cmp     eax, 0xffffffff
    jne     bad
    mov     rcx, r13
    and     ecx, 0x1ffff
    mov     [r14 + rcx * 8], r13
    mov     rax, [r14 + rcx * 8]
    cmp     rax, -1
    jne     bad
    inc     r13
    jmp     1b
9:  lea     rsi, [rip + ok]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit
bad:
    lea     rsi, [rip + msg]
    jmp     fail

key_n: .asciz "n="
hello: .asciz "hammering unclaimed ports and MMIO\n"
ok: .asciz "hammer done\n"
msg: .asciz "an unclaimed read did not return all-ones"
