//! Writes every test guest image into a directory: `mkguests DIR`.

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: mkguests DIR");
        std::process::exit(2);
    };
    match guests::write_all(std::path::Path::new(&dir)) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
        }
        Err(e) => {
            eprintln!("mkguests: cannot write into {}: {e}", dir.to_string_lossy());
            std::process::exit(1);
        }
    }
}
