//! Wake-ups between processes: futex waits and wakes on a 32-bit word that may live in
//! memory shared with another process (so the non-private futex operations).
//!
//! A waiter loads the word, checks its condition, and only then calls [`wait`] with the
//! value it loaded: a change made in between (the other side bumps the word after every
//! change it makes) makes the kernel return at once, so no wake-up is lost. Waits are
//! bounded by a timeout so that a waiter also looks at flags nobody woke it for.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Sleeps while `word` holds `expected`, at most `timeout`. Returns early when woken,
/// on a signal, or at once when the word already differs: the caller looks again in
/// every case.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned 32-bit atomic for the whole call (a reference);
    // FUTEX_WAIT only reads it, `ts` outlives the call, and the unused arguments are
    // null/zero as FUTEX_WAIT requires. Every error (EAGAIN: the word differs,
    // ETIMEDOUT, EINTR) means "look again", which the caller does, so it is ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Changes `word` and wakes every thread (of any process) waiting on it.
pub(crate) fn bump_and_wake(word: &AtomicU32) {
    word.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as in `wait`; FUTEX_WAKE does not touch the word's value, and it cannot
    // fail in a way that matters here (a word nobody waits on wakes nobody).
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, std::ptr::null::<u8>(), 0usize, 0u32);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn wait_returns_at_once_when_the_word_differs() {
        let word = AtomicU32::new(5);
        let t = Instant::now();
        wait(&word, 4, Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_times_out_without_a_wake() {
        let word = AtomicU32::new(5);
        let t = Instant::now();
        wait(&word, 5, Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn bump_wakes_a_waiter() {
        let word = Arc::new(AtomicU32::new(0));
        let w = word.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            while w.load(Ordering::SeqCst) == 0 {
                wait(&w, 0, Duration::from_secs(20));
            }
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        bump_and_wake(&word);
        assert!(waiter.join().unwrap() < Duration::from_secs(10));
    }
}
