// virtio_net: drives a virtio-net device (1af4:1041) with virtio.inc. Negotiates MAC and STATUS
// (no offloads, no mergeable buffers: every buffer starts with the 12-byte virtio_net_hdr_v1),
// prints the MAC and link state; queue 0 (RX) holds four 2 KiB buffers, reposted as they are used;
// queue 1 (TX) carries [header 12 R][frame R] chains.
//
//   guest -> broadcast, EtherType 0x88b5 (local experimental), payload
//            "bhyve-rs virtio_net guest frame"
//   host  -> to our MAC, EtherType 0x88b5, payload starting "bhyve-rs host frame"
//            (anything else received, such as the host's IPv6 chatter, is counted and skipped)
//   guest -> back to the sender, EtherType 0x88b5, payload "echo: " + the host's payload
// Every frame is padded to 60 bytes. RX headers must say num_buffers = 1.
// Parameters: wait= (seconds for the host's frame, default 20); slot=, msix=, pmport= (virtio.inc).
#define RING0_HOOK mov al, 0xff ; out 0x21, al ; out 0xa1, al ; jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"
#include "virtio.inc"

// Constants the code compares with must be known before it (Intel syntax).
key_wait:   .asciz "wait="
guest_payload: .ascii "bhyve-rs virtio_net guest frame"
.set guest_payload_len, . - guest_payload
host_prefix: .ascii "bhyve-rs host frame"
.set host_prefix_len, . - host_prefix
echo_prefix: .ascii "echo: "
.set echo_prefix_len, . - echo_prefix

.set F_MAC, 1 << 5
.set F_STATUS, 1 << 16
.set HDR_LEN, 12
.set RX_BUFS, 4
.set RX_LEN, 2048
.set ETH_MIN, 60
.set PAYLOAD_MAX, 64
.set ETHERTYPE_HI, 0x88
.set ETHERTYPE_LO, 0xb5

user_main:
    call    boot_done
    mov     edi, 0x1041
    call    vio_start
    mov     edi, F_MAC | F_STATUS
    call    vio_negotiate
    mov     r15, rax
    test    r15, F_MAC
    jz      nomac_bad
    mov     rsi, [rip + vio_devcfg]     // mac[6] at 0, 8-bit reads
    test    rsi, rsi
    jz      nomac_bad
    lea     rdi, [rip + mac]
    xor     ecx, ecx
1:  mov     al, [rsi + rcx]
    mov     [rdi + rcx], al
    inc     ecx
    cmp     ecx, 6
    jb      1b
    lea     rsi, [rip + msg_mac]
    call    puts
    lea     rsi, [rip + mac]
    call    vio_putmac
    test    r15, F_STATUS
    jz      2f
    lea     rsi, [rip + msg_link]
    call    puts
    mov     rax, [rip + vio_devcfg]
    movzx   eax, word ptr [rax + 6]
    and     eax, 1
    call    putdec
2:  call    putnl

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
3:  mov     esi, ebx
    call    rx_post
    inc     ebx
    cmp     ebx, RX_BUFS
    jb      3b
    lea     rdi, [rip + vio_q0]
    call    vq_kick

    // 1. Our broadcast frame.
    lea     rdi, [rip + txf]
    mov     ecx, 6
    mov     al, 0xff
    rep stosb
    lea     rsi, [rip + guest_payload]
    mov     ecx, guest_payload_len
    call    tx_frame
    lea     rsi, [rip + msg_sent]
    call    puts

    // 2. Wait for the host's frame, skipping anything else.
    call    vio_now
    mov     r13, [rip + wait_ms]
    imul    r13, r13, VIO_TICKS_PER_MS
    add     r13, rax                    // deadline
