//! Assembles every test guest in `asm/` (one `.S` file per guest, sharing `rt.inc`) with the system
//! toolchain (gcc's preprocessor + GNU as, GNU ld), producing Multiboot v1 ELF32 images in OUT_DIR.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (install gcc and binutils)"));
    if !out.status.success() {
        panic!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn main() {
    let asm = Path::new("asm");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=asm");
    let mut names = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(asm)
        .expect("asm/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "S"))
        .collect();
    entries.sort();
    for src in entries {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        // `NAME.bz.S` is a bzImage-shaped test kernel (flat binary, 64-bit code); every other
        // `NAME.S` a Multiboot/PVH ELF32 image linked by guest.ld.
        let (name, bz) = match stem.strip_suffix(".bz") {
            Some(n) => (n.to_string(), true),
            None => (stem, false),
        };
        let obj = out.join(format!("{name}.o"));
        let img = out.join(format!("{name}.img"));
        let mut cc = Command::new("gcc");
        cc.args(["-c", "-x", "assembler-with-cpp", "-I"]).arg(asm);
        if !bz {
            cc.arg("-m32");
        }
        run(
            cc.arg(&src).arg("-o").arg(&obj),
            &format!("assembling {name}"),
        );
        let mut ld = Command::new("ld");
        if bz {
            ld.args(["--oformat", "binary", "-Ttext=0", "-e", "0"]);
        } else {
            ld.args([
                "-m",
                "elf_i386",
                "-n",
                "--build-id=none",
                "--no-warn-rwx-segments",
                "-T",
            ])
            .arg(asm.join("guest.ld"));
        }
        run(ld.arg("-o").arg(&img).arg(&obj), &format!("linking {name}"));
        names.push(name);
    }
    let mut table = String::from(
        "/// Every test guest: (name, image: Multiboot/PVH ELF32, or a bzImage for `probe_linux`).\npub static GUESTS: &[(&str, &[u8])] = &[\n",
    );
    for n in &names {
        table.push_str(&format!(
            "    ({n:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.img\"))),\n"
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("guests.rs"), table).expect("write guests.rs");
}
