// virtio_blk: drives a virtio-blk device (1af4:1042) with virtio.inc, one request at a time on
// queue 0 (chains: [header 16 R] [data R/W] [status 1 W]).
//
// ro=0 (default): F_RO must not be offered and FLUSH must be; writes n= sectors at sector lba= with
// the xorshift64 pattern of seed= (vio_pattern), flushes, reads them back into a buffer filled with
// 0xa5 and compares; a read at sector `capacity` must be answered IOERR; GET_ID prints the serial.
// ro=1: F_RO must be offered; the same write must be answered IOERR (status 1); the sectors are
// read and their FNV-1a printed (the host compares with the untouched image).
// bench=N: then N reads of the n sectors, and the mean round trip per request in microseconds.
// Prints capacity, features, statuses and "fnv1a 0x..." of the pattern and of what was read, so the
// host test can compare with the image file.
// Parameters: lba= (default 8), n= (1-16, default 8), seed= (default 1), ro=, bench=; slot=, msix=,
// pmport= (virtio.inc).
#define RING0_HOOK mov al, 0xff ; out 0x21, al ; out 0xa1, al ; jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"
#include "virtio.inc"

.set F_RO, 1 << 5
.set F_FLUSH, 1 << 9
.set T_IN, 0
.set T_OUT, 1
.set T_FLUSH, 4
.set T_GET_ID, 8
.set S_OK, 0
.set S_IOERR, 1
.set MAX_SECTORS, 16
.set TIMEOUT_MS, 5000

user_main:
    call    boot_done
    mov     edi, 0x1042
    call    vio_start
    mov     edi, F_RO | F_FLUSH
    call    vio_negotiate
    mov     r15, rax                    // negotiated features
    lea     rdi, [rip + vio_q0]
    xor     esi, esi
    mov     edx, 16
    lea     rcx, [rip + vio_ring0]
    call    vq_setup
    call    vio_driver_ok

    xor     edi, edi
    call    vio_cfg64                   // capacity (512-byte sectors)
    mov     [rip + capacity], rax
    lea     rsi, [rip + msg_capacity]
    call    puts
    mov     rax, [rip + capacity]
    call    putdec
    call    putnl

    lea     rdi, [rip + key_lba]
    mov     esi, 8
    call    arg_u64
    mov     [rip + lba], rax
    lea     rdi, [rip + key_n]
    mov     esi, 8
    call    arg_u64
    test    rax, rax
    jz      n_bad
    cmp     rax, MAX_SECTORS
    ja      n_bad
    shl     rax, 9
    mov     [rip + nbytes], rax
    shr     rax, 9
    add     rax, [rip + lba]
    cmp     rax, [rip + capacity]
    ja      range_bad
    lea     rdi, [rip + key_seed]
    mov     esi, 1
    call    arg_u64
    mov     [rip + seed], rax
    lea     rdi, [rip + wbuf]           // the pattern
    mov     rsi, [rip + nbytes]
    mov     rdx, [rip + seed]
    call    vio_pattern
    lea     rdi, [rip + key_ro]
    xor     esi, esi
    call    arg_u64
    test    rax, rax
    jnz     read_only

    // --- writable disk ---
    test    qword ptr [rip + vio_offered], F_RO
    jnz     ro_unexpected
    test    r15, F_FLUSH
    jz      noflush_bad
    lea     rsi, [rip + msg_pattern]
    call    puts
    lea     rsi, [rip + wbuf]
    mov     rdx, [rip + nbytes]
    call    vio_fnv1a
    call    puthex
    call    putnl

    mov     edi, T_OUT
    mov     rsi, [rip + lba]
    lea     rdx, [rip + wbuf]
    mov     rcx, [rip + nbytes]
    xor     r8d, r8d
    call    blk_req
    cmp     eax, S_OK
    jne     status_bad
    cmp     edx, 1
    jne     len_bad
    lea     rsi, [rip + msg_wrote]
    call    print_io

    mov     edi, T_FLUSH
    xor     esi, esi
    xor     edx, edx
    xor     ecx, ecx
    xor     r8d, r8d
    call    blk_req
    cmp     eax, S_OK
    jne     status_bad
    cmp     edx, 1
    jne     len_bad
    lea     rsi, [rip + msg_flushed]
    call    puts

    call    read_back
    lea     rsi, [rip + wbuf]
    lea     rdi, [rip + rbuf]
    mov     rcx, [rip + nbytes]
    repe cmpsb
    jne     compare_bad
    lea     rsi, [rip + msg_equal]
    call    puts
    lea     rsi, [rip + rbuf]
    mov     rdx, [rip + nbytes]
    call    vio_fnv1a
    call    puthex
    call    putnl

    // A read at sector `capacity` lies past the end: IOERR, nothing written but the status.
    mov     edi, T_IN
    mov     rsi, [rip + capacity]
    lea     rdx, [rip + rbuf]
    mov     ecx, 512
    mov     r8d, VD_WRITE
    call    blk_req
    cmp     eax, S_IOERR
    jne     past_end_bad
    lea     rsi, [rip + msg_past_end]
    call    puts
    mov     rax, [rip + capacity]
    call    putdec
    lea     rsi, [rip + msg_past_end2]
    call    puts

    // GET_ID: 20 bytes, NUL-padded.
    mov     edi, T_GET_ID
    xor     esi, esi
    lea     rdx, [rip + idbuf]
    mov     ecx, 20
    mov     r8d, VD_WRITE
    call    blk_req
    cmp     eax, S_OK
    jne     status_bad
    lea     rsi, [rip + msg_id]
    call    puts
    lea     rsi, [rip + idbuf]
    xor     edx, edx
