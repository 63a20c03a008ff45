//! Hostile and garbage images: every loader must refuse them with an error that names the
//! problem, and none may panic.

mod common;

use common::*;
use std::os::unix::fs::FileExt;

use loader::{
    detect, load_kernel, load_linux, load_multiboot, load_pvh, Blob, BootConfig, ImageKind,
    LoadedKernel, LoaderError,
};
use vm_memory::GuestMemoryMmap;

type Loaded = Result<LoadedKernel, LoaderError>;
type LoadFn = for<'k> fn(&GuestMemoryMmap, Blob<'k>, &BootConfig<'_>) -> Loaded;

const LOADERS: [(&str, LoadFn); 4] = [
    ("load_linux", |m, k, c| load_linux(m, k, c)),
    ("load_pvh", |m, k, c| load_pvh(m, k, c)),
    ("load_multiboot", |m, k, c| load_multiboot(m, k, c)),
    ("load_kernel", |m, k, c| load_kernel(m, k, c)),
];

/// A scratch file the images are also loaded from: a loader reading a file (headers with
/// `pread`, segments straight into guest memory) must decide exactly as it does on the bytes.
struct ImageFile(std::fs::File);

impl ImageFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "loader-hostile-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        ImageFile(file)
    }

    /// Runs `load` on `image` as bytes and as this file; both must give the same answer
    /// (the same kernel placement, or the same error message). Returns the bytes' answer.
    fn load_both(
        &self,
        name: &str,
        load: LoadFn,
        mem: &GuestMemoryMmap,
        image: &[u8],
        cfg: &BootConfig<'_>,
    ) -> Loaded {
        self.0.set_len(0).unwrap();
        self.0.write_all_at(image, 0).unwrap();
        let file = Blob::File {
            file: &self.0,
            len: image.len() as u64,
        };
        let from_file = load(mem, file, cfg);
        let from_bytes = load(mem, Blob::Bytes(image), cfg);
        match (&from_bytes, &from_file) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}: bytes and file placed differently"),
            (Err(a), Err(b)) => assert_eq!(
                a.to_string(),
                b.to_string(),
                "{name}: bytes and file refused differently"
            ),
            (a, b) => panic!("{name}: from bytes {a:?}, from a file {b:?}"),
        }
        from_bytes
    }
}

const RAM: u64 = 8 * MIB;

fn cfg() -> BootConfig<'static> {
    BootConfig::new(RAM, "console=ttyS0")
}

#[test]
fn random_bytes_are_refused_by_every_loader() {
    let mem = guest_mem(RAM);
    let file = ImageFile::new();
    let mut rng = Rng::new(0x5eed);
    for len in [0usize, 1, 3, 64, 0x1f0, 0x206, 0x1000, 0x2100, 0x10000] {
        for _ in 0..8 {
            let image = rng.bytes(len);
            assert_eq!(detect(&image), ImageKind::Unknown, "random {len} bytes");
            for (name, load) in LOADERS {
                let err = file
                    .load_both(name, load, &mem, &image, &cfg())
                    .err()
                    .unwrap_or_else(|| panic!("{name} accepted {len} random bytes"));
                assert!(!err.to_string().is_empty());
            }
        }
    }
}

#[test]
fn not_a_kernel_errors_name_the_problem() {
    let mem = guest_mem(RAM);
    let text = "#!/bin/sh\necho hello world\n".repeat(400).into_bytes();
    let err = load_linux(&mem, &text, &cfg()).unwrap_err();
    assert!(matches!(err, LoaderError::NotLinux { len } if len == text.len() as u64));
    assert!(err.to_string().contains("HdrS"), "{err}");
    let err = load_pvh(&mem, &text, &cfg()).unwrap_err();
    assert!(matches!(err, LoaderError::NotElf), "{err:?}");
    let err = load_multiboot(&mem, &text, &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::MultibootHeaderMissing { searched: 8192 }),
        "{err:?}"
    );
    let err = load_kernel(&mem, &text, &cfg()).unwrap_err();
    assert!(matches!(err, LoaderError::UnknownImage { .. }), "{err:?}");
    let err = load_kernel(&mem, &[], &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::UnknownImage { len: 0 }),
        "{err:?}"
    );
}

