// smp: two vCPUs (run with -c 2). The BSP copies a real-mode trampoline to 0x70000 (free RAM in the
// loader's layout), starts the AP with INIT and two STARTUP IPIs through its local APIC's ICR, and
// waits for it. The AP goes real → protected → long mode on the BSP's page tables, loads the
// interrupt IDT, enables its local APIC, reports its APIC ID and halts. The BSP sends it a fixed IPI
// (vector 0x60); the AP's handler counts it, the AP reports and answers with vector 0x61; the BSP
// checks that each side took exactly one. The AP stays in ring 0 (halted with IF=1 between events),
// so its emulated instruction count stays small.
#define RING0_HOOK jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"

.set AP_TRAMP, 0x70000                  // STARTUP vector 0x70
.set VEC_TO_AP, 0x60
.set VEC_TO_BSP, 0x61
.set UART_LSR, 0x3fd

user_main:
    call    boot_done
    call    lapic_id
    test    eax, eax
    jnz     bsp_id_bad

    lea     rsi, [rip + ap_tramp]
    mov     edi, AP_TRAMP
    mov     ecx, ap_tramp_end - ap_tramp
    rep movsb

    mov     edi, 1
    mov     esi, 0x4500                 // INIT, assert
    call    lapic_ipi
    mov     edi, PM_HZ / 100            // 10 ms
    call    pm_wait
    mov     edi, 1
    mov     esi, 0x4600 | (AP_TRAMP >> 12)  // STARTUP
    call    lapic_ipi
    mov     edi, PM_HZ / 5000           // 200 us
    call    pm_wait
    mov     edi, 1
    mov     esi, 0x4600 | (AP_TRAMP >> 12)  // the second STARTUP (ignored once the AP runs)
    call    lapic_ipi

    lea     rdi, [rip + ap_ready]
    call    wait_flag
    test    eax, eax
    jz      ap_start_bad
    lea     rsi, [rip + msg_bsp_started]
    call    puts
    call    drain_uart

    mov     edi, 1
    mov     esi, 0x4000 | VEC_TO_AP     // fixed, physical, assert
    call    lapic_ipi
    lea     rdi, [rip + ap_answered]
    call    wait_flag
    test    eax, eax
    jz      ap_ipi_bad
    mov     r12d, 2000                  // the AP's answer: up to 2 s more
1:  mov     edi, VEC_TO_BSP
    call    irq_count
    test    rax, rax
    jnz     2f
    mov     edi, PM_HZ / 1000
    call    pm_wait
    dec     r12d
    jnz     1b
    jmp     bsp_ipi_bad
2:  mov     edi, VEC_TO_AP
    call    irq_count
    cmp     rax, 1
    jne     count_bad
    mov     edi, VEC_TO_BSP
    call    irq_count
    cmp     rax, 1
    jne     count_bad
    lea     rsi, [rip + msg_bsp_done]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit

bsp_id_bad:
    lea     rsi, [rip + msg_bsp_id_bad]
    jmp     fail
ap_start_bad:
    lea     rsi, [rip + msg_ap_start_bad]
    jmp     fail
ap_ipi_bad:
    lea     rsi, [rip + msg_ap_ipi_bad]
    jmp     fail
bsp_ipi_bad:
    lea     rsi, [rip + msg_bsp_ipi_bad]
    jmp     fail
count_bad:
    lea     rsi, [rip + msg_count_bad]
    jmp     fail

// wait_flag: rdi = address of a dword the AP sets. Returns eax = 1 if it was set within 2 s.
wait_flag:
    push    rbx
    push    r12
    mov     rbx, rdi
    mov     r12d, 2000
1:  cmp     dword ptr [rbx], 0
    jne     2f
    mov     edi, PM_HZ / 1000
    call    pm_wait
    dec     r12d
    jnz     1b
    xor     eax, eax
    jmp     3f
2:  mov     eax, 1
3:  pop     r12
    pop     rbx
    ret

