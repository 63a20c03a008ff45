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
// rread=N: then N random 4 KiB reads (xorshift64 of seed=, LBAs aligned to 8 sectors over the whole
// disk), qd= (1-16, default 1) requests in flight; swrite=N: then N sequential 1 MiB writes from
// sector wlba= (default 0; wrapping at the last whole MiB), wqd= (1-16, default 1) in flight, each
// 1 MiB buffer (the xorshift64 pattern of seed=) in segments of wseg= KiB (power of two, default
// 1024, halved while above size_max; count <= seg_max and chains fit the queue), then a FLUSH.
// Each timed with the TSC (calibrated against the PM timer over 100 ms) from the first notify to
// the last completion (for swrite: the FLUSH's), the PM timer alongside; completions by polling the
// used ring, or with msix=1 by waiting for the queue's interrupt before reaping. Prints
//     BENCH rread ops=N qd=Q ns=T pm_ns=P iops=X irqs=K
//     BENCH swrite ops=N bytes=B qd=Q segs=S ns=T writes_ns=W pm_ns=P mbps=Y irqs=K
// (mbps: 10^6 bytes per second; irqs: interrupts on queue 0 during the run). pmbits= (24 or
// default 32): the PM timer's width for these timings (QEMU's PIIX4 timer has 24 bits and wraps every
// 4.7 s; wraps between the start and end readings are counted from the TSC). The data buffers sit
// at guest-physical 32 MiB (BENCH_WBUF, BENCH_RBUF): the guest needs 64 MiB of memory.
// Parameters: lba= (default 8), n= (1-16, default 8), seed= (default 1), ro=, bench=, rread=, qd=,
// swrite=, wqd=, wseg=, wlba=, pmbits=; slot=, msix=, pmport= (virtio.inc).
#define RING0_HOOK mov al, 0xff ; out 0x21, al ; out 0xa1, al ; jmp irq_enter_user
#include "rt.inc"
#include "rt_irq.inc"
#include "virtio.inc"

.set F_SIZE_MAX, 1 << 1
.set F_SEG_MAX, 1 << 2
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
.set QUEUE_SIZE, 64
.set MAX_QD, 16
.set BENCH_WBUF, 0x2000000              // 1 MiB write buffer
.set BENCH_RBUF, 0x2100000              // MAX_QD x 4 KiB read buffers
.set RREAD_LEN, 4096
.set SWRITE_LEN, 0x100000

user_main:
    call    boot_done
    mov     edi, 0x1042
    call    vio_start
    mov     edi, F_RO | F_FLUSH | F_SIZE_MAX | F_SEG_MAX
    call    vio_negotiate
    mov     r15, rax                    // negotiated features
    lea     rdi, [rip + vio_q0]
    xor     esi, esi
    mov     edx, QUEUE_SIZE
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
3:  call    blk_benches
    cmp     dword ptr [rip + vio_msix_on], 0
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

// ---------------------------------------------------------------------------------------------
// Benchmarks (rread=, swrite=). Slot k of the qd in flight owns descriptors k*chain ..
// k*chain + chain - 1 (header, data segments, status), built once; a submission rewrites only the
// slot's header and status byte and publishes its head. Completions come back in any order.

// blk_benches: rread=N, then swrite=N, each if given.
blk_benches:
    push    rbx
    push    r12
    push    r13
    push    r14
    push    r15
    lea     rdi, [rip + key_rread]
    xor     esi, esi
    call    arg_u64
    mov     r12, rax
    lea     rdi, [rip + key_swrite]
    xor     esi, esi
    call    arg_u64
    mov     r13, rax
    mov     rax, r12
    or      rax, r13
    jz      9f
    call    bp_init
    call    tsc_calibrate
    test    r12, r12
    jz      1f
    mov     rdi, r12
    call    bench_rread
1:  test    r13, r13
    jz      9f
    mov     rdi, r13
    call    bench_swrite
9:  pop     r15
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

// tsc_now: rax = the time-stamp counter. Clobbers rdx.
tsc_now:
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    ret

