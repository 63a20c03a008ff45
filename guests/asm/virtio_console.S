// virtio_console: drives a virtio-console device (1af4:1043, port 0 only) with virtio.inc.
// Queue 0 (receiveq0) holds four 256-byte device-writable buffers, reposted as they are used;
// queue 1 (transmitq0) carries one chain per line sent.
//
// The conversation (the host side is bhyve/tests/virtio.rs on a `unix=` socket; output sent before
// the host connects would be dropped, so the host speaks first):
//   host  -> "hello guest\n"                 checked here
//   guest -> "hello host from virtio_console\n"
//   host  -> any line (up to 6000 bytes)     printed as "received N bytes, fnv1a 0x..."
//   guest -> "echo: " + that line + "\n"     a chain of three descriptors
// Lines arrive split across buffers however the device delivers them.
// Parameters: wait= (seconds for each host line, default 20); slot=, msix=, pmport= (virtio.inc).
#define RING0_HOOK mov al, 0xff ; out 0x21, al ; out 0xa1, al ; jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"
#include "virtio.inc"

// Constants the code compares with must be known before it (Intel syntax).
key_wait:   .asciz "wait="
hello:      .ascii "hello guest"
.set hello_len, . - hello
our_line:   .ascii "hello host from virtio_console\n"
.set our_line_len, . - our_line
echo_prefix: .ascii "echo: "
.set echo_prefix_len, . - echo_prefix
newline:    .byte 10

.set RX_BUFS, 4
.set RX_LEN, 256
.set ACC_LEN, 8192
.set LINE_MAX, 6000

user_main:
    call    boot_done
    mov     edi, 0x1043
    call    vio_start
    xor     edi, edi                    // no SIZE, MULTIPORT, EMERG_WRITE
    call    vio_negotiate
    lea     rdi, [rip + vio_q0]
    xor     esi, esi
    mov     edx, 16
    lea     rcx, [rip + vio_ring0]
    call    vq_setup
    lea     rdi, [rip + vio_q1]
    mov     esi, 1
    mov     edx, 16
    lea     rcx, [rip + vio_ring1]
    call    vq_setup
    call    vio_driver_ok
    lea     rdi, [rip + key_wait]
    mov     esi, 20
    call    arg_u64
    imul    rax, rax, 1000
    mov     [rip + wait_ms], rax

    xor     ebx, ebx                    // post the receive buffers
1:  lea     rdi, [rip + vio_q0]
    mov     esi, ebx
    mov     eax, ebx
    shl     eax, 8                      // * RX_LEN
    lea     rdx, [rip + rx_bufs]
    add     rdx, rax
    mov     ecx, RX_LEN
    call    vq_post
    inc     ebx
    cmp     ebx, RX_BUFS
    jb      1b
    lea     rdi, [rip + vio_q0]
    call    vq_kick
    lea     rsi, [rip + msg_waiting]
    call    puts

    // 1. The host's greeting.
    call    recv_line
    mov     r12, rax
    lea     rsi, [rip + msg_got]
    call    puts
    lea     rsi, [rip + line]
    mov     rdx, r12
    call    vio_putn
    call    putnl
    cmp     r12, hello_len
    jne     greeting_bad
    lea     rsi, [rip + line]
    lea     rdi, [rip + hello]
    mov     rcx, r12
    repe cmpsb
    jne     greeting_bad

    // 2. Our line.
    lea     rax, [rip + our_line]
    mov     [rip + vb], rax
    mov     dword ptr [rip + vb + VB_LEN], our_line_len
    mov     dword ptr [rip + vb + VB_FLAGS], 0
    mov     edx, 1
    call    send
    lea     rsi, [rip + msg_sent]
    call    puts

    // 3. A line from the host, echoed back.
    call    recv_line
    mov     r12, rax
    lea     rsi, [rip + msg_recv]
    call    puts
    mov     rax, r12
    call    putdec
    lea     rsi, [rip + msg_recv2]
    call    puts
    lea     rsi, [rip + line]
    mov     rdx, r12
    call    vio_fnv1a
    call    puthex
    call    putnl
    lea     rax, [rip + echo_prefix]
    mov     [rip + vb], rax
    mov     dword ptr [rip + vb + VB_LEN], echo_prefix_len
    mov     dword ptr [rip + vb + VB_FLAGS], 0
    lea     rax, [rip + line]
    mov     [rip + vb + 16], rax
    mov     [rip + vb + 16 + VB_LEN], r12d
    mov     dword ptr [rip + vb + 16 + VB_FLAGS], 0
    lea     rax, [rip + newline]
    mov     [rip + vb + 32], rax
    mov     dword ptr [rip + vb + 32 + VB_LEN], 1
    mov     dword ptr [rip + vb + 32 + VB_FLAGS], 0
    mov     edx, 3
    test    r12, r12                    // an empty line: no zero-length descriptor
    jnz     2f
    lea     rax, [rip + newline]
    mov     [rip + vb + 16], rax
    mov     dword ptr [rip + vb + 16 + VB_LEN], 1
    mov     edx, 2
