// dev_ioapic: I/O APIC semantics with the RTC's interrupt (ISA IRQ 8, a level held until register C
// is read) as the level source and the PIT as an edge source.
//  1. Level-triggered pin 8 → vector 0x48. The handler leaves the line high for the first four
//     interrupts, so each EOI (KVM_EXIT_IOAPIC_EOI → the I/O APIC) must deliver it again; at the
//     fifth it reads register C (the line drops) and turns the periodic interrupt off. Then the
//     count must stay put.
//  2. Pin 8 masked while the RTC asserts the line again: nothing for 50 ms. Unmasked: the asserted
//     level is delivered, the handler drops the line, and the count stays put.
//  3. Edge pin 2 (PIT at 1 kHz) masked: nothing for 50 ms; unmasked: interrupts again.
// Remote IRR must be clear at the end.
//
// One delivery more than the handler asked for is accepted in 1 and 2: kvm_pvm reports the EOI of
// a level-triggered vector when it delivers the interrupt, not when the guest writes the EOI
// register (it reports EOIs for handlers that never write it), so the I/O APIC may already have
// sent the next one when the handler drops the line. With hardware KVM the counts are exact.
// Constants the handler hook uses must be defined before rt_irq.inc expands it: in Intel syntax
// a bare symbol not yet known to be a constant is a memory operand.
.set VEC_RTC, 0x48
.set VEC_PIT, 0x30
#define RING0_HOOK jmp irq_enter_user
#define IRQ_HOOK \
    cmp     eax, VEC_RTC ; \
    jne     9f ; \
    mov     rax, [ABS(irq_counts) + VEC_RTC * 8] ; \
    cmp     rax, [ABS(rtc_drop_at)] ; \
    jb      9f ; \
    mov     al, 0x0C ; \
    out     0x70, al ; \
    in      al, 0x71 ; \
    mov     al, 0x0B ; \
    out     0x70, al ; \
    mov     al, 0x02 ; \
    out     0x71, al ; \
9:
#include "rt.inc"
#include "rt_irq.inc"

user_main:
    call    boot_done
    // 1. Level re-delivery.
    mov     qword ptr [rip + rtc_drop_at], 5
    mov     edi, 8
    mov     esi, VEC_RTC | RTE_LEVEL
    xor     edx, edx
    call    ioapic_rte
    mov     al, 0x0A
    mov     ah, 0x2F                    // divider running, periodic rate 2 Hz
    call    rtc_set
    mov     al, 0x0B
    mov     ah, 0x42                    // PIE, 24-hour
    call    rtc_set
    mov     r12d, 30                    // up to 3 s (30 x 100 ms) for the first period
1:  mov     edi, PM_HZ / 10
    call    pm_wait
    mov     edi, VEC_RTC
    call    irq_count
    cmp     rax, 5
    jae     2f
    dec     r12d
    jnz     1b
    jmp     level_bad
