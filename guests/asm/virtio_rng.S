// virtio_rng: drives a virtio-rnd device (1af4:1044) with virtio.inc: two 64-byte requests on
// queue 0 (one device-writable buffer each); each must come back with 1-64 bytes, neither all zero,
// and the two must differ. Prints both in hex ("virtio_rng: 1: ...", "virtio_rng: 2: ...").
// maskpba=1 (with msix=1): then masks queue 0's MSI-X entry, makes a request and polls for its
// completion: no interrupt may arrive and the entry's PBA bit must be set; unmasking must deliver
// exactly one interrupt and clear the bit. Prints "virtio_rng: masked: ...".
// churn=N (with msix=1): then rewrites queue 0's entry N times, alternating its vector between
// 0x51 and 0x61 (ending on 0x61, unmasked throughout), makes a request and waits for the interrupt
// on 0x61; then restores 0x51 and makes one more request (its interrupt on 0x51). Prints
// "virtio_rng: churn: ...".
// intx=1 (with msix=0): then reads the interrupt pin (INTA) and line (the I/O APIC input the
// platform wired it to) registers, routes that input to vector 0x70 (level, active low), makes two
// requests and waits for an INTx interrupt after each; the interrupt handler reads the ISR (which
// deasserts the line), so exactly two arrive. Prints "virtio_rng: INTx: ...".
// movebar=ADDR: then moves BAR 0 to ADDR (a 32 KiB aligned address in the PCI window, written
// with memory decode on, as an OS reassigning it does), checks the old address no longer decodes
// (reads all-ones), follows every structure to the new place and makes one more request there
// (its notify through the new address). Prints "virtio_rng: BAR0 moved ...".
// Parameters: slot=, msix=, pmport= (virtio.inc), maskpba=, churn=, intx=, movebar=.
#define RING0_HOOK mov al, 0xff ; out 0x21, al ; out 0xa1, al ; jmp irq_enter_user
// The INTx handler's part (vector 0x70): read the ISR, as a driver does, which deasserts the line.
#define IRQ_HOOK cmp eax, 0x70 ; jne 71f ; mov rax, [rip + vio_isr] ; mov al, [rax] ; or [rip + intx_isr], al ; 71:
#include "rt.inc"
#include "rt_irq.inc"
#include "virtio.inc"

.set RNG_BYTES, 64

user_main:
    call    boot_done
    mov     edi, 0x1044
    call    vio_start
    xor     edi, edi                    // no device features (VERSION_1 only)
    call    vio_negotiate
    lea     rdi, [rip + vio_q0]
    xor     esi, esi
    mov     edx, 16
    lea     rcx, [rip + vio_ring0]
    call    vq_setup
    call    vio_driver_ok

    lea     rbx, [rip + rng_buf1]
    call    rng_get
    mov     r12d, eax                   // length of the first
    lea     rbx, [rip + rng_buf2]
    call    rng_get
    mov     r13d, eax

    lea     rsi, [rip + msg_1]
    call    puts
    lea     rsi, [rip + rng_buf1]
    mov     edx, r12d
    call    vio_hexdump
    call    putnl
    lea     rsi, [rip + msg_2]
    call    puts
    lea     rsi, [rip + rng_buf2]
    mov     edx, r13d
    call    vio_hexdump
    call    putnl

    // Neither is all zero (the buffers were zeroed before each request).
    lea     rsi, [rip + rng_buf1]
    call    all_zero
    test    eax, eax
    jnz     zero_bad
    lea     rsi, [rip + rng_buf2]
    call    all_zero
    test    eax, eax
    jnz     zero_bad
    // They differ.
    lea     rsi, [rip + rng_buf1]
    lea     rdi, [rip + rng_buf2]
    mov     ecx, RNG_BYTES
    repe cmpsb
    je      same_bad
    lea     rsi, [rip + msg_ok]
    call    puts
    cmp     dword ptr [rip + vio_msix_on], 0
    je      1f
    lea     rsi, [rip + msg_irq]
    call    puts
    xor     eax, eax
    call    vio_irq_total
    call    putdec
    call    putnl
1:  lea     rdi, [rip + key_maskpba]
    xor     esi, esi
    call    arg_u64
    test    rax, rax
    jz      2f
    call    masked_vector
