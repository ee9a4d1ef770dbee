//! The wall clock, read in one place: unix milliseconds for records operators read.
//!
//! Wall-clock times are shown to people and stored beside events; decisions use
//! monotonic instants, and no wall-clock time is compared across machines.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch on this machine's clock (0 if the clock is set
/// before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_ms_reads_the_clock_in_milliseconds() {
        let now = super::unix_ms();
        // After 2020-01-01 and before 2100-01-01: milliseconds, not seconds or nanoseconds.
        assert!(
            (1_577_836_800_000..4_102_444_800_000).contains(&now),
            "{now}"
        );
    }
}
