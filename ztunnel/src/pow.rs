//! `pow` for the C ABI, so that ztunnel does not load `libm.so`.
//!
//! The only symbol ztunnel needs from glibc's libm is `pow`, called by
//! tokio's multi-threaded scheduler (the moving average of task poll
//! times). Loading libm for it costs about half a MiB of idle RSS: the
//! dynamic loader touches its symbol tables and the `pow` variant
//! resolvers, and the kernel maps each touched page's 64 KiB neighbourhood
//! (fault-around). Defining `pow` here, with the pure-Rust port of musl's
//! implementation, satisfies the reference at link time; linked
//! `--as-needed`, the binary then no longer lists libm at all. Idle RSS is
//! one of ztunnel's targets.

/// `double pow(double x, double y)`, as C's libm defines it.
// SAFETY: the symbol has C's `pow` signature and semantics (within an ulp,
// C99's special cases included), so every caller that expects libm's `pow`
// gets a conforming one; it touches no global state.
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    use super::pow;

    #[test]
    fn matches_c_semantics() {
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(0.5, 3.0), 0.125);
        assert!((pow(0.8, 2.5) - 0.572_433_402_239_946_2).abs() < 1e-15);
        assert!(pow(-8.0, 1.0 / 3.0).is_nan());
        assert_eq!(pow(1.0, f64::NAN), 1.0);
        assert_eq!(pow(f64::NAN, 0.0), 1.0);
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
    }
}
