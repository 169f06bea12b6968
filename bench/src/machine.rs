//! The machine a benchmark ran on, recorded next to its numbers.
use serde::Serialize;

/// Where the numbers came from. The library versions are the ones the reference reported;
/// our side links the same libtorch (the venv's, see the Makefile).
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu: String,
    /// Logical cores this process may use.
    pub cores: usize,
    /// Torch CPU threads, the same on both sides.
    pub threads: i32,
    pub torch_version: String,
    pub transformers_version: String,
    /// CUDA device name when the benchmark ran on a GPU.
    pub gpu: Option<String>,
    /// 1-minute load average before and after the run: other work on the machine (a shared
    /// machine's builds and tests) makes the numbers noisy, and this shows how much there was.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl Machine {
    /// This machine as a benchmark that just ended sees it: `threads` torch threads on both
    /// sides, the library versions the reference reported, the load before the run and now.
    pub fn now(
        threads: i32,
        reference: crate::python::ReferenceEnvironment,
        load_before: Option<f64>,
    ) -> Self {
        Self {
            cpu: cpu_model(),
            cores: cores(),
            threads,
            torch_version: reference.torch_version,
            transformers_version: reference.transformers_version,
            gpu: reference.gpu,
            load_before,
            load_after: load_average(),
        }
    }

    /// One line for a report's header.
    pub fn describe(&self) -> String {
        let load = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.2}"));
        format!(
            "{}{}, {} cores, {} threads, load {} -> {}; torch {}, transformers {}",
            self.cpu,
            self.gpu
                .as_ref()
                .map(|g| format!(" + {g}"))
                .unwrap_or_default(),
            self.cores,
            self.threads,
            load(self.load_before),
            load(self.load_after),
            self.torch_version,
            self.transformers_version
        )
    }
}

/// The `model name` line of /proc/cpuinfo, or "unknown" where there is none.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Logical cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The 1-minute load average from /proc/loadavg.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
