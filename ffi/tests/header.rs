//! `include/phalanx.h` is what cbindgen makes of `src/lib.rs` (as in rustls-ffi: the
//! header is checked in, and this test fails when it is stale), and it compiles on its
//! own as C99 and as C++.
//!
//! After changing the API: `PHALANX_BLESS=1 cargo test -p phalanx-ffi --test header`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn header_path() -> PathBuf {
    ffi_dir().join("include").join("phalanx.h")
}

fn generate() -> String {
    let config = cbindgen::Config::from_file(ffi_dir().join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(ffi_dir().join("src").join("lib.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let fresh = generate();
    let path = header_path();
    if std::env::var_os("PHALANX_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write the header");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != fresh {
        let new = Path::new(env!("CARGO_TARGET_TMPDIR")).join("phalanx.h.new");
        std::fs::write(&new, &fresh).expect("write the new header");
        panic!(
            "{} is stale: the API changed. Review `diff {} {}` and run \
             `PHALANX_BLESS=1 cargo test -p phalanx-ffi --test header`",
            path.display(),
            path.display(),
            new.display()
        );
    }
}

#[test]
fn header_declares_the_api() {
    let header = std::fs::read_to_string(header_path()).expect("read the header");
    for item in [
        "#define PHX_VERSION_MAJOR",
        "#define PHX_OK 0",
        "#define PHX_ERR_PANIC",
        "#define PHX_ERR_RUNTIME 13",
        "typedef struct phx_comm phx_comm;",
        "typedef struct phx_connect_options {",
        "int phx_comm_all_reduce(struct phx_comm *comm,",
        "const char *phx_last_error(void);",
        "extern \"C\" {",
    ] {
        assert!(header.contains(item), "the header lacks `{item}`");
    }
}

/// Compiles a file that includes only the header, with warnings as errors.
fn compile_alone(compiler: &str, flags: &[&str], ext: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("header-alone");
    std::fs::create_dir_all(&dir).expect("create the scratch dir");
    let src = dir.join(format!("include_only.{ext}"));
    std::fs::write(&src, "#include \"phalanx.h\"\nint phx_header_compiles(void);\n").expect("write the source");
    let out = Command::new(compiler)
        .args(flags)
        .arg("-I")
        .arg(ffi_dir().join("include"))
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only"])
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(out.status.success(), "{compiler} {flags:?} rejects phalanx.h:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn header_compiles_as_c99() {
    compile_alone("cc", &["-std=c99", "-x", "c"], "c");
}

#[test]
fn header_compiles_as_cpp() {
    compile_alone("c++", &["-std=c++11", "-x", "c++"], "cpp");
}