2:  lea     rdi, [rip + key_churn]
    xor     esi, esi
    call    arg_u64
    test    rax, rax
    jz      3f
    mov     rdi, rax
    call    route_churn
3:  lea     rdi, [rip + key_intx]
    xor     esi, esi
    call    arg_u64
    test    rax, rax
    jz      4f
    call    intx_check
4:  lea     rdi, [rip + key_movebar]
    xor     esi, esi
    call    arg_u64
    test    rax, rax
    jz      5f
    mov     rdi, rax
    call    move_bar
5:  mov     edi, EXIT_OK
    jmp     guest_exit

// move_bar: rdi = BAR 0's new address. The movebar= check.
move_bar:
    push    rbx
    push    r12
    mov     rbx, rdi
    mov     r12, [rip + vio_bar0]       // old
    mov     edi, 0x14                   // high dword first, then low (decode stays on)
    call    vio_cfg_sel
    mov     rax, rbx
    shr     rax, 32
    mov     dx, PCI_CONF_DATA
    out     dx, eax
    mov     edi, 0x10
    call    vio_cfg_sel
    mov     eax, ebx
    mov     dx, PCI_CONF_DATA
    out     dx, eax
    xor     edi, edi
    call    vio_bar_addr
    cmp     rax, rbx
    jne     91f
    lea     rsi, [rip + msg_moved1]
    call    puts
    mov     rax, r12
    call    puthex
    lea     rsi, [rip + msg_moved2]
    call    puts
    mov     rax, rbx
    call    puthex
    call    putnl
    // The old place decodes nothing now.
    mov     rax, [rip + vio_common]
    mov     eax, [rax]
    cmp     eax, 0xffffffff
    jne     92f
    // Every structure moves with the BAR.
    mov     rax, rbx
    sub     rax, r12
    add     [rip + vio_bar0], rax
    add     [rip + vio_common], rax
    add     [rip + vio_notify], rax
    add     [rip + vio_isr], rax
    add     [rip + vio_devcfg], rax
    add     [rip + vio_msix_table], rax
    add     [rip + vio_q0 + VQ_NOTIFY], rax
    mov     rax, [rip + vio_common]     // the device is there: DRIVER_OK still set
    movzx   eax, byte ptr [rax + VC_STATUS]
    test    eax, VS_DRIVER_OK
    jz      93f
    lea     rbx, [rip + rng_buf2]
    call    rng_get
    lea     rsi, [rip + msg_moved3]
    call    puts
    pop     r12
    pop     rbx
    ret
91: lea     rsi, [rip + msg_move_readback]
    jmp     fail
92: lea     rsi, [rip + msg_move_old]
    jmp     fail
93: lea     rsi, [rip + msg_move_new]
    jmp     fail

.set INTX_VEC, 0x70

// intx_check: the intx=1 check.
intx_check:
    push    rbx
    push    r12
    push    r13
    cmp     dword ptr [rip + vio_msix_on], 0
    jne     90f
    mov     edi, 0x3d                   // interrupt pin: 1 = INTA
    call    vio_cfg_read8
    cmp     eax, 1
    jne     91f
    mov     edi, 0x3c                   // interrupt line: the I/O APIC input
    call    vio_cfg_read8
    mov     ebx, eax
    cmp     ebx, 16
    jb      92f
    cmp     ebx, 23
    ja      92f
    lea     rsi, [rip + msg_intx1]
    call    puts
    mov     eax, ebx
    call    putdec
    call    putnl
    // The earlier requests left the line asserted (the input was masked): let the device finish
    // raising it, then read the ISR (which deasserts it).
    mov     edi, 20
    call    vio_delay_ms
    mov     rax, [rip + vio_isr]
    mov     al, [rax]
    call    lapic_id
    shl     eax, 24
    mov     edx, eax
    mov     edi, ebx
    mov     esi, INTX_VEC | RTE_LEVEL | 0x2000   // level, active low, fixed, physical
    call    ioapic_rte
    mov     edi, 20                     // nothing may be left to arrive now
    call    vio_delay_ms
    mov     byte ptr [rip + intx_isr], 0
    mov     edi, INTX_VEC
    call    irq_count
    mov     r12, rax                    // interrupts before
    xor     r13d, r13d
