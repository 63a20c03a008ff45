//! Our own small test guests, assembled from source (`asm/`) by the build script.
//!
//! Each is a Multiboot v1 ELF32 image: a few dozen ring-0 instructions enter long mode with static
//! tables, then the workload runs in ring 3 and does port I/O directly (IOPL 3 plus an all-zero TSS
//! I/O bitmap). Workload parameters come from the Multiboot command line (`n=COUNT`). They end through
//! the debug-exit port: a write of `v` ends the VM with status `(v << 1) | 1` — `0` (status 1) on
//! success, `0x7f` (status 255) on a failed check, `0x7e` (status 253) on an unexpected exception.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Exit status of a guest that passed (debug-exit value 0).
pub const STATUS_OK: i32 = 1;
/// Exit status of a guest whose own check failed (debug-exit value 0x7f).
pub const STATUS_FAIL: i32 = 0xff;
/// Exit status of a guest that took an unexpected exception (debug-exit value 0x7e).
pub const STATUS_EXCEPTION: i32 = 0xfd;

/// The image of guest `name`.
pub fn image(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, i)| *i)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader (a monitor
/// another test thread started on the same image) sees the old file or the new one, never a
/// truncated one.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes every guest image into `dir` as `NAME.elf` (`NAME.bzImage` for bzImage-shaped ones);
/// returns the paths.
pub fn write_all(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    GUESTS
        .iter()
        .map(|(n, img)| {
            let ext = if img.get(0x202..0x206) == Some(b"HdrS") {
                "bzImage"
            } else {
                "elf"
            };
            let p = dir.join(format!("{n}.{ext}"));
            write_atomically(&p, img)?;
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_a_multiboot_elf32_or_a_bzimage() {
        assert!(GUESTS.len() >= 2);
        for (name, img) in GUESTS {
            if img.len() > 0x206 && &img[0x202..0x206] == b"HdrS" {
                continue;
            }
            assert_eq!(&img[..4], b"\x7fELF", "{name}");
            assert_eq!(img[4], 1, "{name}: ELFCLASS32");
            // The Multiboot header sits 4-byte aligned in the first 8 KiB.
            let found = img[..img.len().min(8192)]
                .chunks_exact(4)
                .any(|w| w == 0x1BADB002u32.to_le_bytes());
            assert!(found, "{name}: no Multiboot header");
        }
        assert!(image("hello").is_some());
        assert!(image("nope").is_none());
    }
}