1:  cmp     edx, 20                     // up to the first NUL
    jae     2f
    cmp     byte ptr [rsi + rdx], 0
    je      2f
    inc     edx
    jmp     1b
2:  call    vio_putn
    mov     al, '"'
    call    putc
    call    putnl
    jmp     finish

read_only:
    // --- read-only disk ---
    test    r15, F_RO
    jz      ro_missing
    mov     edi, T_OUT
    mov     rsi, [rip + lba]
    lea     rdx, [rip + wbuf]
    mov     rcx, [rip + nbytes]
    xor     r8d, r8d
    call    blk_req
    cmp     eax, S_IOERR
    jne     ro_write_bad
    lea     rsi, [rip + msg_ro_write]
    call    puts
    call    read_back
    lea     rsi, [rip + msg_ro_read]
    call    print_io
    lea     rsi, [rip + msg_fnv]
    call    puts
    lea     rsi, [rip + rbuf]
    mov     rdx, [rip + nbytes]
    call    vio_fnv1a
    call    puthex
    call    putnl

finish:
    lea     rdi, [rip + key_bench]
    xor     esi, esi
    call    arg_u64
    test    rax, rax
    jz      3f
    mov     r12, rax
    call    vio_now
    mov     r13, rax
    mov     rbx, r12
1:  mov     edi, T_IN
    mov     rsi, [rip + lba]
    lea     rdx, [rip + rbuf]
    mov     rcx, [rip + nbytes]
    mov     r8d, VD_WRITE
    call    blk_req
    cmp     eax, S_OK
    jne     status_bad
    dec     rbx
    jnz     1b
    call    vio_now
    sub     rax, r13                    // PM ticks for r12 requests
    imul    rax, rax, 1000000
    xor     edx, edx
    mov     ecx, VIO_PM_HZ
    div     rcx                         // microseconds in all
    mov     r13, rax
    lea     rsi, [rip + msg_bench]
    call    puts
    mov     rax, r12
    call    putdec
    lea     rsi, [rip + msg_bench2]
    call    puts
    mov     rax, [rip + nbytes]
    call    putdec
    lea     rsi, [rip + msg_bench3]
    call    puts
    mov     rax, r13
    call    putdec
    lea     rsi, [rip + msg_bench4]
    call    puts
    mov     rax, r13
    xor     edx, edx
    div     r12
    call    putdec
    lea     rsi, [rip + msg_bench5]
    call    puts