2:  call    settled_count               // and then nothing more
    mov     r13, rax
    mov     edi, 5
    mov     esi, 6
    lea     rdx, [rip + msg_level_bad]
    call    check_range
    lea     rsi, [rip + msg_level]
    call    puts
    mov     rax, r13
    call    putdec
    lea     rsi, [rip + msg_level2]
    call    puts

    // 2. Masked level pin, then unmasked while asserted.
    mov     qword ptr [rip + rtc_drop_at], -1
    mov     edi, 8
    mov     esi, VEC_RTC | RTE_LEVEL | RTE_MASKED
    xor     edx, edx
    call    ioapic_rte
    mov     al, 0x0A
    mov     ah, 0x26                    // 1024 Hz
    call    rtc_set
    mov     al, 0x0B
    mov     ah, 0x42
    call    rtc_set
    mov     edi, PM_HZ / 20
    call    pm_wait
    mov     edi, VEC_RTC
    call    irq_count
    cmp     rax, r13
    jne     masked_bad
    lea     rax, [r13 + 1]
    mov     [rip + rtc_drop_at], rax
    mov     edi, 8
    mov     esi, VEC_RTC | RTE_LEVEL
    xor     edx, edx
    call    ioapic_rte
    call    settled_count
    mov     r14, rax
    sub     rax, r13                    // deliveries after the unmask
    mov     edi, 1
    mov     esi, 2
    lea     rdx, [rip + msg_unmask_bad]
    call    check_range
    lea     rsi, [rip + msg_masked]
    call    puts

    // 3. Masked edge pin.
    mov     edi, 2
    mov     esi, VEC_PIT | RTE_MASKED
    xor     edx, edx
    call    ioapic_rte
    mov     al, 0x34
    out     0x43, al
    mov     al, 1193 & 0xff             // 1 kHz
    out     0x40, al
    mov     al, 1193 >> 8
    out     0x40, al
    mov     edi, PM_HZ / 20
    call    pm_wait
    mov     edi, VEC_PIT
    call    irq_count
    test    rax, rax
    jnz     edge_bad
    mov     edi, 2
    mov     esi, VEC_PIT
    xor     edx, edx
    call    ioapic_rte
    mov     edi, PM_HZ / 20
    call    pm_wait
    mov     edi, 2
    mov     esi, VEC_PIT | RTE_MASKED
    xor     edx, edx
    call    ioapic_rte
    mov     edi, VEC_PIT
    call    irq_count
    mov     r12, rax
    cmp     rax, 25                     // ~50 expected in 50 ms
    jb      edge_bad
    lea     rsi, [rip + msg_edge]
    call    puts
    mov     rax, r12
    call    putdec
    lea     rsi, [rip + msg_edge2]
    call    puts

    mov     edi, 8
    call    ioapic_rte_low
    test    eax, 0x4000
    jnz     irr_bad
    mov     edi, VEC_RTC
    call    irq_count
    cmp     rax, r14
    jne     unmask_bad
    mov     edi, EXIT_OK
    jmp     guest_exit

level_bad:
    lea     rsi, [rip + msg_level_bad]
    jmp     report_fail
masked_bad:
    lea     rsi, [rip + msg_masked_bad]
    jmp     report_fail
unmask_bad:
    lea     rsi, [rip + msg_unmask_bad]
    jmp     report_fail
edge_bad:
    lea     rsi, [rip + msg_edge_bad]
    jmp     report_fail
irr_bad:
    lea     rsi, [rip + msg_irr_bad]
report_fail:
    push    rsi
    lea     rsi, [rip + msg_count]
    call    puts
    mov     edi, VEC_RTC
    call    irq_count
    call    putdec
    call    putnl
    pop     rsi
    jmp     fail

// settled_count: waits 100 ms, then requires the RTC vector's count not to move for another
// 100 ms. Returns rax = that count.
settled_count:
    push    rbx
    mov     edi, PM_HZ / 10
    call    pm_wait
    mov     edi, VEC_RTC
    call    irq_count
    mov     rbx, rax
    mov     edi, PM_HZ / 10
    call    pm_wait
    mov     edi, VEC_RTC
    call    irq_count
    cmp     rax, rbx
    jne     storm_bad
    pop     rbx
    ret

storm_bad:
    lea     rsi, [rip + msg_storm_bad]
    jmp     report_fail

// rtc_set: al = register index, ah = value.
rtc_set:
    out     0x70, al
    mov     al, ah
    out     0x71, al
    ret

    .balign 8
rtc_drop_at: .quad 5

msg_level:      .asciz "dev_ioapic: level pin 8 delivered "
msg_level2:     .asciz " times for one assertion (again at each EOI while the line stayed high), none after it dropped\n"
msg_masked:     .asciz "dev_ioapic: masked level pin delivered nothing; unmasked while asserted it delivered, then stopped\n"
msg_storm_bad:  .asciz "level-triggered pin 8 kept delivering after the line dropped"
msg_edge:       .asciz "dev_ioapic: masked edge pin 2 delivered nothing; unmasked for 50 ms: "
msg_edge2:      .asciz " PIT interrupts\n"
msg_count:      .asciz "dev_ioapic: RTC vector count "
msg_level_bad:  .asciz "level-triggered pin 8 was not delivered again at each EOI while the line stayed high"
msg_masked_bad: .asciz "a masked level-triggered pin delivered"
msg_unmask_bad: .asciz "unmasking an asserted level-triggered pin did not deliver it"
msg_edge_bad:   .asciz "masked edge pin delivered, or unmasked edge pin did not"
msg_irr_bad:    .asciz "remote IRR of pin 8 still set at the end"