1:  lea     rbx, [rip + rng_buf1]
    call    rng_get                     // polled (msix=0)
    lea     rdi, [rip + irq_counts + INTX_VEC * 8]
    lea     rsi, [r12 + r13]
    call    wait_count
    test    eax, eax
    jz      93f
    inc     r13d
    cmp     r13d, 2
    jb      1b
    mov     edi, 20                     // a line left asserted would fire again meanwhile
    call    vio_delay_ms
    mov     edi, INTX_VEC
    call    irq_count
    sub     rax, r12
    cmp     rax, 2
    jne     94f
    movzx   eax, byte ptr [rip + intx_isr]
    test    eax, 1
    jz      95f
    lea     rsi, [rip + msg_intx2]
    call    puts
    movzx   eax, byte ptr [rip + intx_isr]
    call    putdec
    call    putnl
    pop     r13
    pop     r12
    pop     rbx
    ret
90: lea     rsi, [rip + msg_intx_msix]
    jmp     fail
91: lea     rsi, [rip + msg_intx_pin]
    jmp     fail
92: lea     rsi, [rip + msg_intx_line]
    jmp     fail
93: lea     rsi, [rip + msg_intx_noirq]
    jmp     fail
94: lea     rsi, [rip + msg_intx_count]
    jmp     fail
95: lea     rsi, [rip + msg_intx_isr]
    jmp     fail

// rng_polled: rbx = 64-byte buffer. rng_get with the completion polled (no interrupt expected),
// then the queue's interrupt bookkeeping restarted from the current count (so later vq_waits do
// not take an interrupt that came for this request as theirs).
rng_polled:
    mov     r8d, [rip + vio_msix_on]
    push    r8
    mov     dword ptr [rip + vio_msix_on], 0
    call    rng_get
    pop     r8
    mov     [rip + vio_msix_on], r8d
    ret

// resync_irqs: the queue's interrupt bookkeeping restarted from the current count and used index.
resync_irqs:
    xor     eax, eax
    call    vio_irq_total
    mov     [rip + vio_q0 + VQ_IRQS], rax
    mov     rax, [rip + vio_q0 + VQ_USED]
    movzx   eax, word ptr [rax + 2]
    mov     [rip + vio_q0 + VQ_IRQUPTO], ax
    ret

// pba_addr: rax = the MSI-X PBA's address (capability + 8: BIR and offset).
pba_addr:
    push    rbx
    mov     edi, [rip + vio_msix_cap]
    add     edi, 8
    call    vio_cfg_read32
    mov     ebx, eax
    mov     edi, eax
    and     edi, 7
    call    vio_bar_addr
    and     ebx, 0xfffffff8
    add     rax, rbx
    pop     rbx
    ret

// wait_count: rdi = address of a 64-bit interrupt counter, rsi = value to exceed. Waits up to
// 1 s; eax = 1 if the counter went past the value, else 0.
wait_count:
    push    rbx
    push    r12
    push    r13
    mov     rbx, rdi
    mov     r12, rsi
    call    vio_now
    lea     r13, [rax + VIO_PM_HZ]
1:  mov     rax, [rbx]
    cmp     rax, r12
    ja      2f
    pause
    call    vio_now
    cmp     rax, r13
    jb      1b
    xor     eax, eax
    jmp     3f
2:  mov     eax, 1
3:  pop     r13
    pop     r12
    pop     rbx
    ret