2:  call    send
    lea     rsi, [rip + msg_echoed]
    call    puts
    cmp     dword ptr [rip + vio_msix_on], 0
    je      3f
    lea     rsi, [rip + msg_irq]
    call    puts
    xor     eax, eax
    call    vio_irq_total
    call    putdec
    lea     rsi, [rip + msg_irq2]
    call    puts
    mov     eax, 1
    call    vio_irq_total
    call    putdec
    call    putnl
3:  mov     edi, EXIT_OK
    jmp     guest_exit

// send: vb = buffer list, edx = count. Transmits the chain on queue 1 and waits for its
// completion (the device has handed the bytes to its backend).
send:
    push    rbx
    lea     rdi, [rip + vio_q1]
    lea     rsi, [rip + vb]
    call    vq_push
    mov     ebx, eax
    lea     rdi, [rip + vio_q1]
    call    vq_kick
    lea     rdi, [rip + vio_q1]
    mov     esi, 5000
    mov     edx, ebx
    call    vq_wait_ok
    pop     rbx
    ret

// recv_line: waits (wait= seconds) until the accumulated input holds a newline; moves the line
// (without the newline) to `line`, keeps what follows it. rax = line length.
recv_line:
    push    rbx
    push    r12
    push    r13
    call    vio_now
    mov     r13, [rip + wait_ms]
    imul    r13, r13, VIO_TICKS_PER_MS
    add     r13, rax                    // deadline
1:  // a complete line already?
    lea     rdi, [rip + acc]
    mov     rcx, [rip + acc_len]
    test    rcx, rcx
    jz      2f
    mov     al, 10
    repne scasb
    je      5f
2:  // wait for more input: what is left of the deadline, in ms
    call    vio_now
    cmp     rax, r13
    jae     8f
    mov     rsi, r13
    sub     rsi, rax
    mov     rax, rsi
    xor     edx, edx
    mov     ecx, VIO_TICKS_PER_MS
    div     rcx
    lea     esi, [rax + 1]
    lea     rdi, [rip + vio_q0]
    call    vq_wait
    cmp     rax, -1
    je      8f
    cmp     eax, RX_BUFS
    jae     9f
    cmp     edx, RX_LEN
    ja      9f
    mov     ebx, eax                    // descriptor = buffer index
    mov     r12d, edx                   // bytes
    mov     rax, [rip + acc_len]
    add     rax, r12
    cmp     rax, ACC_LEN
    ja      7f
    lea     rdi, [rip + acc]
    add     rdi, [rip + acc_len]
    mov     eax, ebx
    shl     eax, 8
    lea     rsi, [rip + rx_bufs]
    add     rsi, rax
    mov     ecx, r12d
    rep movsb
    add     [rip + acc_len], r12
    lea     rdi, [rip + vio_q0]         // repost the buffer
    mov     esi, ebx
    mov     eax, ebx
    shl     eax, 8
    lea     rdx, [rip + rx_bufs]
    add     rdx, rax
    mov     ecx, RX_LEN
    call    vq_post
    lea     rdi, [rip + vio_q0]
    call    vq_kick
    jmp     1b
5:  // rdi is one past the newline: line = acc[0 .. rdi - acc - 1]
    lea     rsi, [rip + acc]
    mov     rbx, rdi
    sub     rbx, rsi                    // bytes consumed, newline included
    lea     r12, [rbx - 1]              // line length
    cmp     r12, LINE_MAX
    ja      7f
    lea     rdi, [rip + line]
    mov     rcx, r12
    rep movsb
    lea     rdi, [rip + acc]            // shift the rest down
    lea     rsi, [rdi + rbx]
    mov     rcx, [rip + acc_len]
    sub     rcx, rbx
    mov     [rip + acc_len], rcx
    rep movsb
    mov     rax, r12
    pop     r13
    pop     r12
    pop     rbx
    ret
7:  lea     rsi, [rip + msg_too_long]
    jmp     fail
8:  lea     rsi, [rip + msg_timeout]
    jmp     fail
9:  lea     rsi, [rip + msg_bad_used]
    jmp     fail

greeting_bad:
    lea     rsi, [rip + msg_greeting_bad]
    jmp     fail

msg_waiting: .asciz "virtio_console: receive buffers posted, waiting for the host\n"
msg_got:    .asciz "virtio_console: received line: "
msg_sent:   .asciz "virtio_console: sent our line\n"
msg_recv:   .asciz "virtio_console: received "
msg_recv2:  .asciz " bytes, fnv1a "
msg_echoed: .asciz "virtio_console: echoed the line back\n"
msg_irq:    .asciz "virtio_console: MSI-X interrupts: receiveq "
msg_irq2:   .asciz ", transmitq "
msg_too_long: .asciz "a host line longer than the buffer"
msg_timeout: .asciz "no complete line from the host within wait="
msg_bad_used: .asciz "a receive completion names an unknown buffer or too many bytes"
msg_greeting_bad: .asciz "the host's first line is not \"hello guest\""

    .balign 8
wait_ms:    .quad 0
acc_len:    .quad 0
vb:         .fill 48, 1, 0
    .balign 4096
rx_bufs:    .fill RX_BUFS * RX_LEN, 1, 0
acc:        .fill ACC_LEN, 1, 0
line:       .fill LINE_MAX, 1, 0