// ---------------------------------------------------------------------------------------------
// The AP. The trampoline runs at AP_TRAMP (CS = 0x7000, IP = 0) in real mode: it only loads
// ap_gdt and jumps to ap_pm32 in the image (flat 32-bit code); from there the AP follows the BSP's
// path into long mode.

.code16
ap_tramp:
    cli
    lgdt    cs:[ap_gdtr - ap_tramp]
    mov     eax, cr0
    or      eax, 1                      // PE
    mov     cr0, eax
    .byte   0x66, 0xea                  // ljmpl 0x18:ap_pm32
    .long   ABS(ap_pm32)
    .word   0x18
    .balign 4
ap_gdtr:
    .word   ap_gdt_end - ap_gdt - 1
    .long   ABS(ap_gdt)
ap_tramp_end:

.code32
ap_pm32:
    mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     eax, cr4
    or      eax, 0x20                   // PAE
    mov     cr4, eax
    mov     eax, offset ABS(pml4)
    mov     cr3, eax
    mov     ecx, 0xC0000080             // EFER
    rdmsr
    or      eax, 0x100                  // LME
    wrmsr
    mov     eax, cr0
    or      eax, 0x80000001             // PG | PE
    mov     cr0, eax
    ljmp    0x08, offset ABS(ap_long)

.code64
ap_long:
    mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    lea     rsp, [rip + ap_stack_top]
    lidt    [rip + irq_idt_ptr]
    mov     eax, LAPIC_BASE + LAPIC_SVR
    mov     dword ptr [rax], 0x1FF
    lea     rsi, [rip + msg_ap_up]
    call    puts
    call    lapic_id
    call    putdec
    call    putnl
    call    drain_uart
    mov     dword ptr [rip + ap_ready], 1
1:  sti
    hlt
    cli
    mov     edi, VEC_TO_AP
    call    irq_count
    test    rax, rax
    jz      1b
    lea     rsi, [rip + msg_ap_ipi]
    call    puts
    call    drain_uart
    xor     edi, edi                    // to the BSP, APIC ID 0
    mov     esi, 0x4000 | VEC_TO_BSP
    call    lapic_ipi
    mov     dword ptr [rip + ap_answered], 1
2:  sti
    hlt
    jmp     2b

// drain_uart: a read from the UART waits behind every write this CPU posted before it, so this
// CPU's output is out before the other one (on another exit ring) prints.
drain_uart:
    mov     dx, UART_LSR
    in      al, dx
    ret

    .balign 8
ap_gdt:
    .quad   0                           // 0x00
    .quad   0x00209a0000000000          // 0x08 64-bit code (the IDT's selector, as rt.inc's GDT)
    .quad   0x00cf92000000ffff          // 0x10 data
    .quad   0x00cf9a000000ffff          // 0x18 32-bit code
ap_gdt_end:

    .balign 4
ap_ready:    .long 0
ap_answered: .long 0

msg_ap_up:        .asciz "smp: AP online in long mode, APIC ID "
msg_ap_ipi:       .asciz "smp: AP took the BSP's IPI (vector 0x60), answering\n"
msg_bsp_started:  .asciz "smp: BSP (APIC ID 0) started the AP with INIT/SIPI\n"
msg_bsp_done:     .asciz "smp: BSP took the AP's IPI (vector 0x61): IPIs exchanged both ways\n"
msg_bsp_id_bad:   .asciz "the BSP's APIC ID is not 0"
msg_ap_start_bad: .asciz "the AP did not come up within 2 s of INIT/SIPI"
msg_ap_ipi_bad:   .asciz "the AP did not take the BSP's IPI within 2 s"
msg_bsp_ipi_bad:  .asciz "the BSP did not take the AP's IPI within 2 s"
msg_count_bad:    .asciz "an IPI was taken more than once"

    .balign 16
ap_stack:
    .fill   4096, 1, 0
ap_stack_top:
