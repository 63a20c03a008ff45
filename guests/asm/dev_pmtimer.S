// dev_pmtimer: the ACPI PM timer (port 0x408, 32 bits at 3.579545 MHz) never goes backwards over
// n=COUNT consecutive reads (default 20000), byte and word reads agree with dword reads, and its
// rate against the HPET's 10 MHz main counter over ~200 ms is 3579545 Hz within 1%.
#define RING0_HOOK jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"

user_main:
    call    boot_done
    lea     rdi, [rip + key_n]
    mov     esi, 20000
    call    arg_u64
    mov     r12, rax

    // Monotonic: each step, modulo 2^32, is below 2^31 (a 600 s span).
    call    pm_read
    mov     ebx, eax
    mov     r14, r12
1:  call    pm_read
    mov     ecx, eax
    sub     ecx, ebx
    js      backwards
    mov     ebx, eax
    dec     r14
    jnz     1b
    lea     rsi, [rip + msg_mono]
    call    puts
    mov     rax, r12
    call    putdec
    lea     rsi, [rip + msg_mono2]
    call    puts

    // Narrow reads: the high word read right after a dword read is that dword's high word, or
    // one more (a carry in between).
    call    pm_read
    mov     ebx, eax
    mov     dx, PM_TMR + 2
    in      ax, dx
    movzx   eax, ax
    shr     ebx, 16
    sub     eax, ebx
    cmp     eax, 1
    ja      narrow_bad
    // A byte read is the low byte: it changes (it is not an undecoded all-ones).
    mov     dx, PM_TMR
    in      al, dx
    mov     bl, al
    mov     ecx, 1000
3:  in      al, dx
    cmp     al, bl
    jne     narrow_ok
    dec     ecx
    jnz     3b
    jmp     narrow_bad
narrow_ok:

    // Rate against the HPET main counter.
    mov     edi, 0x10
    mov     esi, 1                      // HPET ENABLE
    call    hpet_write
    call    pm_read
    mov     ebx, eax
    mov     edi, 0xF0
    call    hpet_read
    mov     r14, rax
    mov     edi, PM_HZ / 5
    call    pm_wait
    call    pm_read
    sub     eax, ebx
    mov     r15, rax                    // PM ticks
    mov     edi, 0xF0
    call    hpet_read
    sub     rax, r14                    // HPET ticks (10 MHz)
    mov     rcx, rax
    test    rcx, rcx
    jz      rate_bad
    mov     rax, r15
    mov     rdx, 10000000
    mul     rdx
    div     rcx                         // PM ticks per second of the HPET
    mov     r15, rax
    lea     rsi, [rip + msg_rate]
    call    puts
    mov     rax, r15
    call    putdec
    lea     rsi, [rip + msg_rate2]
    call    puts
    mov     rax, r15
    mov     edi, 3543750                // 3579545 Hz +-1%
    mov     esi, 3615341
    lea     rdx, [rip + msg_rate_bad]
    call    check_range
    mov     edi, EXIT_OK
    jmp     guest_exit

backwards:
    lea     rsi, [rip + msg_back]
    jmp     fail
narrow_bad:
    lea     rsi, [rip + msg_narrow_bad]
    jmp     fail
rate_bad:
    lea     rsi, [rip + msg_rate_bad]
    jmp     fail

key_n:          .asciz "n="
msg_mono:       .asciz "dev_pmtimer: "
msg_mono2:      .asciz " consecutive reads, never backwards\n"
msg_rate:       .asciz "dev_pmtimer: rate "
msg_rate2:      .asciz " Hz against the HPET\n"
msg_back:       .asciz "the PM timer went backwards"
msg_narrow_bad: .asciz "narrow PM timer reads disagree with dword reads"
msg_rate_bad:   .asciz "PM timer rate outside 3579545 Hz +-1% of the HPET"
