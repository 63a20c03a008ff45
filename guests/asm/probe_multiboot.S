// probe_multiboot: reports what a Multiboot v1 loader handed over (boot with boot.protocol=multiboot):
// magic, flags, memory sizes, command line, modules (with their first bytes), memory map, loader.
#include "rt.inc"

#define FIELD(label) lea rsi, [rip + label]; call puts

user_main:
    mov     r15d, [rip + mb_info]
    FIELD(s_magic)
    mov     eax, [rip + mb_magic]
    call    puthex
    FIELD(s_flags)
    mov     eax, [r15]
    call    puthex
    call    putnl
    FIELD(s_mem)
    mov     eax, [r15 + 4]
    call    putdec
    FIELD(s_upper)
    mov     eax, [r15 + 8]
    call    putdec
    call    putnl
    FIELD(s_cmdline)
    mov     esi, [r15 + 16]
    call    puts
    call    putnl
    // modules
    FIELD(s_mods)
    mov     eax, [r15 + 20]
    mov     r12d, eax
    call    putdec
    call    putnl
    mov     r13d, [r15 + 24]
1:  test    r12d, r12d
    jz      2f
    FIELD(s_mod)
    mov     eax, [r13]
    call    puthex
    FIELD(s_end)
    mov     eax, [r13 + 4]
    call    puthex
    FIELD(s_first)
    mov     eax, [r13]
    mov     rax, [rax]
    call    puthex
    FIELD(s_string)
    mov     esi, [r13 + 8]
    call    puts
    call    putnl
    add     r13, 16
    dec     r12d
    jmp     1b
2:  // memory map: entries of (size, base, len, type); next = cur + size + 4
    mov     r12d, [r15 + 48]            // mmap_addr
    mov     r13d, [r15 + 44]            // mmap_length
    add     r13, r12
3:  cmp     r12, r13
    jae     4f
    FIELD(s_mmap)
    mov     rax, [r12 + 4]
    call    puthex
    FIELD(s_len)
    mov     rax, [r12 + 12]
    call    puthex
    FIELD(s_type)
    mov     eax, [r12 + 20]
    call    putdec
    call    putnl
    mov     eax, [r12]
    lea     r12, [r12 + rax + 4]
    jmp     3b
4:  FIELD(s_loader)
    mov     esi, [r15 + 64]
    call    puts
    call    putnl
    mov     edi, EXIT_OK
    jmp     guest_exit

s_magic:  .asciz "MB magic="
s_flags:  .asciz " flags="
s_mem:    .asciz "MB mem_lower="
s_upper:  .asciz " mem_upper="
s_cmdline: .asciz "MB cmdline="
s_mods:   .asciz "MB mods="
s_mod:    .asciz "MB mod start="
s_end:    .asciz " end="
s_first:  .asciz " first="
s_string: .asciz " string="
s_mmap:   .asciz "MB mmap base="
s_len:    .asciz " len="
s_type:   .asciz " type="
s_loader: .asciz "MB loader="
