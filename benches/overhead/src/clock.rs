//! CLOCK_MONOTONIC in nanoseconds: the clock the worker's tap (tap.c) reads too. On Linux it is
//! one clock for every process of the host, so times taken here and in the worker compare.

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one request looked like from the client.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Just before the request's write.
    pub sent: u64,
    /// For each token, when the read that completed its event returned.
    pub tokens: Vec<u64>,
    /// When the read that completed the response returned (the final event, `data: [DONE]`, or
    /// the whole JSON body).
    pub done: u64,
}