// masked_vector: the maskpba=1 check.
masked_vector:
    push    rbx
    push    r12
    push    r13
    cmp     dword ptr [rip + vio_msix_on], 0
    je      90f
    call    pba_addr
    mov     r13, rax                    // PBA
    mov     rcx, [rip + vio_msix_table]
    mov     dword ptr [rcx + 16 + 12], 1    // mask entry 1 (queue 0)
    xor     eax, eax
    call    vio_irq_total
    mov     r12, rax                    // interrupts before
    lea     rbx, [rip + rng_buf1]
    call    rng_polled
    mov     edi, 20                     // time for a (wrong) interrupt to arrive
    call    vio_delay_ms
    xor     eax, eax
    call    vio_irq_total
    cmp     rax, r12
    jne     91f
    mov     rax, [r13]
    test    eax, 2                      // entry 1's pending bit
    jz      92f
    lea     rsi, [rip + msg_masked1]
    call    puts
    mov     rax, [r13]
    call    puthex
    call    putnl
    mov     rcx, [rip + vio_msix_table]
    mov     dword ptr [rcx + 16 + 12], 0    // unmask: the pending message goes out now
    lea     rdi, [rip + irq_counts + (VIO_VEC_BASE + 1) * 8]
    mov     rsi, r12
    call    wait_count
    test    eax, eax
    jz      93f
    mov     edi, 20
    call    vio_delay_ms
    xor     eax, eax
    call    vio_irq_total
    sub     rax, r12
    cmp     rax, 1
    jne     94f
    mov     rax, [r13]
    test    eax, 2
    jnz     95f
    call    resync_irqs
    lea     rsi, [rip + msg_masked2]
    call    puts
    pop     r13
    pop     r12
    pop     rbx
    ret
90: lea     rsi, [rip + msg_needs_msix]
    jmp     fail
91: lea     rsi, [rip + msg_masked_irq]
    jmp     fail
92: lea     rsi, [rip + msg_masked_nopba]
    jmp     fail
93: lea     rsi, [rip + msg_unmask_noirq]
    jmp     fail
94: lea     rsi, [rip + msg_unmask_count]
    jmp     fail
95: lea     rsi, [rip + msg_unmask_pba]
    jmp     fail

.set CHURN_VEC, 0x61

// route_churn: rdi = rewrites. The churn=N check.
route_churn:
    push    rbx
    push    r12
    push    r13
    cmp     dword ptr [rip + vio_msix_on], 0
    je      90b
    mov     r12, rdi
    mov     rcx, [rip + vio_msix_table]
    mov     r13d, [rcx + 16 + 8]        // entry 1's data (vector 0x51)
    mov     r8d, [rcx + 16]             // its address
1:  test    r12, r12
    jz      2f
    mov     [rcx + 16], r8d             // address, data: as a driver retargeting a vector does
    mov     eax, r12d
    and     eax, 1
    mov     edx, CHURN_VEC
    cmovz   edx, r13d                   // even counts: 0x51; the last (N = 1) is 0x61
    mov     [rcx + 16 + 8], edx
    dec     r12
    jmp     1b
2:  mov     dword ptr [rcx + 16 + 8], CHURN_VEC
    mov     edi, CHURN_VEC
    call    irq_count
    mov     rbx, rax
    xor     eax, eax
    call    vio_irq_total
    mov     r12, rax                    // 0x51's count
    push    rbx
    lea     rbx, [rip + rng_buf1]
    call    rng_polled
    pop     rbx
    lea     rdi, [rip + irq_counts + CHURN_VEC * 8]
    mov     rsi, rbx
    call    wait_count
    test    eax, eax
    jz      91f
    xor     eax, eax
    call    vio_irq_total
    cmp     rax, r12
    jne     92f
    lea     rsi, [rip + msg_churn1]
    call    puts
    // Back to 0x51: the next request's interrupt must come there (vq_wait checks it).
    mov     rcx, [rip + vio_msix_table]
    mov     [rcx + 16 + 8], r13d
    call    resync_irqs
    lea     rbx, [rip + rng_buf2]
    call    rng_get
    lea     rsi, [rip + msg_churn2]
    call    puts
    pop     r13
    pop     r12
    pop     rbx
    ret
91: lea     rsi, [rip + msg_churn_noirq]
    jmp     fail
92: lea     rsi, [rip + msg_churn_old]
    jmp     fail

// rng_get: rbx = 64-byte buffer. Zeroes it, requests RNG_BYTES into it. eax = bytes returned.
rng_get:
    push    r12
    mov     rdi, rbx
    xor     eax, eax
    mov     ecx, RNG_BYTES
    rep stosb
    mov     [rip + rng_vb + VB_ADDR], rbx
    mov     dword ptr [rip + rng_vb + VB_LEN], RNG_BYTES
    mov     dword ptr [rip + rng_vb + VB_FLAGS], VD_WRITE
    lea     rdi, [rip + vio_q0]
    lea     rsi, [rip + rng_vb]
    mov     edx, 1
    call    vq_push
    mov     r12d, eax
    lea     rdi, [rip + vio_q0]
    call    vq_kick
    lea     rdi, [rip + vio_q0]
    mov     esi, 5000
    mov     edx, r12d
    call    vq_wait_ok
    test    eax, eax
    jz      1f
    cmp     eax, RNG_BYTES
    ja      1f
    pop     r12
    ret
