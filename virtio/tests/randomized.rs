//! Deterministic randomized queue walks: the same harness as the cargo-fuzz targets
//! (`virtio::testing::fuzz_case`), fed from a seeded generator, so CI exercises it without
//! nightly. Inputs are semi-structured (descriptor tables, avail rings and request headers that
//! are mostly plausible, then mutated), so both the success paths and the error paths are reached;
//! the test fails if either is never reached.

use virtio::testing::{fuzz_case, FuzzDevice, FUZZ_MEM};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Guest memory from 0x1000 on, as `fuzz_case` lays it: queue q's descriptor table at
/// 0x1000 + 0x3000·q, its avail ring 0x1000 above, its used ring 0x2000 above; buffers at 0xa000+.
fn generate(rng: &mut XorShift, kind: FuzzDevice) -> Vec<u8> {
    let mut m = vec![0u8; FUZZ_MEM - 0x1000];
    let size_code = rng.below(8) as u8; // mostly valid sizes 1..64 (queue max 64 or 256)
    let size = 1u16 << (size_code % 7);
    let size_byte = if rng.below(10) == 0 {
        0x80 | rng.below(128) as u8
    } else {
        size_code
    };
    let nq = match kind {
        FuzzDevice::Net | FuzzDevice::Console => 2,
        _ => 1,
    };
    let notify_byte = rng.next() as u8 | 1;
    let put = |m: &mut Vec<u8>, gpa: u64, b: &[u8]| {
        let at = (gpa - 0x1000) as usize;
        if let Some(d) = m.get_mut(at..at + b.len()) {
            d.copy_from_slice(b);
        }
    };
    for q in 0..nq {
        let base = 0x1000 + 0x3000 * q;
        let n = size.min(16);
        for i in 0..n {
            let addr = 0xa000 + rng.below(0x5000);
            let len = match rng.below(8) {
                0 => 0,
                1 => rng.next() as u32,
                2 => 16,
                _ => 1 + rng.below(0x400) as u32,
            };
            let mut flags = match kind {
                FuzzDevice::Block | FuzzDevice::BlockReadOnly => {
                    if i % 3 == 2 {
                        2
                    } else {
                        1
                    }
                }
                _ => rng.below(4) as u16,
            };
            if rng.below(40) == 0 {
                flags |= 4;
            }
            let next = if rng.below(24) == 0 {
                rng.below(u64::from(size) * 2) as u16
            } else {
                (i + 1) % size
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            put(&mut m, base + 16 * u64::from(i), &d);
            // A plausible blk header at every buffer.
            let mut h = [0u8; 16];
            let t = [0u32, 1, 4, 8, 11, 13, 99][rng.below(7) as usize];
            h[..4].copy_from_slice(&t.to_le_bytes());
            h[8..].copy_from_slice(&rng.below(40).to_le_bytes());
            put(&mut m, addr, &h);
        }
        let avail = base + 0x1000;
        let count = match rng.below(10) {
            0 => rng.next() as u16,
            _ => rng.below(u64::from(n) + 1) as u16,
        };
        put(&mut m, avail + 2, &count.to_le_bytes());
        for s in 0..u64::from(size) {
            let head = if rng.below(40) == 0 {
                rng.next() as u16
            } else {
                (rng.below(u64::from(n)) * 3 % u64::from(n)) as u16
            };
            put(&mut m, avail + 4 + 2 * s, &head.to_le_bytes());
        }
    }
    // Bytes 0 and 1 (the low address bytes of queue 0's first descriptor) steer `fuzz_case`.
    m[0] = size_byte;
    m[1] = notify_byte;
    for _ in 0..rng.below(4) {
        let at = rng.below(m.len() as u64) as usize;
        m[at] = rng.next() as u8;
    }
    m.truncate(0x9000 + rng.below(0x6000) as usize);
    m
}

fn run(kind: FuzzDevice, seed: u64, cases: usize) {
    let mut rng = XorShift(seed);
    let (mut completed, mut reset, mut refused) = (0, 0, 0);
    for i in 0..cases {
        let data = if i % 10 == 0 {
            (0..rng.below(4096)).map(|_| rng.next() as u8).collect()
        } else {
            generate(&mut rng, kind)
        };
        match fuzz_case(kind, &data) {
            Ok(r) => {
                completed += usize::from(r.chains > 0);
                reset += usize::from(r.needs_reset);
                refused += usize::from(r.refused);
            }
            Err(e) => panic!("{kind:?} case {i} (seed {seed}): {e}"),
        }
    }
    eprintln!(
        "{kind:?}: {completed} with completions, {reset} needs-reset, {refused} refused of {cases}"
    );
    assert!(
        completed > cases / 20,
        "{kind:?}: too few cases completed a chain"
    );
    assert!(reset > cases / 50, "{kind:?}: error paths never reached");
    assert!(refused > 0, "{kind:?}: bad queue setups never refused");
}

#[test]
fn randomized_blk() {
    run(FuzzDevice::Block, 0x1234_5678, 600);
}

#[test]
fn randomized_blk_read_only() {
    run(FuzzDevice::BlockReadOnly, 0x9e37_79b9, 400);
}

#[test]
fn randomized_net() {
    run(FuzzDevice::Net, 0xdead_beef, 600);
}

#[test]
fn randomized_console() {
    run(FuzzDevice::Console, 0xfeed_f00d, 600);
}

#[test]
fn randomized_rng() {
    run(FuzzDevice::Rng, 0x0bad_cafe, 600);
}
