//! Build script: Rust ABI types from our C header (bindgen), the `-z nodelete` link flag for the
//! plugin, and the C test host that loads the plugin the way libvirt's loader does.

use std::env;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let header = "include/lockwarden/lock_driver.h";
    println!("cargo:rerun-if-changed={header}");
    println!("cargo:rerun-if-changed=tests/c/host.c");

    bindgen::Builder::default()
        .header(header)
        .allowlist_type("_?vir.*")
        .allowlist_var("VIR_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen could not translate include/lockwarden/lock_driver.h (is libclang-dev installed?)")
        .write_to_file(out.join("abi.rs"))
        .expect("writing abi.rs");

    // libvirt may dlclose the plugin; stay mapped like libvirt's own in-tree drivers do.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");

    // The C test host is an executable, so drive the compiler cc picked ourselves.
    let host_src = "tests/c/host.c";
    if std::path::Path::new(host_src).exists() {
        let host = out.join("lockwarden-test-host");
        let compiler = cc::Build::new().get_compiler();
        let status = compiler
            .to_command()
            .args([
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-O1",
                "-g",
                "-rdynamic",
                "-Iinclude",
            ])
            .arg(host_src)
            .arg("-o")
            .arg(&host)
            .arg("-ldl")
            .status()
            .expect("running the C compiler for tests/c/host.c");
        assert!(status.success(), "compiling tests/c/host.c failed");
        println!("cargo:rustc-env=LOCKWARDEN_TEST_HOST={}", host.display());
    }
}
