//! The one place that reads the wall clock. Everything else gets `now` passed in
//! (`clippy.toml` bans `SystemTime::now` and `Instant::now` elsewhere).

/// Milliseconds since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A seed for the core's id generator, from the clock and the process id: unique enough for
/// ULID randomness, and no OS entropy source is needed.
pub fn seed() -> u64 {
    #[allow(clippy::disallowed_methods)]
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}
