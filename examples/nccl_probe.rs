//! Loads NCCL the way phalanx does and reports what it found: the library's path, its
//! version and capabilities, or the typed error (exit status 2). With `--init` it also
//! makes a unique id and a 1-rank communicator on the current GPU (non-blocking where
//! the library allows, waits that sleep), reads its async state and aborts it (exit
//! status 3 if any of that fails). `scripts/gpu-check.sh` runs it on a GPU machine.
//!
//! ```sh
//! cargo run --example nccl_probe --features nccl -- --init
//! PHALANX_NCCL_LIBRARY=/path/to/libnccl.so.2 target/debug/examples/nccl_probe
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use phalanx::device::nccl::{NcclBackend, NcclLibrary};
use phalanx::device::{DeviceBackend, DeviceComm};

fn main() -> ExitCode {
    let lib = match NcclLibrary::load() {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!("error: {}", phalanx::Error::from(e));
            return ExitCode::from(2);
        }
    };
    let caps = lib.capabilities();
    println!("path: {}", lib.path().display());
    println!("version: {}", lib.version());
    println!(
        "capabilities: init_config={} abort={} async_error={} shrink={} revoke={} grow={}",
        caps.init_config, caps.abort, caps.async_error, caps.shrink, caps.revoke, caps.grow
    );
    if !std::env::args().any(|a| a == "--init") {
        return ExitCode::SUCCESS;
    }
    // SAFETY: the null stream is CUDA's legacy default stream, valid for the process.
    let backend = unsafe { NcclBackend::new(Arc::new(lib), std::ptr::null_mut()) };
    let result = (|| -> Result<(), phalanx::Error> {
        let id = backend.unique_id()?;
        let mut comm = backend.init(&id, 0, 1)?;
        println!("init: rank {} of {}", comm.rank(), comm.size());
        println!("async state: {:?}", comm.async_state()?);
        if caps.abort {
            comm.abort()?;
            println!("abort: ok");
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}