// bp_init: pmbits= (24 or 32, default 32) sets the PM timer mask; takes a first reading.
bp_init:
    lea     rdi, [rip + key_pmbits]
    mov     esi, 32
    call    arg_u64
    mov     ecx, 0xffffffff
    cmp     rax, 32
    je      1f
    mov     ecx, 0xffffff
    cmp     rax, 24
    jne     8f
1:  mov     [rip + bp_mask], ecx
    mov     edx, [rip + vio_pm_port]
    in      eax, dx
    and     eax, ecx
    mov     [rip + bp_last], eax
    ret
8:  lea     rsi, [rip + msg_pmbits_bad]
    jmp     fail

// bp_now: rax = PM timer ticks, extended to 64 bits over a pmbits= wide counter (call at least
// once per wrap period, else see bench_stop). Clobbers rcx, rdx.
bp_now:
    mov     edx, [rip + vio_pm_port]
    in      eax, dx
    and     eax, [rip + bp_mask]
    mov     ecx, eax
    sub     eax, [rip + bp_last]
    and     eax, [rip + bp_mask]
    mov     [rip + bp_last], ecx
    add     rax, [rip + bp_total]
    mov     [rip + bp_total], rax
    ret

// tsc_calibrate: counts TSC ticks over 100 ms of the PM timer. Each end is the best of 8 samples
// (pm_tsc_sample): a PM read is an exit, and a host preemption inside one would skew the figure.
// Sets cal_tsc / cal_ns and the timeout in TSC ticks; prints the TSC frequency.
tsc_calibrate:
    call    pm_tsc_sample
    mov     rbx, rax                    // PM at the start
    mov     r14, rdx                    // TSC at the start
    lea     r15, [rbx + 100 * VIO_TICKS_PER_MS]
1:  mov     ecx, 4096
2:  pause
    dec     ecx
    jnz     2b
    call    bp_now
    cmp     rax, r15
    jb      1b
    call    pm_tsc_sample
    sub     rax, rbx
    mov     r15, rax                    // PM ticks elapsed
    mov     [rip + cal_pm], rax
    mov     rax, rdx
    sub     rax, r14
    jbe     8f
    mov     [rip + cal_tsc], rax
    mov     rax, r15
    call    pm_to_ns
    mov     [rip + cal_ns], rax
    mov     rax, [rip + cal_tsc]
    imul    rax, rax, TIMEOUT_MS / 100
    mov     [rip + tsc_timeout], rax
    lea     rsi, [rip + msg_tsc]
    call    puts
    mov     rax, [rip + cal_tsc]
    mov     rcx, 1000000000
    mul     rcx
    div     qword ptr [rip + cal_ns]
    call    putdec
    call    putnl
    ret
8:  lea     rsi, [rip + msg_tsc_bad]
    jmp     fail

// pm_tsc_sample: rax = a PM timer reading (bp_now), rdx = the TSC at it: the midpoint of the TSC
// read just before and just after, from the one of 8 readings with the narrowest bracket.
pm_tsc_sample:
    push    rbx
    push    r12
    push    r13
    push    r14
    push    r15
    mov     r12, -1                     // narrowest bracket so far
    mov     r15d, 8
1:  call    tsc_now
    mov     rbx, rax
    call    bp_now
    mov     r13, rax
    call    tsc_now
    sub     rax, rbx                    // bracket
    cmp     rax, r12
    jae     2f
    mov     r12, rax
    shr     rax, 1
    add     rax, rbx
    mov     r14, rax                    // TSC midpoint
    mov     [rip + cal_pm_best], r13
2:  dec     r15d
    jnz     1b
    mov     rax, [rip + cal_pm_best]
    mov     rdx, r14
    pop     r15
    pop     r14
    pop     r13
    pop     r12
    pop     rbx
    ret

// pm_to_ns: rax = PM timer ticks. rax = nanoseconds.
pm_to_ns:
    mov     rcx, 1000000000
    mul     rcx
    mov     ecx, VIO_PM_HZ
    div     rcx
    ret

// tsc_to_ns: rax = TSC ticks. rax = nanoseconds (by the calibration).
tsc_to_ns:
    mul     qword ptr [rip + cal_ns]
    div     qword ptr [rip + cal_tsc]
    ret