#[test]
fn truncated_bzimage_names_the_missing_part() {
    let mem = guest_mem(RAM);
    let bz = BzImage {
        payload: pattern(0x4000, 1),
        ..Default::default()
    };
    let image = bz.build();
    let setup = bz.setup_len();

    let err = load_linux(&mem, &image[..0x100], &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::NotLinux { len: 0x100 }),
        "{err:?}"
    );
    let err = load_linux(&mem, &image[..0x210], &cfg()).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::BzImageTruncated {
                what: "setup header",
                need: 0x26c,
                len: 0x210
            }
        ),
        "{err:?}"
    );
    let err = load_linux(&mem, &image[..setup + 0x100], &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::BzImageTruncated { need, .. } if need == setup as u64 + 0x201),
        "{err:?}"
    );
    // Cut in the middle of the protected-mode code: syssize says more was there.
    let cut = image.len() - 0x800;
    let err = load_linux(&mem, &image[..cut], &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::BzImageTruncated { what: "protected-mode kernel (syssize)", need, len }
            if need == image.len() as u64 && len == cut as u64),
        "{err:?}"
    );
    assert!(err.to_string().contains("Truncated bzImage"), "{err}");

    // Every prefix fails, none panics.
    for len in (0..image.len()).step_by(13) {
        assert!(
            load_linux(&mem, &image[..len], &cfg()).is_err(),
            "prefix {len}"
        );
    }
    assert!(load_linux(&mem, &image, &cfg()).is_ok());
}

#[test]
fn absurd_header_values_are_refused() {
    let mem = guest_mem(RAM);
    let load = |bz: BzImage| load_linux(&mem, &bz.build(), &cfg()).unwrap_err();

    let err = load(BzImage {
        version: 0x0204,
        ..Default::default()
    });
    assert!(
        matches!(err, LoaderError::BzImageVersion { version: 0x0204 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("2.04"), "{err}");

    // setup_sects 200 in an image that really has 200 sectors: still absurd (setup > 32 KiB).
    let err = load(BzImage {
        setup_sects: 200,
        ..Default::default()
    });
    assert!(
        matches!(err, LoaderError::BzImageSetupSects { sects: 200 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("200"), "{err}");

    // setup_sects claims more than the file holds.
    let mut image = BzImage::default().build();
    image[0x1f1] = 60;
    let err = load_linux(&mem, &image, &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::BzImageTruncated { .. }),
        "{err:?}"
    );

    let err = load(BzImage {
        loadflags: 0,
        ..Default::default()
    });
    assert!(
        matches!(err, LoaderError::BzImageNotLoadedHigh { loadflags: 0 }),
        "{err:?}"
    );

    let err = load(BzImage {
        xloadflags: 0,
        ..Default::default()
    });
    assert!(
        matches!(err, LoaderError::BzImageNo64BitEntry { xloadflags: 0 }),
        "{err:?}"
    );

    // init_size of 4 GiB: the kernel cannot fit.
    let err = load(BzImage {
        init_size: u32::MAX,
        ..Default::default()
    });
    assert!(
        matches!(err, LoaderError::KernelTooLarge { ram_end, .. } if ram_end == RAM),
        "{err:?}"
    );

    // A kernel image larger than RAM.
    let err = load(BzImage {
        payload: vec![0x90; 9 * MIB as usize],
        ..Default::default()
    });
    assert!(
        matches!(err, LoaderError::KernelTooLarge { start: 0x10_0000, end, .. } if end > RAM),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("0x800000"),
        "names the RAM end: {err}"
    );

    // A header that ends before cmdline_size.
    let mut image = BzImage::default().build();
    image[0x201] = 0x10;
    let err = load_linux(&mem, &image, &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::BzImageHeaderShort { end: 0x212 }),
        "{err:?}"
    );

    // initrd_addr_max of 0: no room for any initrd.
    let initrd = [1u8; 16];
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..cfg()
    };
    let image = BzImage {
        initrd_addr_max: 0,
        ..Default::default()
    }
    .build();
    let err = load_linux(&mem, &image, &cfg).unwrap_err();
    assert!(matches!(err, LoaderError::ModuleNoRoom { .. }), "{err:?}");
}

#[test]
fn malformed_elf_headers_are_refused() {
    let mem = guest_mem(RAM);
    let base = pvh_elf64();
    let check = |elf: Elf, want: fn(&LoaderError) -> bool| {
        let err = load_pvh(&mem, &elf.build(), &cfg()).unwrap_err();
        assert!(want(&err), "{err:?}");
    };
    check(
        Elf {
            data_encoding: 2,
            ..base.clone()
        },
        |e| matches!(e, LoaderError::ElfEndian { data: 2 }),
    );
    check(
        Elf {
            e_type: 3,
            ..base.clone()
        },
        |e| matches!(e, LoaderError::ElfType { e_type: 3 }),
    );
    check(
        Elf {
            machine: 40,
            ..base.clone()
        },
        |e| matches!(e, LoaderError::ElfMachine { machine: 40, .. }),
    );
    let mut seg = base.clone();
    seg.segs[1].memsz = 0x10;
    check(
        seg,
        |e| matches!(e, LoaderError::ElfSegment { index: 1, what } if what.contains("p_filesz")),
    );
    let mut no_load = base.clone();
    no_load.segs.truncate(1);
    check(no_load, |e| {
        matches!(e, LoaderError::EntryOutsideImage { .. })
    });

    let image = base.build();
    let mut bad = image.clone();
    bad[4] = 7;
    let err = load_pvh(&mem, &bad, &cfg()).unwrap_err();
    assert!(matches!(err, LoaderError::ElfClass { class: 7 }), "{err:?}");
    let mut bad = image.clone();
    bad[54] = 40; // e_phentsize
    let err = load_pvh(&mem, &bad, &cfg()).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::ElfPhentsize {
                size: 40,
                expected: 56
            }
        ),
        "{err:?}"
    );
    let mut bad = image.clone();
    bad[56] = 0xff; // e_phnum: table runs past the end
    let err = load_pvh(&mem, &bad, &cfg()).unwrap_err();
    assert!(
        matches!(
            err,
            LoaderError::ElfTruncated {
                what: "program header table",
                ..
            }
        ),
        "{err:?}"
    );
    // Segment file data beyond the end of the image.
    let cut = &image[..image.len() - 0x10];
    let err = load_pvh(&mem, cut, &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::ElfSegment { index: 1, what } if what.contains("beyond the end")),
        "{err:?}"
    );
    // Every prefix fails, none panics.
    for len in 0..image.len() {
        assert!(
            load_pvh(&mem, &image[..len], &cfg()).is_err(),
            "prefix {len}"
        );
        let _ = detect(&image[..len]);
    }
    // A segment whose address + size wraps.
    let mut wrap = pvh_elf64();
    wrap.segs[1].paddr = u64::MAX - 0x10;
    let err = load_pvh(&mem, &wrap.build(), &cfg()).unwrap_err();
    assert!(
        matches!(err, LoaderError::ElfSegment { what, .. } if what.contains("overflows")),
        "{err:?}"
    );
}