3:  cmp     dword ptr [rip + vio_msix_on], 0
    je      4f
    lea     rsi, [rip + msg_irq]
    call    puts
    mov     rax, [rip + requests]
    call    putdec
    lea     rsi, [rip + msg_irq2]
    call    puts
    xor     eax, eax
    call    vio_irq_total
    call    putdec
    call    putnl
4:  lea     rsi, [rip + msg_done]
    call    puts
    mov     edi, EXIT_OK
    jmp     guest_exit

// read_back: fills rbuf with 0xa5 and reads the n sectors at lba into it; status OK and used
// length n * 512 + 1 required.
read_back:
    lea     rdi, [rip + rbuf]
    mov     al, 0xa5
    mov     ecx, MAX_SECTORS * 512
    rep stosb
    mov     edi, T_IN
    mov     rsi, [rip + lba]
    lea     rdx, [rip + rbuf]
    mov     rcx, [rip + nbytes]
    mov     r8d, VD_WRITE
    call    blk_req
    cmp     eax, S_OK
    jne     status_bad
    mov     rax, [rip + nbytes]
    inc     rax
    cmp     rdx, rax
    jne     len_bad
    ret

// print_io: rsi = message; prints "<message> N sectors at sector L".
print_io:
    call    puts
    mov     rax, [rip + nbytes]
    shr     rax, 9
    call    putdec
    lea     rsi, [rip + msg_sectors_at]
    call    puts
    mov     rax, [rip + lba]
    call    putdec
    jmp     putnl

// blk_req: edi = type, rsi = sector, rdx = data buffer, ecx = data length (0: no data segment),
// r8d = data flags (0: device reads it, VD_WRITE: device writes it). Builds the chain
// [header R][data][status W], publishes, notifies, waits. eax = status byte, edx = used length.
blk_req:
    push    rbx
    mov     [rip + hdr], edi
    mov     dword ptr [rip + hdr + 4], 0
    mov     [rip + hdr + 8], rsi
    mov     byte ptr [rip + status], 0xff
    lea     rax, [rip + hdr]
    mov     [rip + vb], rax
    mov     dword ptr [rip + vb + VB_LEN], 16
    mov     dword ptr [rip + vb + VB_FLAGS], 0
    lea     rbx, [rip + vb + 16]
    mov     r9d, 2                      // descriptors
    test    ecx, ecx
    jz      1f
    mov     [rbx + VB_ADDR], rdx
    mov     [rbx + VB_LEN], ecx
    mov     [rbx + VB_FLAGS], r8d
    add     rbx, 16
    inc     r9d
1:  lea     rax, [rip + status]
    mov     [rbx + VB_ADDR], rax
    mov     dword ptr [rbx + VB_LEN], 1
    mov     dword ptr [rbx + VB_FLAGS], VD_WRITE
    lea     rdi, [rip + vio_q0]
    lea     rsi, [rip + vb]
    mov     edx, r9d
    call    vq_push
    mov     ebx, eax
    lea     rdi, [rip + vio_q0]
    call    vq_kick
    lea     rdi, [rip + vio_q0]
    mov     esi, TIMEOUT_MS
    mov     edx, ebx
    call    vq_wait_ok
    mov     edx, eax
    movzx   eax, byte ptr [rip + status]
    inc     qword ptr [rip + requests]
    pop     rbx
    ret

// Failures: print what came back, then fail.
status_bad:
    push    rax
    lea     rsi, [rip + msg_status]
    call    puts
    pop     rax
    call    putdec
    call    putnl
    lea     rsi, [rip + msg_status_bad]
    jmp     fail
