// dev_rtc: the MC146818 RTC's date and time, read as an OS does (wait for UIP clear, read every
// field, read again until two reads agree), in BCD mode and then in binary mode; prints both as
// "dev_rtc bcd: YYYY-MM-DD hh:mm:ss" and "dev_rtc bin: ..." for the host to compare with its UTC
// clock. The guest checks that the two agree and that the clock advances by one second.
#include "rt.inc"
#include "rt_irq.inc"                   // for pm_wait (interrupts stay off: no RING0_HOOK)

.set RTC_IDX, 0x70
.set RTC_DATA, 0x71

user_main:
    call    boot_done
    mov     al, 0x0D                    // register D: VRT (valid RAM and time)
    call    rtc_get
    test    al, 0x80
    jz      vrt_bad

    // Read the time in BCD mode (the reset state: B = 0x02, 24-hour), then in binary mode, until
    // a pair agrees (a second may tick between them).
    mov     r15d, 5
again:
    mov     al, 0x0B
    mov     ah, 0x02                    // 24-hour, BCD
    call    rtc_set
    call    rtc_snapshot
    mov     r12, rax
    mov     al, 0x0B
    mov     ah, 0x06                    // 24-hour, binary
    call    rtc_set
    call    rtc_snapshot
    mov     r13, rax
    mov     rax, r12
    call    bcd_to_bin
    cmp     rax, r13
    je      agreed
    dec     r15d
    jnz     again
    jmp     agree_bad
agreed:
    call    bcd_fields_valid
    lea     rsi, [rip + msg_bcd]
    call    puts
    mov     rax, r12
    mov     ebx, 1                      // print the BCD nibbles
    call    print_time
    lea     rsi, [rip + msg_bin]
    call    puts
    mov     rax, r13
    xor     ebx, ebx                    // print the binary values in decimal
    call    print_time

    // The clock ticks: 1.2 s of the PM timer later the seconds moved by 1 or 2.
    mov     edi, PM_HZ * 6 / 5          // 1.2 s
    call    pm_wait
    call    rtc_snapshot
    movzx   eax, al
    movzx   edx, r13b
    sub     eax, edx
    add     eax, 60
    xor     edx, edx
    mov     ecx, 60
    div     ecx                         // edx = seconds advanced, modulo 60
    cmp     edx, 1
    jb      tick_bad
    cmp     edx, 2
    ja      tick_bad
    lea     rsi, [rip + msg_ok]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit

vrt_bad:
    lea     rsi, [rip + msg_vrt_bad]
    jmp     fail
agree_bad:
    lea     rsi, [rip + msg_agree_bad]
    jmp     fail
tick_bad:
    lea     rsi, [rip + msg_tick_bad]
    jmp     fail
bcd_bad:
    lea     rsi, [rip + msg_bcd_bad]
    jmp     fail

// rtc_get: al = register index. Returns al = its value.
rtc_get:
    out     RTC_IDX, al
    in      al, RTC_DATA
    ret

// rtc_set: al = register index, ah = value.
rtc_set:
    out     RTC_IDX, al
    mov     al, ah
    out     RTC_DATA, al
    ret

// rtc_read_fields: returns rax = century:year:month:day:hour:minute:second, one byte each
// (second in the low byte), after waiting for UIP to be clear.
rtc_read_fields:
1:  mov     al, 0x0A
    call    rtc_get
    test    al, 0x80
    jnz     1b
    xor     r8d, r8d
    lea     rsi, [rip + field_regs]
    mov     ecx, 7
2:  shl     r8, 8
    mov     al, [rsi]
    call    rtc_get
    mov     r8b, al
    inc     rsi
    dec     ecx
    jnz     2b
    mov     rax, r8
    ret

field_regs: .byte 0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00

// rtc_snapshot: rtc_read_fields until two consecutive reads agree.
rtc_snapshot:
    push    rbx
    call    rtc_read_fields
1:  mov     rbx, rax
    call    rtc_read_fields
    cmp     rax, rbx
    jne     1b
    pop     rbx
    ret

// bcd_fields_valid: r12 = packed BCD fields; fails unless every nibble is a decimal digit.
bcd_fields_valid:
    mov     rax, r12
    mov     ecx, 14
1:  mov     edx, eax
    and     edx, 0xf
    cmp     edx, 9
    ja      bcd_bad
    shr     rax, 4
    dec     ecx
    jnz     1b
    ret

// bcd_to_bin: rax = packed BCD fields (7 bytes). Returns rax = the same fields in binary.
bcd_to_bin:
    mov     r8, rax
    shl     r8, 8                       // the century byte to the top
    xor     eax, eax
    mov     ecx, 7
1:  rol     r8, 8                       // next field (most significant first) to the low byte
    movzx   edx, r8b
    mov     esi, edx
    shr     esi, 4
    and     edx, 0xf
    imul    esi, esi, 10
    add     edx, esi
    shl     rax, 8
    or      rax, rdx
    dec     ecx
    jnz     1b
    ret

// print_time: rax = packed fields, ebx = 1 for BCD (print nibbles), 0 for binary (print decimal).
print_time:
    push    r12
    push    r13
    mov     r12, rax
    mov     r13d, ebx
    mov     ecx, 48                     // century
    call    put_field
    mov     ecx, 40                     // year
    call    put_field
    mov     al, '-'
    call    putc
    mov     ecx, 32                     // month
    call    put_field
    mov     al, '-'
    call    putc
    mov     ecx, 24                     // day
    call    put_field
    mov     al, ' '
    call    putc
    mov     ecx, 16                     // hour
    call    put_field
    mov     al, ':'
    call    putc
    mov     ecx, 8                      // minute
    call    put_field
    mov     al, ':'
    call    putc
    xor     ecx, ecx                    // second
    call    put_field
    call    putnl
    pop     r13
    pop     r12
    ret

// put_field: r12 = packed fields, ecx = shift of the field, r13d = 1 for BCD. Prints two digits.
put_field:
    mov     rax, r12
    shr     rax, cl
    movzx   eax, al
    test    r13d, r13d
    jnz     1f
    xor     edx, edx
    mov     ecx, 10
    div     ecx
    shl     eax, 4
    or      eax, edx                    // binary value as two decimal nibbles
1:  push    rax
    shr     eax, 4
    and     eax, 0xf
    add     al, '0'
    call    putc
    pop     rax
    and     eax, 0xf
    add     al, '0'
    jmp     putc

msg_bcd:       .asciz "dev_rtc bcd: "
msg_bin:       .asciz "dev_rtc bin: "
msg_ok:        .asciz "dev_rtc: BCD and binary agree, the clock ticks\n"
msg_vrt_bad:   .asciz "RTC register D does not report valid time"
msg_agree_bad: .asciz "RTC BCD and binary readings disagree"
msg_tick_bad:  .asciz "RTC seconds did not advance by 1-2 in 1.2 s"
msg_bcd_bad:   .asciz "RTC BCD fields hold a non-decimal digit"