1:  lea     rsi, [rip + msg_len_bad]
    jmp     fail

// all_zero: rsi = 64-byte buffer. eax = 1 if every byte is zero.
all_zero:
    mov     ecx, RNG_BYTES
1:  cmp     byte ptr [rsi], 0
    jne     2f
    inc     rsi
    dec     ecx
    jnz     1b
    mov     eax, 1
    ret
2:  xor     eax, eax
    ret

zero_bad:
    lea     rsi, [rip + msg_zero]
    jmp     fail
same_bad:
    lea     rsi, [rip + msg_same]
    jmp     fail

msg_1:      .asciz "virtio_rng: 1: "
msg_2:      .asciz "virtio_rng: 2: "
msg_ok:     .asciz "virtio_rng: two requests of 64 bytes: both non-zero and different\n"
msg_irq:    .asciz "virtio_rng: MSI-X interrupts on queue 0: "
msg_len_bad: .asciz "the device returned 0 bytes or more than the buffer"
msg_zero:   .asciz "the device returned all-zero bytes"
msg_same:   .asciz "two requests returned the same bytes"
key_maskpba: .asciz "maskpba="
key_churn:  .asciz "churn="
key_intx:   .asciz "intx="
key_movebar: .asciz "movebar="
msg_moved1: .asciz "virtio_rng: BAR0 moved from "
msg_moved2: .asciz " to "
msg_moved3: .asciz "virtio_rng: BAR0 moved: the old address reads all-ones, a request at the new one completed\n"
msg_move_readback: .asciz "BAR 0 does not read back the address written"
msg_move_old: .asciz "the old BAR 0 address still decodes"
msg_move_new: .asciz "the device does not answer at the new BAR 0 address"
msg_intx1:  .asciz "virtio_rng: INTx: pin INTA, line "
msg_intx2:  .asciz "virtio_rng: INTx: 2 interrupts on vector 0x70, ISR bits seen by the handler "
msg_intx_msix: .asciz "intx=1 needs msix=0"
msg_intx_pin: .asciz "the interrupt pin register does not say INTA"
msg_intx_line: .asciz "the interrupt line register is not an I/O APIC input 16-23"
msg_intx_noirq: .asciz "a completion was not followed by an INTx interrupt within 1 s"
msg_intx_count: .asciz "INTx: not exactly one interrupt per completion (the ISR read did not deassert?)"
msg_intx_isr: .asciz "INTx: the handler never saw ISR bit 0"
msg_masked1: .asciz "virtio_rng: masked: completion without interrupt, PBA "
msg_masked2: .asciz "virtio_rng: masked: unmask delivered 1 interrupt, PBA bit clear\n"
msg_needs_msix: .asciz "maskpba= and churn= need msix=1"
msg_masked_irq: .asciz "an interrupt arrived on a masked MSI-X vector"
msg_masked_nopba: .asciz "a masked vector's request completed without setting its PBA bit"
msg_unmask_noirq: .asciz "unmasking a pending vector did not deliver it within 1 s"
msg_unmask_count: .asciz "unmasking a pending vector did not deliver exactly one interrupt"
msg_unmask_pba: .asciz "the PBA bit stayed set after the pending vector was delivered"
msg_churn1: .asciz "virtio_rng: churn: interrupt on vector 0x61 after the rewrites\n"
msg_churn2: .asciz "virtio_rng: churn: back on vector 0x51\n"
msg_churn_noirq: .asciz "after the rewrites, no interrupt arrived on vector 0x61 within 1 s"
msg_churn_old: .asciz "after the rewrites, an interrupt arrived on the old vector 0x51"

intx_isr:   .byte 0
    .balign 16
rng_vb:     .fill 16, 1, 0
rng_buf1:   .fill RNG_BYTES, 1, 0
rng_buf2:   .fill RNG_BYTES, 1, 0
