//! The per-CPU ring set and the memfd region, through the public API.
#![cfg(not(loom))]

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use pipeline::{
    AttachError, CompletionRecord, ExitFlags, ExitKind, ExitRecord, RingSet, SharedRegion, Side,
    Waiter,
};

fn shared_set(cpus: u32) -> (SharedRegion, RingSet) {
    let len = RingSet::required_size(cpus, 32, 16).unwrap();
    let shm = SharedRegion::create(len).unwrap();
    let set = RingSet::format(shm.region(), cpus, 32, 16).unwrap();
    (shm, set)
}

/// Overwrite one header word, as a hostile peer process could.
fn poke<T>(shm: &SharedRegion, offset: usize, value: T) {
    assert!(offset + size_of::<T>() <= shm.len());
    // SAFETY: in bounds of the live mapping (checked above).
    let p = unsafe { shm.region().as_ptr().add(offset) };
    // SAFETY: in bounds; header words are naturally aligned at the offsets the tests use;
    // nothing else accesses the mapping concurrently in these single-threaded tests.
    unsafe { p.cast::<T>().write(value) };
}

fn read(seq: u64, vcpu: u32) -> ExitRecord {
    ExitRecord {
        seq,
        addr: 0x60 + seq,
        offset: 0,
        data: 0,
        vcpu,
        device: 1,
        kind: ExitKind::PioRead.into(),
        size: 1,
        flags: ExitFlags::NEEDS_COMPLETION.bits(),
        reserved: 0,
    }
}

#[test]
fn every_cpu_has_its_own_pair_of_rings() {
    let (shm, set) = shared_set(4);
    assert_eq!(
        (set.cpus(), set.exit_capacity(), set.completion_capacity()),
        (4, 32, 16)
    );
    // A second mapping of the same memfd (as the device-model process would have).
    let fd = shm.fd().try_clone_to_owned().unwrap();
    let peer = SharedRegion::from_fd(fd).unwrap();
    assert_eq!(peer.len(), shm.len());
    let peer_set = RingSet::attach(peer.region()).unwrap();
    let mut vcpus: Vec<_> = (0..4).map(|cpu| set.vcpu_side(cpu).unwrap()).collect();
    let mut devs: Vec<_> = (0..4)
        .map(|cpu| peer_set.device_side(cpu).unwrap())
        .collect();
    for (cpu, v) in (0u32..).zip(&mut vcpus) {
        v.exits.try_push(read(u64::from(cpu) * 10, cpu)).unwrap();
    }
    let w = Waiter::default();
    for (cpu, d) in (0u32..).zip(&mut devs) {
        // Each device side sees exactly its CPU's record.
        let r = d.exits.try_pop().unwrap().unwrap();
        assert_eq!(r, read(u64::from(cpu) * 10, cpu));
        assert_eq!(d.exits.try_pop().unwrap(), None);
        d.completions
            .try_push(CompletionRecord {
                seq: r.seq,
                data: u64::from(cpu) + 100,
                vcpu: cpu,
                status: 0,
                reserved: 0,
            })
            .unwrap();
    }
    for (cpu, v) in (0u32..).zip(&mut vcpus) {
        let c = v
            .completions
            .wait_completion(u64::from(cpu) * 10, w.spin, w.timeout)
            .unwrap();
        assert_eq!(c.data, u64::from(cpu) + 100);
    }
}

#[test]
fn sides_are_claimed_once_and_cpus_are_range_checked() {
    let (_shm, set) = shared_set(2);
    let v = set.vcpu_side(0).unwrap();
    assert_eq!(
        set.vcpu_side(0).unwrap_err(),
        AttachError::AlreadyClaimed(Side::Producer)
    );
    let d = set.device_side(0).unwrap();
    assert_eq!(
        set.device_side(0).unwrap_err(),
        AttachError::AlreadyClaimed(Side::Consumer)
    );
    assert_eq!(
        set.vcpu_side(2).unwrap_err(),
        AttachError::CpuOutOfRange { cpu: 2, cpus: 2 }
    );
    drop((v, d));
    assert!(set.vcpu_side(0).is_ok());
}

#[test]
fn a_failed_claim_releases_the_half_it_took() {
    let (_shm, set) = shared_set(1);
    // Hold only the completion consumer, so vcpu_side takes the exit producer, then fails.
    let held = set.completion_ring(0).unwrap().consumer().unwrap();
    assert_eq!(
        set.vcpu_side(0).unwrap_err(),
        AttachError::AlreadyClaimed(Side::Consumer)
    );
    drop(held);
    assert!(set.vcpu_side(0).is_ok(), "the exit producer was released");
}

