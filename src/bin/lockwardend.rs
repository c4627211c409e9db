//! lockwardend: the lockwarden lock-holder daemon. Everything lives in `lockwarden::daemon`.

fn main() -> std::process::ExitCode {
    lockwarden::daemon::main()
}