// arg_qd: rdi = key. rax = its value (default 1), 1..MAX_QD, else fails.
arg_qd:
    mov     esi, 1
    call    arg_u64
    test    rax, rax
    jz      1f
    cmp     rax, MAX_QD
    ja      1f
    ret
1:  lea     rsi, [rip + msg_qd_bad]
    jmp     fail

// bench_rread: rdi = number of reads.
bench_rread:
    mov     [rip + b_n], rdi
    lea     rdi, [rip + key_qd]
    call    arg_qd
    mov     [rip + b_qd], rax
    mov     dword ptr [rip + b_type], T_IN
    mov     qword ptr [rip + b_nseg], 1
    mov     qword ptr [rip + b_seglen], RREAD_LEN
    mov     qword ptr [rip + b_base], BENCH_RBUF
    mov     qword ptr [rip + b_stride], RREAD_LEN
    mov     qword ptr [rip + b_dflags], VD_WRITE
    mov     qword ptr [rip + b_explen], RREAD_LEN + 1
    mov     rax, [rip + seed]
    mov     rcx, 0x9E3779B97F4A7C15
    xor     rax, rcx
    jnz     1f
    inc     rax                         // xorshift64 needs a non-zero state
1:  mov     [rip + b_xs], rax
    mov     rax, [rip + capacity]
    shr     rax, 3                      // 4 KiB blocks
    jz      8f
    mov     [rip + b_blocks], rax
    call    bench_build
    call    bench_run
    lea     rsi, [rip + msg_b_rread]
    call    puts
    lea     rsi, [rip + msg_b_ops]
    mov     rax, [rip + b_n]
    call    put_kv
    lea     rsi, [rip + msg_b_qd]
    mov     rax, [rip + b_qd]
    call    put_kv
    call    put_times
    lea     rsi, [rip + msg_b_iops]
    mov     rax, [rip + b_n]
    mov     rcx, 1000000000
    mul     rcx
    div     qword ptr [rip + b_ns]
    call    put_kv
    lea     rsi, [rip + msg_b_irqs]
    mov     rax, [rip + b_irqs]
    call    put_kv
    jmp     putnl
8:  lea     rsi, [rip + msg_small]
    jmp     fail

// bench_swrite: rdi = number of 1 MiB writes; then a FLUSH.
bench_swrite:
    mov     [rip + b_n], rdi
    test    qword ptr [rip + vio_features], F_FLUSH
    jz      noflush_bad
    lea     rdi, [rip + key_wqd]
    call    arg_qd
    mov     [rip + b_qd], rax
    mov     dword ptr [rip + b_type], T_OUT
    // Segment length: wseg= KiB (power of two, 1..1024), halved while above size_max.
    lea     rdi, [rip + key_wseg]
    mov     esi, 1024
    call    arg_u64
    test    rax, rax
    jz      7f
    cmp     rax, 1024
    ja      7f
    lea     rcx, [rax - 1]
    test    rcx, rax
    jnz     7f
    shl     rax, 10
    test    qword ptr [rip + vio_features], F_SIZE_MAX
    jz      2f
    mov     rcx, [rip + vio_devcfg]
    mov     ecx, [rcx + 8]              // size_max
1:  cmp     rax, rcx
    jbe     2f
    shr     rax, 1
    cmp     rax, 512
    jb      7f
    jmp     1b
2:  mov     [rip + b_seglen], rax
    mov     rcx, rax
    mov     eax, SWRITE_LEN
    xor     edx, edx
    div     rcx
    mov     [rip + b_nseg], rax
    test    qword ptr [rip + vio_features], F_SEG_MAX
    jz      3f
    mov     rcx, [rip + vio_devcfg]
    mov     ecx, [rcx + 12]             // seg_max
    cmp     rax, rcx
    ja      6f
