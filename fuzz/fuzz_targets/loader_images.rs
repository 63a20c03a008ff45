//! Fuzzes the kernel loaders: any bytes as a kernel image, handed to every loader both as bytes
//! in memory and as a file (headers read with `pread`, segments straight into guest memory).
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loader::{
    detect, load_kernel, load_linux, load_multiboot, load_pvh, Blob, BootConfig, LoadedKernel,
    LoaderError, MemoryLayout,
};
use vm_memory::GuestMemoryMmap;

const RAM: u64 = 8 << 20;

type Loaded = Result<LoadedKernel, LoaderError>;
type LoadFn = for<'k> fn(&GuestMemoryMmap, Blob<'k>, &BootConfig<'_>) -> Loaded;

const LOADERS: [(&str, LoadFn); 4] = [
    ("load_linux", |m, k, c| load_linux(m, k, c)),
    ("load_pvh", |m, k, c| load_pvh(m, k, c)),
    ("load_multiboot", |m, k, c| load_multiboot(m, k, c)),
    ("load_kernel", |m, k, c| load_kernel(m, k, c)),
];

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        let layout = MemoryLayout::new(RAM).unwrap();
        GuestMemoryMmap::from_ranges(&layout.ram_ranges()).unwrap()
    })
}

/// An unlinked scratch file the image is written to before each run.
fn scratch() -> &'static std::fs::File {
    static FILE: OnceLock<std::fs::File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("fuzz-loader-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    })
}

fuzz_target!(|data: &[u8]| {
    let file = scratch();
    file.set_len(0).unwrap();
    file.write_all_at(data, 0).unwrap();
    let initrd = [7u8; 100];
    let cfg = BootConfig {
        initrd: Some((&initrd).into()),
        ..BootConfig::new(RAM, "console=ttyS0")
    };
    let len = data.len() as u64;
    assert_eq!(detect(data), detect(Blob::File { file, len }));
    for (name, load) in LOADERS {
        let from_bytes = load(memory(), Blob::Bytes(data), &cfg);
        let from_file = load(memory(), Blob::File { file, len }, &cfg);
        match (&from_bytes, &from_file) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "{name}: bytes and file placed differently");
                assert!(
                    a.layout.is_ram(a.entry.rip, a.entry.rip + 1),
                    "{name}: entry {:#x} outside RAM",
                    a.entry.rip
                );
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "{name}: refused differently");
                assert!(!a.to_string().is_empty());
            }
            (a, b) => panic!("{name}: from bytes {a:?}, from a file {b:?}"),
        }
    }
});
