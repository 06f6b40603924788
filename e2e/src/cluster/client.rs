//! Clients inside pods: `curl`, `bash`'s `/dev/tcp` and the gRPC sample's
//! `call`, each started in the pod's network namespace *and cgroup*, as the
//! pod's own app would be, so the pod's eBPF capture sees them. Nothing in
//! a client knows of the mesh.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{App, Cluster};

/// The response header the sample HTTP server names itself in.
pub const SERVED_BY: &str = "x-served-by";

/// What an HTTP client saw for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status code; 0 when there was no HTTP response at all.
    pub code: u16,
    pub body: String,
    /// The `x-served-by` response header ("" when absent).
    pub served_by: String,
    /// curl's error when there was no response.
    pub error: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.code == 200
    }
    /// One line for reports.
    pub fn describe(&self) -> String {
        if self.code == 0 {
            format!("no reply: {}", self.error)
        } else if self.served_by.is_empty() {
            format!("HTTP {}: {}", self.code, first_line(&self.body))
        } else {
            format!("HTTP {} from {}", self.code, self.served_by)
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// Marker curl writes after each transfer (`--write-out`).
const MARK: &str = "\n@@e2e code=";

/// Splits curl's combined output (bodies, write-out markers, `curl:` error
/// lines) into one reply per transfer.
pub fn parse_curl(out: &str, transfers: usize) -> Vec<Reply> {
    let mut replies = Vec::new();
    let mut rest = out;
    while let Some(i) = rest.find(MARK) {
        let body = &rest[..i];
        let after = &rest[i + MARK.len()..];
        let end = after.find('\n').unwrap_or(after.len());
        let line = &after[..end];
        rest = after.get(end + 1..).unwrap_or("");
        let (code, served_by) = line.split_once(" by=").unwrap_or((line, ""));
        let (errs, body): (Vec<&str>, Vec<&str>) =
            body.lines().partition(|l| l.starts_with("curl: "));
        replies.push(Reply {
            code: code.trim().parse().unwrap_or(0),
            body: body.join("\n"),
            served_by: served_by.trim().to_string(),
            error: errs.join("; "),
        });
    }
    // A transfer that never wrote its marker (curl killed): no reply.
    let tail: Vec<&str> = rest.lines().filter(|l| l.starts_with("curl: ")).collect();
    while replies.len() < transfers {
        replies.push(Reply {
            code: 0,
            body: String::new(),
            served_by: String::new(),
            error: if tail.is_empty() {
                "no output".into()
            } else {
                tail.join("; ")
            },
        });
    }
    replies
}

impl Cluster {
    /// `curl http://<url>` once from inside `from`, with extra request
    /// headers. `url` is `host:port/path`.
    pub fn http(&self, from: &App, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.http_many(from, &[url.to_string()], headers, false)
            .pop()
            .unwrap_or(Reply {
                code: 0,
                body: String::new(),
                served_by: String::new(),
                error: "no transfer".into(),
            })
    }

    /// Several requests from one `curl` process in `from`: on one
    /// keep-alive connection, or with `new_connections` each on its own
    /// connection (`Connection: close`), so connection-level balancing
    /// gets to choose every time.
    pub fn http_many(
        &self,
        from: &App,
        urls: &[String],
        headers: &[(&str, &str)],
        new_connections: bool,
    ) -> Vec<Reply> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-A", "e2e"]);
        cmd.arg("-w")
            .arg(format!("{MARK}%{{http_code}} by=%header{{{SERVED_BY}}}\\n"));
        for (k, v) in headers {
            cmd.arg("-H").arg(format!("{k}: {v}"));
        }
        if new_connections {
            cmd.args(["-H", "Connection: close"]);
        }
        for u in urls {
            cmd.arg(format!("http://{u}"));
        }
        let timeout = Duration::from_secs(15 + 10 * urls.len() as u64);
        // curl exits non-zero when a transfer failed; its output still
        // says how every transfer went.
        match self.run_in_pod_status(from, cmd, timeout) {
            Ok((_, out)) => parse_curl(&out, urls.len()),
            Err(e) => parse_curl(&format!("curl: {e:#}\n"), urls.len()),
        }
    }

    /// Connects from `from` to `addr` (`ip:port`) with bash's `/dev/tcp`,
    /// sends `msg` and a newline, and returns the first line that comes
    /// back (an echo server's answer).
    pub fn tcp_echo(&self, from: &App, addr: &str, msg: &str) -> Result<String> {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("{addr} is not host:port"))?;
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && printf '%s\\n' \"$1\" >&3 && timeout 5 head -n 1 <&3"
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &script, "tcp-echo", msg]);
        let out = self.run_in_pod(from, cmd, Duration::from_secs(10))?;
        Ok(out.trim_end_matches('\n').to_string())
    }

    /// `sample-grpc call <addr> <method> <message>` from inside `from`:
    /// `(server, message)` on success, else the gRPC status in the error.
    pub fn grpc_call(
        &self,
        from: &App,
        addr: &str,
        method: &str,
        message: &str,
    ) -> Result<(String, String)> {
        let bin = self
            .bins
            .sample_grpc
            .clone()
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "call",
            "--addr",
            addr,
            "--method",
            method,
            "--message",
            message,
        ]);
        let out = self.run_in_pod(from, cmd, Duration::from_secs(15))?;
        crate::apps::grpc::parse_call_output(&out)
    }

    /// Runs `cmd` as a process of pod `from` (its netns and cgroup) and
    /// returns its output (stdout and stderr); an error if it did not
    /// finish within `timeout` or failed.
    pub fn run_in_pod(&self, from: &App, cmd: Command, timeout: Duration) -> Result<String> {
        match self.run_in_pod_status(from, cmd, timeout)? {
            (true, out) => Ok(out),
            (false, out) => bail!("failed: {}", out.trim()),
        }
    }

    /// Like [`Cluster::run_in_pod`], but a failed exit is not an error:
    /// `(succeeded, output)`.
    pub fn run_in_pod_status(
        &self,
        from: &App,
        cmd: Command,
        timeout: Duration,
    ) -> Result<(bool, String)> {
        let t0 = Instant::now();
        let c = self.tb.spawn_in_pod(&from.pod, cmd)?;
        match c.wait_exit_timeout(timeout)? {
            None => bail!(
                "still running after {:?}; output so far: {}",
                t0.elapsed(),
                c.log()
            ),
            Some(st) => Ok((st.success(), c.log())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_output_is_split_per_transfer() {
        let out = "hello from a\nline 2\n@@e2e code=200 by=store/reviews-v1\nno\n@@e2e code=503 by=\ncurl: (28) timed out\n@@e2e code=000 by=\n";
        let r = parse_curl(out, 4);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].code, 200);
        assert_eq!(r[0].body, "hello from a\nline 2");
        assert_eq!(r[0].served_by, "store/reviews-v1");
        assert_eq!(r[1].code, 503);
        assert_eq!(r[1].body, "no");
        assert_eq!(r[2].code, 0);
        assert_eq!(r[2].error, "curl: (28) timed out");
        assert_eq!(r[3].code, 0);
        assert!(!r[3].ok());
    }
}