len_bad:
    lea     rsi, [rip + msg_len]
    call    puts
    mov     eax, edx
    call    putdec
    call    putnl
    lea     rsi, [rip + msg_len_bad]
    jmp     fail
n_bad:
    lea     rsi, [rip + msg_n_bad]
    jmp     fail
range_bad:
    lea     rsi, [rip + msg_range_bad]
    jmp     fail
ro_unexpected:
    lea     rsi, [rip + msg_ro_unexpected]
    jmp     fail
noflush_bad:
    lea     rsi, [rip + msg_noflush]
    jmp     fail
compare_bad:
    lea     rsi, [rip + msg_compare]
    jmp     fail
past_end_bad:
    lea     rsi, [rip + msg_past_end_bad]
    jmp     fail
ro_missing:
    lea     rsi, [rip + msg_ro_missing]
    jmp     fail
ro_write_bad:
    push    rax
    lea     rsi, [rip + msg_status]
    call    puts
    pop     rax
    call    putdec
    call    putnl
    lea     rsi, [rip + msg_ro_write_bad]
    jmp     fail

key_lba:    .asciz "lba="
key_n:      .asciz "n="
key_seed:   .asciz "seed="
key_ro:     .asciz "ro="
key_bench:  .asciz "bench="
msg_capacity: .asciz "virtio_blk: capacity "
msg_pattern: .asciz "virtio_blk: pattern fnv1a "
msg_wrote:  .asciz "virtio_blk: write OK: "
msg_sectors_at: .asciz " sectors at sector "
msg_flushed: .asciz "virtio_blk: flush OK\n"
msg_equal:  .asciz "virtio_blk: read back equal, fnv1a "
msg_past_end: .asciz "virtio_blk: read at sector "
msg_past_end2: .asciz " (past the end) answered IOERR\n"
msg_id:     .asciz "virtio_blk: id \""
msg_ro_write: .asciz "virtio_blk: read-only: F_RO offered, write answered IOERR\n"
msg_ro_read: .asciz "virtio_blk: read-only: read OK: "
msg_fnv:    .asciz "virtio_blk: read-only: fnv1a "
msg_bench:  .asciz "virtio_blk: bench: "
msg_bench2: .asciz " reads of "
msg_bench3: .asciz " bytes in "
msg_bench4: .asciz " us, "
msg_bench5: .asciz " us per request\n"
msg_irq:    .asciz "virtio_blk: MSI-X: "
msg_irq2:   .asciz " requests, interrupts on queue 0: "
msg_done:   .asciz "virtio_blk: done\n"
msg_status: .asciz "virtio_blk: status "
msg_len:    .asciz "virtio_blk: used length "
msg_status_bad: .asciz "a request was not answered OK"
msg_len_bad: .asciz "a request's used length is wrong"
msg_n_bad:  .asciz "n= must be 1-16 sectors"
msg_range_bad: .asciz "lba= + n= lies past the capacity"
msg_ro_unexpected: .asciz "the device offers F_RO but ro=1 was not given"
msg_noflush: .asciz "the device does not offer FLUSH"
msg_compare: .asciz "the sectors read back differ from those written"
msg_past_end_bad: .asciz "a read past the end was not answered IOERR"
msg_ro_missing: .asciz "ro=1 but the device does not offer F_RO"
msg_ro_write_bad: .asciz "a write to the read-only device was not answered IOERR"

    .balign 8
capacity:   .quad 0
lba:        .quad 0
nbytes:     .quad 0
seed:       .quad 0
requests:   .quad 0
hdr:        .fill 16, 1, 0              // type u32, reserved u32, sector u64
vb:         .fill 48, 1, 0              // up to three buffer entries
status:     .byte 0
idbuf:      .fill 24, 1, 0
    .balign 4096
wbuf:       .fill MAX_SECTORS * 512, 1, 0
rbuf:       .fill MAX_SECTORS * 512, 1, 0
