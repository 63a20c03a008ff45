// probe_pvh: reports what a PVH loader handed over in hvm_start_info (boot with boot.protocol=pvh):
// magic, version, command line, modules (with their first bytes), memory map, RSDP.
#include "rt.inc"

#define FIELD(label) lea rsi, [rip + label]; call puts

user_main:
    mov     r15d, [rip + mb_info]       // ebx at entry: hvm_start_info
    FIELD(s_magic)
    mov     eax, [r15]
    call    puthex
    FIELD(s_version)
    mov     eax, [r15 + 4]
    call    putdec
    call    putnl
    FIELD(s_cmdline)
    mov     rsi, [r15 + 24]
    call    puts
    call    putnl
    FIELD(s_rsdp)
    mov     rax, [r15 + 32]
    call    puthex
    call    putnl
    FIELD(s_mods)
    mov     eax, [r15 + 12]
    mov     r12d, eax
    call    putdec
    call    putnl
    mov     r13, [r15 + 16]
1:  test    r12d, r12d
    jz      2f
    FIELD(s_mod)
    mov     rax, [r13]
    call    puthex
    FIELD(s_size)
    mov     rax, [r13 + 8]
    call    puthex
    FIELD(s_first)
    mov     rax, [r13]
    mov     rax, [rax]
    call    puthex
    call    putnl
    add     r13, 32
    dec     r12d
    jmp     1b
2:  mov     r13, [r15 + 40]             // memmap_paddr
    mov     r12d, [r15 + 48]            // memmap_entries
3:  test    r12d, r12d
    jz      4f
    FIELD(s_mmap)
    mov     rax, [r13]
    call    puthex
    FIELD(s_len)
    mov     rax, [r13 + 8]
    call    puthex
    FIELD(s_type)
    mov     eax, [r13 + 16]
    call    putdec
    call    putnl
    add     r13, 24
    dec     r12d
    jmp     3b
4:  mov     edi, EXIT_OK
    jmp     guest_exit

s_magic:   .asciz "PVH magic="
s_version: .asciz " version="
s_cmdline: .asciz "PVH cmdline="
s_rsdp:    .asciz "PVH rsdp="
s_mods:    .asciz "PVH mods="
s_mod:     .asciz "PVH mod paddr="
s_size:    .asciz " size="
s_first:   .asciz " first="
s_mmap:    .asciz "PVH mmap addr="
s_len:     .asciz " len="
s_type:    .asciz " type="
