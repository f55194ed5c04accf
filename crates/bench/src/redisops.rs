//! What Redis itself did during a run: per-command call counts from `INFO commandstats`, read
//! before and after and subtracted. Divided by the work a side completed (events, calls), they
//! say which read-store work each side asks for — the counterpart of [`crate::cqlops`] for
//! Cassandra. Scripts count under `evalsha`; the commands a script runs count under their own
//! names too (Redis counts them inside scripts).

use std::collections::BTreeMap;

/// Calls per command at one moment (`evalsha -> 1200`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisOps(BTreeMap<String, u64>);

impl RedisOps {
    /// The server's counters now. A server that does not answer gives empty counts, not an
    /// error: the figures are for reading, never asserted.
    pub async fn snapshot(conn: &mut redis::aio::MultiplexedConnection) -> Self {
        let info: String = match redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
        {
            Ok(info) => info,
            Err(_) => return Self::default(),
        };
        Self::parse(&info)
    }

    /// Counts from the text of `INFO commandstats`
    /// (`cmdstat_evalsha:calls=12,usec=340,...`).
    pub fn parse(info: &str) -> Self {
        let mut counts = BTreeMap::new();
        for line in info.lines() {
            let Some((name, stats)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.trim().parse().ok());
            if let Some(calls) = calls {
                counts.insert(name.to_owned(), calls);
            }
        }
        Self(counts)
    }

    /// The counts of `self` minus those of `before`, without the commands that did not move
    /// and without `info` (the snapshots' own calls).
    pub fn since(&self, before: &RedisOps) -> RedisOps {
        let mut d = BTreeMap::new();
        for (name, n) in &self.0 {
            let diff = n.saturating_sub(before.0.get(name).copied().unwrap_or(0));
            if diff > 0 && name != "info" {
                d.insert(name.clone(), diff);
            }
        }
        RedisOps(d)
    }

    /// Takes `n` calls of `name` off the counts (calls a harness made itself).
    pub fn remove(&mut self, name: &str, n: u64) {
        if let Some(count) = self.0.get_mut(name) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.0.remove(name);
            }
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &RedisOps) {
        for (name, n) in &other.0 {
            *self.0.entry(name.clone()).or_default() += n;
        }
    }

    /// `evalsha 2.00, hgetall 0.10` — calls per one of `units`, commands in name order,
    /// figures under 0.005 left out; empty when nothing was counted.
    pub fn per(&self, units: u64) -> String {
        if units == 0 {
            return String::new();
        }
        self.0
            .iter()
            .map(|(name, n)| (name, *n as f64 / units as f64))
            .filter(|(_, each)| *each >= 0.005)
            .map(|(name, each)| format!("{name} {each:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_per_unit_from_commandstats() {
        let before = RedisOps::parse(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=50,usec_per_call=5.00\r\n\
             cmdstat_info:calls=3,usec=9\r\ncmdstat_get:calls=7,usec=1\r\n",
        );
        let after = RedisOps::parse(
            "# Commandstats\r\ncmdstat_evalsha:calls=210,usec=950,usec_per_call=4.52\r\n\
             cmdstat_info:calls=5,usec=15\r\ncmdstat_get:calls=7,usec=1\r\n\
             cmdstat_hgetall:calls=100,usec=300\r\n",
        );
        let d = after.since(&before);
        assert_eq!(d.per(100), "evalsha 2.00, hgetall 1.00");
        let mut sum = d.clone();
        sum.add(&d);
        assert_eq!(sum.per(100), "evalsha 4.00, hgetall 2.00");
        sum.remove("hgetall", 150);
        sum.remove("get", 5);
        assert_eq!(sum.per(100), "evalsha 4.00, hgetall 0.50");
        sum.remove("hgetall", 50);
        assert_eq!(sum.per(100), "evalsha 4.00");
        assert_eq!(d.per(0), "");
        assert_eq!(RedisOps::parse("garbage\r\n"), RedisOps::default());
    }
}
