//! `lockwarden`: the admin CLI. The body is library code in `lockwarden::cli`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::ExitCode::from(lockwarden::cli::run(&args))
}
