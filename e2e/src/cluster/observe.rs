//! Reading what the mesh did: ztunnel access-log lines, Prometheus
//! counters, and polling until something holds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

/// One `target: access` line of a ztunnel log.
#[derive(Clone, Debug)]
pub struct AccessLine {
    pub refused: bool,
    pub fields: BTreeMap<String, String>,
}

impl AccessLine {
    pub fn parse(line: &str) -> Option<AccessLine> {
        let (refused, rest) = if let Some((_, r)) = line.split_once("connection complete") {
            (false, r)
        } else if let Some((_, r)) = line.split_once("connection refused") {
            (true, r)
        } else {
            return None;
        };
        Some(AccessLine {
            refused,
            fields: parse_fields(rest),
        })
    }
    /// A field's value, `-` when absent.
    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("-")
    }
    /// The IP of `src.addr`.
    pub fn src_ip(&self) -> &str {
        ip_of(self.get("src.addr"))
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|x| x.0).unwrap_or(addr)
}

/// `k=v k="quoted v" ...` as tracing's text format writes fields.
fn parse_fields(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim_start();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_string();
        let after = &rest[eq + 1..];
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            // Find the closing quote, honouring backslash escapes.
            let mut end = None;
            let mut esc = false;
            for (i, c) in q.char_indices() {
                match c {
                    '\\' if !esc => esc = true,
                    '"' if !esc => {
                        end = Some(i);
                        break;
                    }
                    _ => esc = false,
                }
            }
            let end = end.unwrap_or(q.len());
            (
                q[..end].replace("\\\"", "\""),
                q.get(end + 1..).unwrap_or(""),
            )
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key, val);
        rest = next.trim_start();
    }
    out
}

/// Sum of a counter's samples whose line contains every needle.
pub fn counter(metrics: &str, name: &str, needles: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The first sample line of a counter containing every needle.
pub fn metric_line<'a>(metrics: &'a str, name: &str, needles: &[&str]) -> Option<&'a str> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
}

/// Polls `f` every 50 ms until it returns true, `timeout` passes, or a
/// stop was requested ([`crate::stop_requested`]). Errors from `f` count
/// as "not yet"; the last one is in the timeout error.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if crate::stop_requested() {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out waiting for {what}")),
                None => anyhow!("timed out waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_fields() {
        let l = AccessLine::parse(
            r#"2025 INFO access: connection complete direction="inbound" src.addr=10.0.0.1:0 src.identity=spiffe://x/ns/a/sa/b error="-""#,
        );
        let l = l.expect("parsed");
        assert!(!l.refused);
        assert_eq!(l.get("direction"), "inbound");
        assert_eq!(l.src_ip(), "10.0.0.1");
        assert_eq!(l.get("src.identity"), "spiffe://x/ns/a/sa/b");
        assert_eq!(l.get("error"), "-");
        assert_eq!(l.get("missing"), "-");
    }

    #[test]
    fn counters() {
        let m = "a_total{x=\"1\",y=\"2\"} 3\na_total{x=\"1\",y=\"3\"} 4\nb_total{x=\"1\"} 9\n";
        assert_eq!(counter(m, "a_total", &["x=\"1\""]), 7);
        assert_eq!(counter(m, "a_total", &["y=\"3\""]), 4);
        assert_eq!(metric_line(m, "b_total", &[]), Some("b_total{x=\"1\"} 9"));
    }
}
