//! Which rank this process is, from the environment a launcher sets: torchrun-style
//! `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, or on Kubernetes a
//! StatefulSet pod ordinal taken from `HOSTNAME` (`<name>-<ordinal>`) with `WORLD_SIZE` set
//! in the pod template.
use crate::error::{CollectiveError, Result};

/// Where this process sits in the learner group and how to reach rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank among the processes of this node (picks the GPU).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous listener.
    pub master_addr: String,
    /// Port of rank 0's rendezvous listener.
    pub master_port: u16,
}

/// Port of the rendezvous when `MASTER_PORT` is unset (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl RankInfo {
    /// A group of one: rank 0 of 1.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
        }
    }

    /// Reads the process environment; see [`RankInfo::from_vars`].
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Discovers the rank from `var` (a lookup of environment variables):
    /// - `WORLD_SIZE` unset or 1: a group of one;
    /// - the rank is `RANK`, else the ordinal suffix of `HOSTNAME` (`learner-3` is rank 3);
    /// - `LOCAL_RANK` defaults to the rank; `MASTER_ADDR` to 127.0.0.1, `MASTER_PORT` to 29500.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let parse = |name: &str| -> Result<Option<usize>> {
            var(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        CollectiveError::Env(format!("{name}={v:?} is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        let world_size = parse("WORLD_SIZE")?.unwrap_or(1);
        if world_size == 0 {
            return Err(CollectiveError::Env("WORLD_SIZE must be at least 1".into()));
        }
        let rank = match parse("RANK")? {
            Some(rank) => rank,
            None if world_size == 1 => 0,
            None => var("HOSTNAME")
                .as_deref()
                .and_then(pod_ordinal)
                .ok_or_else(|| {
                    CollectiveError::Env(format!(
                        "WORLD_SIZE={world_size} but neither RANK nor a pod ordinal in \
                         HOSTNAME (`<name>-<n>`) says which rank this is"
                    ))
                })?,
        };
        if rank >= world_size {
            return Err(CollectiveError::Env(format!(
                "rank {rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        let master_port = match var("MASTER_PORT").filter(|v| !v.is_empty()) {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| CollectiveError::Env(format!("MASTER_PORT={v:?} is not a port")))?,
            None => DEFAULT_MASTER_PORT,
        };
        Ok(Self {
            rank,
            world_size,
            local_rank: parse("LOCAL_RANK")?.unwrap_or(rank),
            master_addr: var("MASTER_ADDR")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        })
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// The ordinal of a StatefulSet pod name: the digits after the last `-`.
pub fn pod_ordinal(hostname: &str) -> Option<usize> {
    let (_, ordinal) = hostname.trim().rsplit_once('-')?;
    if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ordinal.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vars: &[(&str, &str)]) -> Result<RankInfo> {
        RankInfo::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn torchrun_variables() {
        let i = info(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((i.rank, i.world_size, i.local_rank), (3, 8, 1));
        assert_eq!(i.master(), "10.0.0.7:1234");
    }

    #[test]
    fn statefulset_ordinal_from_hostname() {
        let i = info(&[("WORLD_SIZE", "4"), ("HOSTNAME", "prime-learner-3")]).unwrap();
        assert_eq!(
            (i.rank, i.local_rank, i.master_port),
            (3, 3, DEFAULT_MASTER_PORT)
        );
        assert_eq!(pod_ordinal("prime-learner-12"), Some(12));
        assert_eq!(pod_ordinal("prime-learner"), None);
        assert_eq!(pod_ordinal("learner-x1"), None);
    }

    #[test]
    fn defaults_and_errors() {
        assert_eq!(info(&[]).unwrap(), RankInfo::single());
        assert!(info(&[("WORLD_SIZE", "2")]).is_err());
        assert!(info(&[("WORLD_SIZE", "2"), ("RANK", "2")]).is_err());
        assert!(info(&[("WORLD_SIZE", "0")]).is_err());
        assert!(info(&[("WORLD_SIZE", "2"), ("RANK", "x")]).is_err());
        assert!(info(&[("MASTER_PORT", "99999")]).is_err());
    }
}
