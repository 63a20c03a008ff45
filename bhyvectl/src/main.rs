//! `bhyvectl`: see the crate documentation (`bhyvectl --help`).

fn main() {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let code = bhyvectl::run(&args, &mut out, &mut err);
    std::process::exit(code);
}
