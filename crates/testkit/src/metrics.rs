//! Scraping a process's Prometheus endpoint (`GET /metrics`) in system tests, and reading
//! series out of the text exposition.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample line: series name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// One scrape: every sample line.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: Vec<Sample>,
    /// The text as served.
    pub text: String,
}

impl Scrape {
    /// Parses the text exposition (comment lines are skipped).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("sample line without a value: {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .with_context(|| format!("unclosed labels in {line:?}"))?;
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair
                                .split_once("=\"")
                                .with_context(|| format!("bad label in {line:?}"))?;
                            Ok((k.to_owned(), v.trim_end_matches('"').to_owned()))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    (name, labels)
                }
                None => (series, Vec::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Ok(Self {
            samples,
            text: text.to_owned(),
        })
    }

    /// The sum of the samples of `name` whose labels include every pair of `labels` (0 when
    /// there is none: a counter not incremented yet is not exposed).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, ls, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any sample of `name` is exposed.
    pub fn has(&self, name: &str) -> bool {
        self.count(name) > 0
    }

    /// How many series of `name` are exposed.
    pub fn count(&self, name: &str) -> usize {
        self.samples.iter().filter(|(n, _, _)| n == name).count()
    }
}

/// Scrapes `GET /metrics` at `addr` (plain HTTP/1.1, one connection per scrape).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8(response)?)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), fetch)
        .await
        .with_context(|| format!("no metrics from {addr} within 30 s"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response from {addr}: {response:?}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "metrics at {addr} answered {head:?}"
    );
    anyhow::ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "metrics at {addr} are not OpenMetrics text: {head:?}"
    );
    Scrape::parse(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_sum_by_labels() {
        let s = Scrape::parse(
            "# TYPE a counter\n\
             a_total{service=\"x.Y\",method=\"M\",code=\"OK\"} 3\n\
             a_total{service=\"x.Y\",method=\"M\",code=\"ABORTED\"} 1\n\
             b 2.5\n# EOF\n",
        )
        .expect("parse");
        assert_eq!(s.sum("a_total", &[("method", "M")]), 4.0);
        assert_eq!(s.sum("a_total", &[("code", "OK")]), 3.0);
        assert_eq!(s.sum("a_total", &[("code", "INTERNAL")]), 0.0);
        assert_eq!(s.sum("b", &[]), 2.5);
        assert!(s.has("b") && !s.has("c"));
    }
}
