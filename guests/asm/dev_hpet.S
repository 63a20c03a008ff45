// dev_hpet: the HPET's capabilities, its main counter against the ACPI PM timer, a periodic
// comparator at 100 Hz (timer 0 → I/O APIC input 24 → vector 0x40: 95–105 interrupts per second
// required) and a one-shot comparator 50 ms ahead (timer 1 → input 25 → vector 0x41: exactly one
// interrupt); disabling the counter stops both.
#define RING0_HOOK jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"

.set VEC0, 0x40
.set VEC1, 0x41
.set PERIOD, 100000                     // 100 Hz of the 10 MHz counter
.set T0_CONF, 0x100
.set T0_CMP, 0x108
.set T1_CONF, 0x120
.set T1_CMP, 0x128
.set TN_INT_ENB, 0x4
.set TN_PERIODIC, 0x8
.set TN_VAL_SET, 0x40

user_main:
    call    boot_done
    // GCAP_ID: vendor 0x8086, 8 timers, 64-bit counter, period 100 ns (100000000 fs).
    xor     edi, edi
    call    hpet_read
    mov     r12, rax
    lea     rsi, [rip + msg_cap]
    call    puts
    mov     rax, r12
    call    puthex
    call    putnl
    mov     rax, r12
    shr     rax, 32
    cmp     rax, 100000000
    jne     cap_bad
    mov     eax, r12d
    shr     eax, 16
    cmp     eax, 0x8086
    jne     cap_bad
    mov     eax, r12d
    shr     eax, 8
    and     eax, 0x1f
    cmp     eax, 7
    jne     cap_bad

    mov     edi, 24
    mov     esi, VEC0
    xor     edx, edx
    call    ioapic_rte
    mov     edi, 25
    mov     esi, VEC1
    xor     edx, edx
    call    ioapic_rte

    // Timer 0: periodic, VAL_SET, route 24; first match one period after 0, then the period.
    mov     edi, T0_CONF
    mov     esi, TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | (24 << 9)
    call    hpet_write
    mov     edi, T0_CMP
    mov     esi, PERIOD
    call    hpet_write
    mov     edi, T0_CMP
    mov     esi, PERIOD
    call    hpet_write
    mov     edi, 0x10                   // GEN_CONF: ENABLE
    mov     esi, 1
    call    hpet_write

    mov     edi, PM_HZ / 20
    call    pm_wait
    mov     edi, VEC0
    call    irq_count
    mov     r12, rax
    mov     edi, 0xF0
    call    hpet_read
    mov     r14, rax
    mov     edi, PM_HZ                  // one second of the PM timer
    call    pm_wait
    mov     edi, 0xF0
    call    hpet_read
    sub     rax, r14
    mov     r14, rax                    // HPET ticks in that second
    mov     edi, VEC0
    call    irq_count
    sub     rax, r12
    mov     r13, rax
    lea     rsi, [rip + msg_rate]
    call    puts
    mov     rax, r13
    call    putdec
    lea     rsi, [rip + msg_rate2]
    call    puts
    mov     rax, r14
    call    putdec
    lea     rsi, [rip + msg_rate3]
    call    puts
    mov     rax, r13
    mov     edi, 95
    mov     esi, 105
    lea     rdx, [rip + msg_rate_bad]
    call    check_range
    mov     rax, r14
    mov     edi, 9900000
    mov     esi, 10100000
    lea     rdx, [rip + msg_counter_bad]
    call    check_range

    // Timer 1: one-shot 50 ms (500000 ticks) ahead.
    mov     edi, T1_CONF
    mov     esi, TN_INT_ENB | (25 << 9)
    call    hpet_write
    mov     edi, 0xF0
    call    hpet_read
    lea     rsi, [rax + 500000]
    mov     edi, T1_CMP
    call    hpet_write
    mov     edi, PM_HZ / 5              // 200 ms
    call    pm_wait
    mov     edi, VEC1
    call    irq_count
    cmp     rax, 1
    jne     oneshot_bad
    lea     rsi, [rip + msg_oneshot]
    call    puts

    // Counter disabled: nothing more from either timer.
    mov     edi, 0x10
    xor     esi, esi
    call    hpet_write
    mov     edi, PM_HZ / 100
    call    pm_wait
    mov     edi, VEC0
    call    irq_count
    mov     r12, rax
    mov     edi, PM_HZ / 10
    call    pm_wait
    mov     edi, VEC0
    call    irq_count
    cmp     rax, r12
    jne     disable_bad
    mov     edi, VEC1
    call    irq_count
    cmp     rax, 1
    jne     disable_bad
    lea     rsi, [rip + msg_disabled]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit

cap_bad:
    lea     rsi, [rip + msg_cap_bad]
    jmp     fail
oneshot_bad:
    lea     rsi, [rip + msg_oneshot_bad]
    jmp     fail
disable_bad:
    lea     rsi, [rip + msg_disable_bad]
    jmp     fail

msg_cap:        .asciz "dev_hpet: GCAP_ID "
msg_cap_bad:    .asciz "HPET capabilities are not 8 timers, vendor 0x8086, 100 ns"
msg_rate:       .asciz "dev_hpet: "
msg_rate2:      .asciz " periodic interrupts in 1 s (timer 0 at 100 Hz, GSI 24, vector 0x40); counter advanced "
msg_rate3:      .asciz " ticks\n"
msg_rate_bad:   .asciz "HPET periodic interrupt rate outside 95-105 per second"
msg_counter_bad: .asciz "HPET counter rate outside 10 MHz +-1% of the PM timer"
msg_oneshot:    .asciz "dev_hpet: one-shot comparator 50 ms ahead fired once\n"
msg_oneshot_bad: .asciz "the one-shot comparator did not fire exactly once"
msg_disabled:   .asciz "dev_hpet: counter disabled, no more interrupts\n"
msg_disable_bad: .asciz "interrupts after the HPET was disabled"