#[test]
fn attach_refuses_bad_regions_naming_the_problem() {
    let (shm, set) = shared_set(2);
    let len = RingSet::required_size(2, 32, 16).unwrap();
    drop(set);
    // Too small.
    let short = shm.region().subregion(0, len - 1).unwrap();
    assert_eq!(
        RingSet::attach(short).unwrap_err(),
        AttachError::TooSmall {
            needed: len,
            len: len - 1
        }
    );
    // Misaligned.
    let off = shm.region().subregion(64, len - 64).unwrap();
    assert!(matches!(
        RingSet::attach(off).unwrap_err(),
        AttachError::Misaligned { align: 128, .. }
    ));
    // Not a ring set: a ring set's CPU 0 exit ring is a ring, not a set.
    let ring_at = shm.region().subregion(128, len - 128).unwrap();
    assert!(matches!(
        RingSet::attach(ring_at).unwrap_err(),
        AttachError::BadMagic { .. }
    ));
    // A corrupted CPU count is refused, not trusted.
    // Offset 12 is the set header's `cpus` word.
    poke(&shm, 12, 0u32);
    assert_eq!(
        RingSet::attach(shm.region()).unwrap_err(),
        AttachError::BadCpuCount(0)
    );
    poke(&shm, 12, 1u32 << 20);
    assert!(RingSet::attach(shm.region()).is_err());
    // A bad magic.
    // Offset 0 is the magic word.
    poke(&shm, 0, 7u64);
    let err = RingSet::attach(shm.region()).unwrap_err();
    assert!(matches!(err, AttachError::BadMagic { found: 7, .. }));
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn a_corrupt_ring_inside_the_set_is_refused_when_claimed() {
    let (shm, set) = shared_set(1);
    // CPU 0's exit ring starts right after the 128-byte set header; its record tag is at +12.
    poke(&shm, 128 + 12, 0x4c4d_4343u32);
    assert!(matches!(
        set.vcpu_side(0).unwrap_err(),
        AttachError::RecordTypeMismatch { .. }
    ));
}

#[test]
fn from_fd_refuses_an_unsealed_memfd() {
    // A memfd that can still be shrunk under our mapping must be refused.
    // SAFETY: valid NUL-terminated name.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscall on our descriptor.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
    let err = SharedRegion::from_fd(fd).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    // And the regions we create are sealed: shrinking fails.
    let shm = SharedRegion::create(4096).unwrap();
    // SAFETY: plain syscall on a descriptor the region owns.
    let shrunk = unsafe { libc::ftruncate(shm.fd().as_fd().as_raw_fd(), 0) };
    assert_ne!(shrunk, 0);
    assert!(SharedRegion::create(0).is_err());
}

#[test]
fn the_mapping_outlives_the_region_value_while_handles_live() {
    let len = RingSet::required_size(1, 8, 8).unwrap();
    let shm = SharedRegion::create(len).unwrap();
    let set = RingSet::format(shm.region(), 1, 8, 8).unwrap();
    let mut v = set.vcpu_side(0).unwrap();
    let mut d = set.device_side(0).unwrap();
    drop((shm, set));
    v.exits.try_push(read(1, 0)).unwrap();
    assert_eq!(d.exits.try_pop().unwrap(), Some(read(1, 0)));
    assert!(matches!(
        v.completions
            .wait_completion(5, Duration::ZERO, Duration::from_millis(1)),
        Err(pipeline::RingError::Timeout)
    ));
}

/// Pages of `shm` that are resident (allocated), by `mincore`.
fn resident_pages(shm: &SharedRegion) -> usize {
    let page = 4096;
    let pages = shm.len().div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the mapping is live, page-aligned (mmap) and `shm.len()` long; `vec` holds one
    // byte per page.
    let rc = unsafe { libc::mincore(shm.region().as_ptr().cast(), shm.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn a_fresh_set_formatted_zeroed_allocates_slot_pages_only_as_records_use_them() {
    let (cpus, exits, completions) = (2, 1024, 1024);
    let len = RingSet::required_size(cpus, exits, completions).unwrap();
    let shm = SharedRegion::create(len).unwrap();
    assert_eq!(resident_pages(&shm), 0, "a fresh region is not populated");
    let set = RingSet::format_zeroed(shm.region(), cpus, exits, completions).unwrap();
    let total = len.div_ceil(4096);
    let after_format = resident_pages(&shm);
    // The set header and one header page per ring; not the slots.
    assert!(
        after_format <= 1 + 2 * cpus as usize * 2,
        "{after_format} of {total} pages resident after format_zeroed"
    );
    // Fully usable, through a second mapping too.
    let peer = SharedRegion::from_fd(shm.fd().try_clone_to_owned().unwrap()).unwrap();
    let peer_set = RingSet::attach(peer.region()).unwrap();
    let mut v = set.vcpu_side(1).unwrap();
    let mut d = peer_set.device_side(1).unwrap();
    for seq in 0..100 {
        v.exits.try_push(read(seq, 1)).unwrap();
        assert_eq!(d.exits.try_pop().unwrap(), Some(read(seq, 1)));
    }
    assert!(
        resident_pages(&shm) > after_format,
        "records touched slot pages"
    );
    assert!(resident_pages(&shm) < total);
    // `format` (for reused memory) writes every slot.
    let shm2 = SharedRegion::create(len).unwrap();
    RingSet::format(shm2.region(), cpus, exits, completions).unwrap();
    assert_eq!(resident_pages(&shm2), total);
}