3:  mov     qword ptr [rip + b_base], BENCH_WBUF
    mov     qword ptr [rip + b_stride], 0
    mov     qword ptr [rip + b_dflags], 0
    mov     qword ptr [rip + b_explen], 1
    lea     rdi, [rip + key_wlba]
    xor     esi, esi
    call    arg_u64
    mov     [rip + b_wlba], rax
    mov     rcx, [rip + capacity]
    sub     rcx, rax
    jb      8f
    shr     rcx, 11                     // whole MiB from wlba= on
    jz      8f
    mov     [rip + b_wrap], rcx
    mov     rdi, BENCH_WBUF
    mov     esi, SWRITE_LEN
    mov     rdx, [rip + seed]
    call    vio_pattern
    call    bench_build
    call    bench_run
    mov     rax, [rip + b_ns]
    mov     [rip + b_wns], rax
    // The FLUSH, by blk_req (one request; its wait reads the PM timer once). The MSI-X bookkeeping
    // of vq_wait first catches up with the interrupts the run took.
    lea     rdi, [rip + vio_q0]
    mov     rcx, [rdi + VQ_USED]
    movzx   eax, word ptr [rcx + 2]
    mov     [rdi + VQ_IRQUPTO], ax
    mov     rax, [rip + irq_counts + (VIO_VEC_BASE + 1) * 8]
    mov     [rdi + VQ_IRQS], rax
    mov     edi, T_FLUSH
    xor     esi, esi
    xor     edx, edx
    xor     ecx, ecx
    xor     r8d, r8d
    call    blk_req
    cmp     eax, S_OK
    jne     status_bad
    call    bench_stop
    lea     rsi, [rip + msg_b_swrite]
    call    puts
    lea     rsi, [rip + msg_b_ops]
    mov     rax, [rip + b_n]
    call    put_kv
    lea     rsi, [rip + msg_b_bytes]
    mov     rax, [rip + b_n]
    shl     rax, 20
    call    put_kv
    lea     rsi, [rip + msg_b_qd]
    mov     rax, [rip + b_qd]
    call    put_kv
    lea     rsi, [rip + msg_b_segs]
    mov     rax, [rip + b_nseg]
    call    put_kv
    call    put_times
    lea     rsi, [rip + msg_b_wns]
    mov     rax, [rip + b_wns]
    call    put_kv
    lea     rsi, [rip + msg_b_mbps]
    mov     rax, [rip + b_n]
    shl     rax, 20
    mov     ecx, 1000
    mul     rcx
    div     qword ptr [rip + b_ns]
    call    put_kv
    lea     rsi, [rip + msg_b_irqs]
    mov     rax, [rip + b_irqs]
    call    put_kv
    jmp     putnl
6:  lea     rsi, [rip + msg_segmax]
    jmp     fail
7:  lea     rsi, [rip + msg_wseg_bad]
    jmp     fail
8:  lea     rsi, [rip + msg_small]
    jmp     fail

// put_kv: rsi = key (" ops="), rax = value.
put_kv:
    push    rax
    call    puts
    pop     rax
    jmp     putdec

// put_times: " ns=T pm_ns=P".
put_times:
    lea     rsi, [rip + msg_b_ns]
    mov     rax, [rip + b_ns]
    call    put_kv
    lea     rsi, [rip + msg_b_pmns]
    mov     rax, [rip + b_pmns]
    jmp     put_kv

// bench_build: writes the descriptors of slots 0 .. b_qd - 1: chain = b_nseg + 2 descriptors
// (header R, b_nseg data segments of b_seglen at b_base + slot * b_stride with b_dflags, status
// W); checks that they fit the queue.
bench_build:
    push    rbx
    push    r12
    push    r13
    mov     rax, [rip + b_nseg]
    add     rax, 2
    mov     [rip + b_chain], rax
    imul    rax, [rip + b_qd]
    movzx   ecx, word ptr [rip + vio_q0 + VQ_SIZE]
    cmp     rax, rcx
    ja      8f
    mov     r8, [rip + vio_q0 + VQ_DESC]
    xor     ebx, ebx                    // slot
