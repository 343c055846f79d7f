//! Reading a node's metrics page from a tool (`flotilla bench`): one HTTP/1.0 `GET /metrics`,
//! bounded in time and size, and the page's samples as numbers by metric name. Enough for the
//! counters our own server writes (`Node::metrics_text`); not a general Prometheus parser.

use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest metrics page read (a node's page is a few KiB).
pub const METRICS_PAGE_BYTES_MAX: usize = 4 << 20;

/// Fetches `http://{addr}/metrics` and returns its body.
pub async fn fetch(addr: &str, timeout: Duration) -> Result<String, String> {
    let work = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        sock.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut page = Vec::new();
        let mut limited = (&mut sock).take(METRICS_PAGE_BYTES_MAX as u64 + 1);
        limited.read_to_end(&mut page).await.map_err(|e| format!("read from {addr}: {e}"))?;
        if page.len() > METRICS_PAGE_BYTES_MAX {
            return Err(format!("{addr}: metrics page larger than {METRICS_PAGE_BYTES_MAX} bytes"));
        }
        body_of(&page).map(str::to_owned).map_err(|e| format!("{addr}: {e}"))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("{addr}: no metrics page within {timeout:?}"))?
}

/// The body of an HTTP response, if its status is 200.
fn body_of(response: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(response).map_err(|_| "metrics page is not UTF-8".to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("response without a header end")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered `{status}`"));
    }
    Ok(body)
}

/// Each metric's value, summed over its label sets (one node per page: one sample each).
/// Comment lines and lines that do not parse are skipped.
pub fn samples(page: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in page.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let name = series.split('{').next().unwrap_or(series);
        *out.entry(name.to_string()).or_insert(0.0) += v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_sum_label_sets_and_skip_comments_and_junk() {
        let page = "# HELP a_total A.\n# TYPE a_total counter\na_total{node=\"1\"} 5\n\
                    b 2.5\na_total{node=\"2\"} 7\nnot a sample\nc{x=\"y z\"} nan_is_not_a_number\n";
        let s = samples(page);
        assert_eq!(s.get("a_total"), Some(&12.0));
        assert_eq!(s.get("b"), Some(&2.5));
        assert_eq!(s.len(), 2, "{s:?}");
    }

    #[test]
    fn only_a_200_answer_has_a_body() {
        assert_eq!(body_of(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nx 1\n"), Ok("x 1\n"));
        assert!(body_of(b"HTTP/1.1 404 Not Found\r\n\r\nno").unwrap_err().contains("404"));
        assert!(body_of(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