#[test]
fn elf32_without_pvh_note_is_not_linux() {
    let mem = guest_mem(RAM);
    let image = Elf::new32(0x10_0000, vec![Seg::load(0x10_0000, vec![0; 16], 16)]).build();
    assert_eq!(detect(&image), ImageKind::Unknown);
    let err = load_linux(&mem, &image, &cfg()).unwrap_err();
    assert!(matches!(err, LoaderError::Elf32WithoutPvh), "{err:?}");
    let err = load_kernel(&mem, &image, &cfg()).unwrap_err();
    assert!(matches!(err, LoaderError::Elf32WithoutPvh), "{err:?}");
}

/// Valid images with random bytes overwritten, fed to every loader as bytes and as a file: any
/// result is fine (the same for both), a panic is not; and whatever is accepted must have an
/// entry point inside guest RAM.
#[test]
fn mutated_images_never_panic() {
    let mem = guest_mem(RAM);
    let file = ImageFile::new();
    let seeds: Vec<Vec<u8>> = vec![
        BzImage::default().build(),
        pvh_elf64().build(),
        mb_elf32(0x3).build(),
        mb_aout(0x3),
        Elf::new64(0x10_0000, vec![Seg::load(0x10_0000, vec![0x90; 64], 0x100)]).build(),
    ];
    let initrd = [7u8; 100];
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..cfg()
    };
    let mut rng = Rng::new(42);
    let mut accepted = 0;
    for round in 0..3000 {
        let mut image = seeds[round % seeds.len()].clone();
        // Mutate mostly the headers, where the parsers look.
        let span = image.len().min(0x300);
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(span);
            image[at] = rng.next() as u8;
        }
        if rng.below(4) == 0 {
            let len = rng.below(image.len() + 1);
            image.truncate(len);
        }
        for (name, load) in LOADERS {
            if let Ok(k) = file.load_both(name, load, &mem, &image, &cfg) {
                accepted += 1;
                assert!(k.layout.is_ram(k.entry.rip, k.entry.rip + 1), "{k:?}");
            }
        }
    }
    // Many single-byte mutations leave a loadable image: the loop exercised the success path.
    assert!(accepted > 100, "only {accepted} mutated images loaded");
}

/// A kernel file that is shorter than when it was measured (it shrank after it was opened) is an
/// error, from every loader, whether the headers or the segments are missing.
#[test]
fn a_kernel_file_shorter_than_measured_is_refused() {
    let mem = guest_mem(RAM);
    let file = ImageFile::new();
    for image in [
        BzImage::default().build(),
        pvh_elf64().build(),
        mb_elf32(0x3).build(),
        mb_aout(0x3),
    ] {
        for cut in [0x100, image.len() / 2, image.len() - 1] {
            file.0.set_len(0).unwrap();
            file.0.write_all_at(&image[..cut], 0).unwrap();
            let blob = Blob::File {
                file: &file.0,
                len: image.len() as u64,
            };
            for (name, load) in LOADERS {
                let err = load(&mem, blob, &cfg()).err().unwrap_or_else(|| {
                    panic!("{name} loaded a file cut at {cut} of {}", image.len())
                });
                assert!(!err.to_string().is_empty());
            }
        }
    }
}