1:  cmp     rbx, [rip + b_qd]
    jae     9f
    mov     r12, rbx
    imul    r12, [rip + b_chain]        // the slot's head
    mov     eax, r12d
    shl     eax, 4
    lea     r9, [r8 + rax]
    lea     rax, [rip + b_hdrs]
    mov     rdx, rbx
    shl     rdx, 4
    add     rax, rdx
    mov     [r9], rax
    mov     dword ptr [r9 + 8], 16
    mov     word ptr [r9 + 12], VD_NEXT
    lea     eax, [r12 + 1]
    mov     [r9 + 14], ax
    mov     r10, rbx
    imul    r10, [rip + b_stride]
    add     r10, [rip + b_base]         // data address
    xor     r13d, r13d                  // segment
2:  inc     r12d
    mov     eax, r12d
    shl     eax, 4
    lea     r9, [r8 + rax]
    mov     [r9], r10
    mov     rax, [rip + b_seglen]
    mov     [r9 + 8], eax
    add     r10, rax
    mov     rax, [rip + b_dflags]
    or      eax, VD_NEXT
    mov     [r9 + 12], ax
    lea     eax, [r12 + 1]
    mov     [r9 + 14], ax
    inc     r13
    cmp     r13, [rip + b_nseg]
    jb      2b
    inc     r12d
    mov     eax, r12d
    shl     eax, 4
    lea     r9, [r8 + rax]
    lea     rax, [rip + b_status]
    add     rax, rbx
    mov     [r9], rax
    mov     dword ptr [r9 + 8], 1
    mov     word ptr [r9 + 12], VD_WRITE
    mov     word ptr [r9 + 14], 0
    inc     rbx
    jmp     1b
8:  lea     rsi, [rip + msg_chains]
    jmp     fail
9:  pop     r13
    pop     r12
    pop     rbx
    ret

// bench_submit: rdi = slot. Header (b_type; sector: the next random 4 KiB block for reads, the
// next MiB for writes), status 0xff, publishes the slot's head. Clobbers rax, rcx, rdx, r8, rdi.
bench_submit:
    lea     r8, [rip + b_hdrs]
    mov     rax, rdi
    shl     rax, 4
    add     r8, rax
    mov     eax, [rip + b_type]
    mov     [r8], eax
    mov     dword ptr [r8 + 4], 0
    cmp     eax, T_IN
    jne     2f
    mov     rax, [rip + b_xs]
    mov     rcx, rax
    shl     rcx, 13
    xor     rax, rcx
    mov     rcx, rax
    shr     rcx, 7
    xor     rax, rcx
    mov     rcx, rax
    shl     rcx, 17
    xor     rax, rcx
    mov     [rip + b_xs], rax
    xor     edx, edx
    div     qword ptr [rip + b_blocks]
    lea     rax, [rdx * 8]
    jmp     3f
2:  mov     rax, [rip + b_submitted]
    xor     edx, edx
    div     qword ptr [rip + b_wrap]
    mov     rax, rdx
    shl     rax, 11
    add     rax, [rip + b_wlba]
3:  mov     [r8 + 8], rax
    lea     rax, [rip + b_status]
    mov     byte ptr [rax + rdi], 0xff
    bts     qword ptr [rip + b_busy], rdi
    inc     qword ptr [rip + b_submitted]
    mov     rax, rdi
    imul    rax, [rip + b_chain]
    lea     rdi, [rip + vio_q0]
    jmp     vq_publish

// bench_reap: takes every used element waiting: checks it (a busy slot's head, status OK, used
// length b_explen), and resubmits the slot while requests remain (b_kick = 1). eax = count.
bench_reap:
    push    rbx
    push    r12
    xor     r12d, r12d
