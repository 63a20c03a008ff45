// virtio_rng: drives a virtio-rnd device (1af4:1044) with virtio.inc: two 64-byte requests on
// queue 0 (one device-writable buffer each); each must come back with 1-64 bytes, neither all zero,
// and the two must differ. Prints both in hex ("virtio_rng: 1: ...", "virtio_rng: 2: ...").
// Parameters: slot=, msix=, pmport= (virtio.inc).
#define RING0_HOOK mov al, 0xff ; out 0x21, al ; out 0xa1, al ; jmp irq_enter_user
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
1:  mov     edi, EXIT_OK
    jmp     guest_exit

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

    .balign 16
rng_vb:     .fill 16, 1, 0
rng_buf1:   .fill RNG_BYTES, 1, 0
rng_buf2:   .fill RNG_BYTES, 1, 0
