// dev_pit: the 8254 PIT's channel 0 in mode 2 at ~100 Hz (count 11932), routed ISA IRQ 0 → I/O APIC
// input 2 → vector 0x30. Counts the interrupts taken over one second of the ACPI PM timer and
// requires 95–105; then masks the pin and requires that nothing arrives for 100 ms.
#define RING0_HOOK jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"

.set VEC, 0x30
.set PIT_COUNT, 11932

user_main:
    call    boot_done
    mov     edi, 2                      // ISA IRQ 0 is GSI 2 (the MADT's override)
    mov     esi, VEC                    // edge, active high, fixed, physical
    xor     edx, edx                    // destination APIC ID 0
    call    ioapic_rte
    mov     al, 0x34                    // channel 0, LSB then MSB, mode 2, binary
    out     0x43, al
    mov     al, PIT_COUNT & 0xff
    out     0x40, al
    mov     al, PIT_COUNT >> 8
    out     0x40, al

    mov     edi, PM_HZ / 20             // settle for 50 ms
    call    pm_wait
    mov     edi, VEC
    call    irq_count
    mov     r12, rax
    mov     edi, PM_HZ                  // one second
    call    pm_wait
    mov     edi, VEC
    call    irq_count
    sub     rax, r12
    mov     r13, rax
    lea     rsi, [rip + msg_count]
    call    puts
    mov     rax, r13
    call    putdec
    lea     rsi, [rip + msg_count2]
    call    puts
    mov     rax, r13
    mov     edi, 95
    mov     esi, 105
    lea     rdx, [rip + msg_rate]
    call    check_range

    // Masked: the PIT keeps running, the pin delivers nothing.
    mov     edi, 2
    mov     esi, VEC | RTE_MASKED
    xor     edx, edx
    call    ioapic_rte
    mov     edi, PM_HZ / 100            // let anything already in flight land
    call    pm_wait
    mov     edi, VEC
    call    irq_count
    mov     r12, rax
    mov     edi, PM_HZ / 10
    call    pm_wait
    mov     edi, VEC
    call    irq_count
    cmp     rax, r12
    jne     masked_bad
    lea     rsi, [rip + msg_masked]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit
masked_bad:
    lea     rsi, [rip + msg_masked_bad]
    jmp     fail

msg_count:  .asciz "dev_pit: "
msg_count2: .asciz " interrupts in 1 s (PIT mode 2 at 100 Hz, GSI 2, vector 0x30)\n"
msg_rate:   .asciz "PIT interrupt rate outside 95-105 per second"
msg_masked: .asciz "dev_pit: masked GSI 2 delivered nothing in 100 ms\n"
msg_masked_bad: .asciz "a masked I/O APIC pin delivered interrupts"