1:  lea     rdi, [rip + vio_q0]
    mov     r10, [rdi + VQ_USED]
    movzx   eax, word ptr [r10 + 2]
    movzx   ecx, word ptr [rdi + VQ_USEEN]
    cmp     eax, ecx
    je      9f
    movzx   edx, word ptr [rdi + VQ_SIZE]
    dec     edx
    and     edx, ecx
    mov     eax, [r10 + 4 + rdx * 8]    // id
    mov     ebx, [r10 + 8 + rdx * 8]    // len
    inc     ecx
    mov     [rdi + VQ_USEEN], cx
    xor     edx, edx
    div     dword ptr [rip + b_chain]
    test    edx, edx
    jnz     7f
    cmp     rax, [rip + b_qd]
    jae     7f
    btr     qword ptr [rip + b_busy], rax
    jnc     7f
    lea     rcx, [rip + b_status]
    movzx   ecx, byte ptr [rcx + rax]
    test    ecx, ecx
    jnz     6f
    cmp     rbx, [rip + b_explen]
    jne     5f
    inc     qword ptr [rip + b_completed]
    inc     r12d
    mov     rcx, [rip + b_submitted]
    cmp     rcx, [rip + b_n]
    jae     1b
    mov     rdi, rax
    call    bench_submit
    mov     byte ptr [rip + b_kick], 1
    jmp     1b
9:  mov     eax, r12d
    pop     r12
    pop     rbx
    ret
5:  mov     edx, ebx
    jmp     len_bad
6:  mov     eax, ecx
    jmp     status_bad
7:  lea     rsi, [rip + vio_msg_wrongid]
    jmp     fail

// bench_run: b_n requests over the slots built, b_qd in flight; sets b_ns / b_pmns (first notify
// to last completion; with MSI-X: to the interrupt after it) and b_irqs. Then bench_stop may be
// called again to extend the times (swrite's FLUSH).
bench_run:
    push    rbx
    push    r12
    push    r13
    xor     eax, eax
    mov     [rip + b_submitted], rax
    mov     [rip + b_completed], rax
    mov     [rip + b_busy], rax
    mov     rax, [rip + irq_counts + (VIO_VEC_BASE + 1) * 8]
    mov     [rip + b_irq0], rax
    mov     r13, rax                    // interrupts seen
    xor     ebx, ebx
1:  cmp     rbx, [rip + b_qd]
    jae     2f
    cmp     rbx, [rip + b_n]
    jae     2f
    mov     rdi, rbx
    call    bench_submit
    inc     rbx
    jmp     1b
2:  call    bp_now
    mov     [rip + b_pm0], rax
    call    tsc_now
    mov     [rip + b_t0], rax
    lea     rdi, [rip + vio_q0]
    call    vq_kick
3:  mov     rax, [rip + b_completed]
    cmp     rax, [rip + b_n]
    jae     8f
    call    tsc_now
    mov     r12, rax
    add     r12, [rip + tsc_timeout]    // deadline
4:  mov     ebx, 256
5:  cmp     dword ptr [rip + vio_msix_on], 0
    je      6f
    mov     rax, [rip + irq_counts + (VIO_VEC_BASE + 1) * 8]
    cmp     rax, r13
    jne     7f
    jmp     61f
6:  mov     rcx, [rip + vio_q0 + VQ_USED]
    movzx   eax, word ptr [rcx + 2]
    cmp     ax, [rip + vio_q0 + VQ_USEEN]
    jne     7f
61: pause
    dec     ebx
    jnz     5b
    call    tsc_now
    cmp     rax, r12
    jb      4b
    lea     rsi, [rip + vio_msg_timeout]
    jmp     fail
7:  mov     r13, [rip + irq_counts + (VIO_VEC_BASE + 1) * 8]
    mov     byte ptr [rip + b_kick], 0
    call    bench_reap
    cmp     byte ptr [rip + b_kick], 0
    je      3b
    lea     rdi, [rip + vio_q0]
    call    vq_kick
    jmp     3b
8:  pop     r13
    pop     r12
    pop     rbx
    // fall through

// bench_stop: b_ns, b_pmns = now - start; b_irqs = interrupts on queue 0 since the start.
// The PM span: whole wrap periods the two readings cannot see are counted from the TSC span (the
// TSC's figure in PM ticks, rounded to the nearest number of periods).
bench_stop:
    push    rbx
    call    tsc_now
    sub     rax, [rip + b_t0]
    mov     rbx, rax                    // TSC span
    call    tsc_to_ns
    mov     [rip + b_ns], rax
    call    bp_now
    sub     rax, [rip + b_pm0]
    mov     r8, rax                     // PM span modulo the period
    mov     rax, rbx
    mul     qword ptr [rip + cal_pm]
    div     qword ptr [rip + cal_tsc]   // the TSC span in PM ticks
    mov     r9d, [rip + bp_mask]
    inc     r9                          // the period
    sub     rax, r8
    jbe     1f
    mov     rcx, r9
    shr     rcx, 1
    add     rax, rcx
    xor     edx, edx
    div     r9                          // missed periods
    mul     r9
    add     r8, rax
