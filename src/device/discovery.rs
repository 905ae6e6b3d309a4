//! Where libnccl is looked for, in order: `PHALANX_NCCL_LIBRARY` (when set, the only
//! candidate: an explicit choice is never silently replaced by another library); the
//! libnccl of an installed `nvidia-nccl-cu12`/`-cu13` wheel of the active `python3`;
//! `libnccl.so.2` through the system's search path (`LD_LIBRARY_PATH`, ldconfig).

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that names the NCCL library to load.
pub const ENV_VAR: &str = "PHALANX_NCCL_LIBRARY";

/// The name the system search loads.
pub const SYSTEM_NAME: &str = "libnccl.so.2";

/// How long the active Python may take to list its site-packages.
pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(5);

/// A library to try: where it came from and its path (or bare name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `"PHALANX_NCCL_LIBRARY"`, `"python wheel"` or `"system"`.
    pub source: &'static str,
    /// What to open.
    pub path: PathBuf,
}

/// The candidates in discovery order, from the variable's value (if set and not empty)
/// and the wheel libraries `python` finds (asked only when the variable is unset).
pub fn candidates(env: Option<OsString>, python: impl FnOnce() -> Vec<PathBuf>) -> Vec<Candidate> {
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        return vec![Candidate { source: ENV_VAR, path: PathBuf::from(value) }];
    }
    let mut out: Vec<Candidate> = python().into_iter().map(|path| Candidate { source: "python wheel", path }).collect();
    out.push(Candidate { source: "system", path: PathBuf::from(SYSTEM_NAME) });
    out
}

/// The candidates of this process: [`candidates`] over the real environment and the
/// `python3` on `PATH`.
pub fn discover() -> Vec<Candidate> {
    candidates(std::env::var_os(ENV_VAR), || wheel_libraries("python3", PYTHON_TIMEOUT))
}

/// Lists the files every directory of the interpreter's `sys.path` (site-packages of a
/// venv or conda env, the user's site, `PYTHONPATH`; not the current directory) holds at
/// the places NVIDIA's NCCL wheels install libnccl (`nvidia/nccl/lib`, and
/// `nvidia/cu12/lib` or `nvidia/cu13/lib`).
const WHEEL_SCRIPT: &str = r#"
import os, sys
for d in sys.path:
    if not d:
        continue
    for sub in ('nccl', 'cu13', 'cu12'):
        p = os.path.join(d, 'nvidia', sub, 'lib', 'libnccl.so.2')
        if os.path.isfile(p):
            print(os.path.abspath(p))
"#;

/// The libnccl files of the NCCL wheels installed for `python`, in `sys.path` order,
/// without duplicates. A Python that is missing, fails, or takes longer than `timeout`
/// (it is killed) yields none: discovery goes on to the system library.
pub fn wheel_libraries(python: &str, timeout: Duration) -> Vec<PathBuf> {
    let Ok(mut child) = Command::new(python)
        .args(["-c", WHEEL_SCRIPT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    // The output is a few short lines (far below a pipe's buffer), so the child never
    // blocks on writing it: waiting first, then reading, cannot deadlock. The wait
    // sleeps between checks.
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    if !status.is_some_and(|s| s.success()) {
        let _ = child.kill();
        let _ = child.wait();
        return Vec::new();
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        if out.read_to_string(&mut text).is_err() {
            return Vec::new();
        }
    }
    let mut found: Vec<PathBuf> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = PathBuf::from(line);
        if !found.contains(&path) {
            found.push(path);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_is_the_only_candidate_when_set() {
        let asked = std::cell::Cell::new(false);
        let c = candidates(Some("/nowhere/libnccl.so.2".into()), || {
            asked.set(true);
            vec![PathBuf::from("/wheel/libnccl.so.2")]
        });
        assert_eq!(c, vec![Candidate { source: ENV_VAR, path: "/nowhere/libnccl.so.2".into() }]);
        assert!(!asked.get(), "Python is not asked when the variable decides");
    }

    #[test]
    fn wheels_come_before_the_system_library() {
        let wheel = PathBuf::from("/venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2");
        let c = candidates(Some(OsString::new()), || vec![wheel.clone()]);
        assert_eq!(
            c,
            vec![
                Candidate { source: "python wheel", path: wheel },
                Candidate { source: "system", path: SYSTEM_NAME.into() }
            ]
        );
        assert_eq!(candidates(None, Vec::new), vec![Candidate { source: "system", path: SYSTEM_NAME.into() }]);
    }

    #[test]
    fn a_missing_python_finds_nothing() {
        assert!(wheel_libraries("/nonexistent/python3", PYTHON_TIMEOUT).is_empty());
    }

    #[test]
    fn a_wheel_layout_on_the_python_path_is_found() {
        use std::os::unix::fs::PermissionsExt;
        if Command::new("python3").arg("-V").output().is_err() {
            return; // no Python on this machine: nothing to find
        }
        // A fake site-packages reached through PYTHONPATH, set by a wrapper so that the
        // test's own environment is left alone.
        let dir = std::env::temp_dir().join(format!("phalanx-wheel-{}", std::process::id()));
        let site = dir.join("site");
        let lib = site.join("nvidia/nccl/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libnccl.so.2"), b"not a library").unwrap();
        let wrapper = dir.join("python");
        std::fs::write(&wrapper, format!("#!/bin/sh\nPYTHONPATH='{}' exec python3 \"$@\"\n", site.display())).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = wheel_libraries(wrapper.to_str().unwrap(), PYTHON_TIMEOUT);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, vec![lib.join("libnccl.so.2")]);
    }

    #[test]
    fn a_python_that_hangs_is_killed_at_the_timeout() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("phalanx-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hung = dir.join("python");
        std::fs::write(&hung, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&hung, std::fs::Permissions::from_mode(0o755)).unwrap();
        let start = Instant::now();
        let found = wheel_libraries(hung.to_str().unwrap(), Duration::from_millis(200));
        let took = start.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(found.is_empty());
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
