//! The `phalanx` command line.
fn main() {
    println!("phalanx {}", env!("CARGO_PKG_VERSION"));
}