1:  mov     rax, r8
    pop     rbx
    call    pm_to_ns
    mov     [rip + b_pmns], rax
    mov     rax, [rip + irq_counts + (VIO_VEC_BASE + 1) * 8]
    sub     rax, [rip + b_irq0]
    mov     [rip + b_irqs], rax
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
key_rread:  .asciz "rread="
key_qd:     .asciz "qd="
key_swrite: .asciz "swrite="
key_wqd:    .asciz "wqd="
key_wseg:   .asciz "wseg="
key_wlba:   .asciz "wlba="
key_pmbits: .asciz "pmbits="
msg_pmbits_bad: .asciz "pmbits= must be 24 or 32"
msg_tsc:    .asciz "virtio_blk: TSC Hz "
msg_b_rread: .asciz "BENCH rread"
msg_b_swrite: .asciz "BENCH swrite"
msg_b_ops:  .asciz " ops="
msg_b_bytes: .asciz " bytes="
msg_b_qd:   .asciz " qd="
msg_b_segs: .asciz " segs="
msg_b_ns:   .asciz " ns="
msg_b_pmns: .asciz " pm_ns="
msg_b_wns:  .asciz " writes_ns="
msg_b_iops: .asciz " iops="
msg_b_mbps: .asciz " mbps="
msg_b_irqs: .asciz " irqs="
msg_tsc_bad: .asciz "the TSC does not advance"
msg_qd_bad: .asciz "qd= and wqd= must be 1-16"
msg_small:  .asciz "the disk is too small for the benchmark (rread: 8 sectors; swrite: 1 MiB from wlba=)"
msg_wseg_bad: .asciz "wseg= must be a power of two 1-1024 (KiB), at least 512 bytes after size_max"
msg_segmax: .asciz "1 MiB in wseg= segments needs more than the device's seg_max"
msg_chains: .asciz "wqd= (or qd=) chains do not fit the queue (64 descriptors): raise wseg= or lower the depth"
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
cal_tsc:    .quad 0                     // TSC ticks over the calibration
cal_ns:     .quad 0                     // its nanoseconds by the PM timer
tsc_timeout: .quad 0
cal_pm_best: .quad 0
cal_pm:     .quad 0                     // PM ticks over the calibration
bp_total:   .quad 0
bp_last:    .long 0
bp_mask:    .long 0xffffffff
b_n:        .quad 0                     // requests in the run
b_qd:       .quad 0                     // in flight at most
b_type:     .quad 0
b_nseg:     .quad 0
b_seglen:   .quad 0
b_base:     .quad 0
b_stride:   .quad 0
b_dflags:   .quad 0
b_explen:   .quad 0                     // used length expected
b_chain:    .quad 0                     // descriptors per slot
b_xs:       .quad 0                     // xorshift64 state (reads)
b_blocks:   .quad 0                     // 4 KiB blocks on the disk
b_wlba:     .quad 0
b_wrap:     .quad 0                     // MiB from wlba= to the end
b_submitted: .quad 0
b_completed: .quad 0
b_busy:     .quad 0                     // a bit per slot in flight
b_irq0:     .quad 0
b_t0:       .quad 0
b_pm0:      .quad 0
b_ns:       .quad 0
b_pmns:     .quad 0
b_wns:      .quad 0
b_irqs:     .quad 0
b_kick:     .quad 0
b_status:   .fill MAX_QD, 1, 0
    .balign 16
b_hdrs:     .fill MAX_QD * 16, 1, 0
    .balign 4096
wbuf:       .fill MAX_SECTORS * 512, 1, 0
rbuf:       .fill MAX_SECTORS * 512, 1, 0