4:  call    vio_now
    cmp     rax, r13
    jae     timeout_bad
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
    je      timeout_bad
    cmp     eax, RX_BUFS
    jae     used_bad
    cmp     edx, RX_LEN
    ja      used_bad
    cmp     edx, HDR_LEN + 14
    jb      used_bad
    mov     r12d, eax                   // buffer index
    mov     r14d, edx                   // bytes: header + frame
    inc     qword ptr [rip + rx_frames]
    mov     eax, r12d
    shl     eax, 11                     // * RX_LEN
    lea     rbx, [rip + rx_bufs]
    add     rbx, rax                    // the buffer
    cmp     word ptr [rbx + 10], 1      // num_buffers
    jne     numbuf_bad
    cmp     byte ptr [rbx + HDR_LEN + 12], ETHERTYPE_HI
    jne     5f
    cmp     byte ptr [rbx + HDR_LEN + 13], ETHERTYPE_LO
    jne     5f
    lea     eax, [r14 - HDR_LEN - 14]   // payload length
    cmp     eax, host_prefix_len
    jb      5f
    lea     rsi, [rbx + HDR_LEN + 14]
    lea     rdi, [rip + host_prefix]
    mov     ecx, host_prefix_len
    repe cmpsb
    jne     5f
    lea     rsi, [rbx + HDR_LEN]        // destination: our MAC
    lea     rdi, [rip + mac]
    mov     ecx, 6
    repe cmpsb
    jne     dst_bad
    jmp     6f
5:  // not ours: count it, repost, wait again
    inc     qword ptr [rip + skipped]
    mov     esi, r12d
    call    rx_post
    lea     rdi, [rip + vio_q0]
    call    vq_kick
    jmp     4b

6:  // payload up to the first NUL, at most PAYLOAD_MAX bytes
    lea     eax, [r14 - HDR_LEN - 14]
    cmp     eax, PAYLOAD_MAX
    jbe     7f
    mov     eax, PAYLOAD_MAX
7:  xor     ecx, ecx
8:  cmp     ecx, eax
    jae     9f
    cmp     byte ptr [rbx + HDR_LEN + 14 + rcx], 0
    je      9f
    inc     ecx
    jmp     8b
9:  mov     r15d, ecx                   // payload length
    lea     rsi, [rip + msg_got]
    call    puts
    lea     eax, [r14 - HDR_LEN]
    call    putdec
    lea     rsi, [rip + msg_got2]
    call    puts
    lea     rsi, [rbx + HDR_LEN + 6]
    call    vio_putmac
    lea     rsi, [rip + msg_got3]
    call    puts
    lea     rsi, [rbx + HDR_LEN + 14]
    mov     edx, r15d
    call    vio_putn
    mov     al, '"'
    call    putc
    call    putnl

    // 3. The echo, to the sender.
    lea     rdi, [rip + txf]            // destination = the sender
    lea     rsi, [rbx + HDR_LEN + 6]
    mov     ecx, 6
    rep movsb
    lea     rdi, [rip + echo_payload]
    lea     rsi, [rip + echo_prefix]
    mov     ecx, echo_prefix_len
    rep movsb
    lea     rsi, [rbx + HDR_LEN + 14]
    mov     ecx, r15d
    rep movsb
    lea     rsi, [rip + echo_payload]
    lea     ecx, [r15 + echo_prefix_len]
    call    tx_frame
    lea     rsi, [rip + msg_echoed]
    call    puts
    lea     rsi, [rip + msg_skipped]
    call    puts
    mov     rax, [rip + skipped]
    call    putdec
    lea     rsi, [rip + msg_skipped2]
    call    puts
    mov     rax, [rip + rx_frames]
    call    putdec
    call    putnl
    cmp     dword ptr [rip + vio_msix_on], 0
    je      10f
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
10: mov     edi, EXIT_OK
    jmp     guest_exit

// rx_post: esi = buffer index: descriptor esi = rx_bufs + esi * RX_LEN, device-writable.
rx_post:
    lea     rdi, [rip + vio_q0]
    mov     eax, esi
    shl     eax, 11
    lea     rdx, [rip + rx_bufs]
    add     rdx, rax
    mov     ecx, RX_LEN
    jmp     vq_post

