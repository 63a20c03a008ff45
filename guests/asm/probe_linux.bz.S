// probe_linux: a bzImage-shaped test kernel (boot protocol 2.15, 64-bit entry) that reports the
// boot_params fields a Linux kernel reads: version, loader type, load flags, command line, initramfs
// address and size (and its first bytes), ACPI RSDP, and the e820 map. Runs in ring 0: it is short.
//
// Built as a flat binary: setup sectors (boot sector + 1) with the setup header, then the
// protected-mode kernel, loaded at 1 MiB; the 64-bit entry is at +0x200 with rsi = boot_params.

.intel_syntax noprefix
.section .text, "ax"

.set COM1, 0x3f8
.set DEBUG_EXIT, 0xf4
.set EXIT_OK, 0
.set EXIT_FAIL, 0x7f
.set SETUP_SECTS, 1

image:
    .fill   0x1f1, 1, 0
    .byte   SETUP_SECTS                 // 0x1f1 setup_sects
    .word   0                           // 0x1f2 root_flags
    .long   (pm_end - pm_start + 15) / 16   // 0x1f4 syssize
    .word   0                           // 0x1f8 ram_size
    .word   0xffff                      // 0x1fa vid_mode
    .word   0                           // 0x1fc root_dev
    .word   0xaa55                      // 0x1fe boot_flag
    .byte   0xeb, 0x66                  // 0x200 jump
    .ascii  "HdrS"                      // 0x202 header
    .word   0x020f                      // 0x206 version 2.15
    .long   0                           // 0x208 realmode_swtch
    .word   0x1000                      // 0x20c start_sys_seg
    .word   0                           // 0x20e kernel_version
    .byte   0                           // 0x210 type_of_loader
    .byte   0x01                        // 0x211 loadflags: LOADED_HIGH
    .word   0                           // 0x212 setup_move_size
    .long   0x100000                    // 0x214 code32_start
    .long   0                           // 0x218 ramdisk_image
    .long   0                           // 0x21c ramdisk_size
    .long   0                           // 0x220 bootsect_kludge
    .word   0                           // 0x224 heap_end_ptr
    .byte   0                           // 0x226 ext_loader_ver
    .byte   0                           // 0x227 ext_loader_type
    .long   0                           // 0x228 cmd_line_ptr
    .long   0x7fffffff                  // 0x22c initrd_addr_max
    .long   0x200000                    // 0x230 kernel_alignment
    .byte   0                           // 0x234 relocatable_kernel
    .byte   0                           // 0x235 min_alignment
    .word   0x0001                      // 0x236 xloadflags: XLF_KERNEL_64
    .long   2048                        // 0x238 cmdline_size
    .long   0                           // 0x23c hardware_subarch
    .quad   0                           // 0x240 hardware_subarch_data
    .long   0                           // 0x248 payload_offset
    .long   0                           // 0x24c payload_length
    .quad   0                           // 0x250 setup_data
    .quad   0x100000                    // 0x258 pref_address
    .long   0x100000                    // 0x260 init_size
    .long   0                           // 0x264 handover_offset
    .long   0                           // 0x268 kernel_info_offset
    .fill   (SETUP_SECTS + 1) * 512 - (. - image), 1, 0

// The protected-mode kernel: loaded at 1 MiB.
pm_start:
    .code32
    hlt                                 // 32-bit entry: unused (we only offer the 64-bit one)
    .fill   0x200 - (. - pm_start), 1, 0x90
    .code64
entry64:                                // pm_start + 0x200
    mov     r15, rsi                    // boot_params
    lea     rsp, [rip + stack_top]
    lea     rsi, [rip + s_hello]
    call    puts
    mov     rax, r15
    call    puthex
    lea     rsi, [rip + s_version]
    call    puts
    movzx   eax, word ptr [r15 + 0x206]
    call    puthex
    lea     rsi, [rip + s_loader]
    call    puts
    movzx   eax, byte ptr [r15 + 0x210]
    call    puthex
    lea     rsi, [rip + s_loadflags]
    call    puts
    movzx   eax, byte ptr [r15 + 0x211]
    call    puthex
    call    putnl
    lea     rsi, [rip + s_cmdline]
    call    puts
    mov     esi, [r15 + 0x228]
    call    puts
    call    putnl
    lea     rsi, [rip + s_ramdisk]
    call    puts
    mov     eax, [r15 + 0x218]
    call    puthex
    lea     rsi, [rip + s_size]
    call    puts
    mov     eax, [r15 + 0x21c]
    call    puthex
    lea     rsi, [rip + s_first]
    call    puts
    xor     eax, eax
    mov     ecx, [r15 + 0x218]
    test    ecx, ecx
    jz      1f
    mov     rax, [rcx]
1:  call    puthex
    call    putnl
    lea     rsi, [rip + s_rsdp]
    call    puts
    mov     rax, [r15 + 0x70]
    call    puthex
    call    putnl
    lea     rsi, [rip + s_e820n]
    call    puts
    movzx   eax, byte ptr [r15 + 0x1e8]
    mov     r12d, eax
    call    putdec
    call    putnl
    lea     r13, [r15 + 0x2d0]
2:  test    r12d, r12d
    jz      3f
    lea     rsi, [rip + s_e820]
    call    puts
    mov     rax, [r13]
    call    puthex
    lea     rsi, [rip + s_len]
    call    puts
    mov     rax, [r13 + 8]
    call    puthex
    lea     rsi, [rip + s_type]
    call    puts
    mov     eax, [r13 + 16]
    call    putdec
    call    putnl
    add     r13, 20
    dec     r12d
    jmp     2b
3:  lea     rsi, [rip + s_entry]
    call    puts
    lea     rax, [rip + entry64]
    call    puthex
    call    putnl
    mov     edi, EXIT_OK
    jmp     guest_exit

#include "lib.inc"

s_hello:    .asciz "LINUX boot_params="
s_version:  .asciz " version="
s_loader:   .asciz " type_of_loader="
s_loadflags: .asciz " loadflags="
s_cmdline:  .asciz "LINUX cmdline="
s_ramdisk:  .asciz "LINUX ramdisk_image="
s_size:     .asciz " ramdisk_size="
s_first:    .asciz " first="
s_rsdp:     .asciz "LINUX acpi_rsdp_addr="
s_e820n:    .asciz "LINUX e820_entries="
s_e820:     .asciz "LINUX e820 addr="
s_len:      .asciz " len="
s_type:     .asciz " type="
s_entry:    .asciz "LINUX entry64="

    .balign 16
stack:
    .fill   4096, 1, 0
stack_top:
pm_end:
