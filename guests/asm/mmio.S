// mmio: n=COUNT MMIO write/read pairs on the slow-stage scratch memory at 0xd0000000 (a 4 KiB window
// of 8-byte cells): each read must return what was just written (reads wait behind posted writes).
#include "rt.inc"

.set MMIO_BASE, 0xd0000000

user_main:
    call    boot_done
    lea     rdi, [rip + key_n]
    mov     esi, 1000
    call    arg_u64
    mov     r12, rax
    mov     r14, MMIO_BASE
    xor     ebx, ebx
1:  cmp     rbx, r12
    jae     2f
    mov     rcx, rbx
    and     ecx, 511
    mov     rax, rbx
    imul    rax, rax, 0x3E3779B1        // a different pattern per iteration
    mov     [r14 + rcx * 8], rax
    mov     rdx, [r14 + rcx * 8]
    cmp     rdx, rax
    jne     bad
    inc     rbx
    jmp     1b
2:  // widths: byte, word, dword reads of a known quadword
    mov     rax, 0x1122334455667788
    mov     [r14 + 8], rax
    movzx   eax, byte ptr [r14 + 8]
    cmp     eax, 0x88
    jne     bad
    movzx   eax, word ptr [r14 + 10]
    cmp     eax, 0x5566
    jne     bad
    mov     eax, [r14 + 12]
    cmp     eax, 0x11223344
    jne     bad
    lea     rsi, [rip + ok1]
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
ok1: .asciz "mmio write/read pairs: "
ok2: .asciz " echoed\n"
msg: .asciz "an MMIO read did not return what was written"