// tx_frame: txf[0..6] = destination; rsi = payload, ecx = its length (<= 46 + PAYLOAD_MAX).
// Completes the frame (our MAC, EtherType, payload, zero padding to 60 bytes), sends
// [header][frame] on queue 1 and waits for the completion.
tx_frame:
    push    rbx
    mov     ebx, ecx
    lea     rdi, [rip + txf + 14]       // clear the payload area first
    push    rsi
    push    rcx
    xor     eax, eax
    mov     ecx, 128 - 14
    rep stosb
    pop     rcx
    pop     rsi
    lea     rdi, [rip + txf + 14]
    rep movsb
    lea     rsi, [rip + mac]
    lea     rdi, [rip + txf + 6]
    mov     ecx, 6
    rep movsb
    mov     byte ptr [rip + txf + 12], ETHERTYPE_HI
    mov     byte ptr [rip + txf + 13], ETHERTYPE_LO
    add     ebx, 14                     // frame length, at least ETH_MIN
    cmp     ebx, ETH_MIN
    jae     1f
    mov     ebx, ETH_MIN
1:  lea     rax, [rip + txhdr]
    mov     [rip + vb], rax
    mov     dword ptr [rip + vb + VB_LEN], HDR_LEN
    mov     dword ptr [rip + vb + VB_FLAGS], 0
    lea     rax, [rip + txf]
    mov     [rip + vb + 16], rax
    mov     [rip + vb + 16 + VB_LEN], ebx
    mov     dword ptr [rip + vb + 16 + VB_FLAGS], 0
    lea     rdi, [rip + vio_q1]
    lea     rsi, [rip + vb]
    mov     edx, 2
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

nomac_bad:
    lea     rsi, [rip + msg_nomac]
    jmp     fail
timeout_bad:
    lea     rsi, [rip + msg_skipped]
    call    puts
    mov     rax, [rip + skipped]
    call    putdec
    lea     rsi, [rip + msg_skipped2]
    call    puts
    mov     rax, [rip + rx_frames]
    call    putdec
    call    putnl
    lea     rsi, [rip + msg_timeout]
    jmp     fail
used_bad:
    lea     rsi, [rip + msg_used_bad]
    jmp     fail
numbuf_bad:
    lea     rsi, [rip + msg_hdr]
    call    puts
    mov     rsi, rbx
    mov     edx, HDR_LEN
    call    vio_hexdump
    lea     rsi, [rip + msg_hdr2]
    call    puts
    mov     eax, r14d
    call    putdec
    call    putnl
    lea     rsi, [rip + msg_numbuf]
    jmp     fail
dst_bad:
    lea     rsi, [rip + msg_dst]
    jmp     fail

msg_mac:    .asciz "virtio_net: mac "
msg_link:   .asciz " link "
msg_sent:   .asciz "virtio_net: sent broadcast frame \"bhyve-rs virtio_net guest frame\"\n"
msg_got:    .asciz "virtio_net: received "
msg_got2:   .asciz "-byte frame from "
msg_got3:   .asciz ": \""
msg_echoed: .asciz "virtio_net: echoed the payload to the sender\n"
msg_skipped: .asciz "virtio_net: skipped "
msg_skipped2: .asciz " other frames of "
msg_irq:    .asciz "virtio_net: MSI-X interrupts: rx "
msg_irq2:   .asciz ", tx "
msg_nomac:  .asciz "the device does not offer a MAC address"
msg_timeout: .asciz "no frame from the host within wait="
msg_used_bad: .asciz "a receive completion names an unknown buffer or a bad length"
msg_hdr:    .asciz "virtio_net: header "
msg_hdr2:   .asciz " used length "
msg_numbuf: .asciz "a received header's num_buffers is not 1"
msg_dst:    .asciz "the host's frame is not addressed to our MAC"

    .balign 8
wait_ms:    .quad 0
rx_frames:  .quad 0
skipped:    .quad 0
mac:        .fill 8, 1, 0
vb:         .fill 32, 1, 0
txhdr:      .fill 16, 1, 0              // virtio_net_hdr_v1: all zero (no offload)
txf:        .fill 128, 1, 0
echo_payload: .fill 128, 1, 0
    .balign 4096
rx_bufs:    .fill RX_BUFS * RX_LEN, 1, 0
