//! The Python side: transformers' timings from `bench/python/bench_transformers.py` and tiny
//! random checkpoints from `tests/python/qwen2_ref.py make`, both run in the project's venv.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{BenchError, Result};
use crate::ours::{Measurement, Task};

/// The reference benchmark script.
pub fn reference_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/bench_transformers.py")
}

/// The script that writes random Qwen2 checkpoints.
pub fn model_maker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/qwen2_ref.py")
}

/// The venv's python: `$PRIME_VENV/bin/python`, by default under ~/.cache/prime-rs/venv.
pub fn default_python() -> PathBuf {
    let venv = std::env::var_os("PRIME_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/prime-rs/venv")
        });
    venv.join("bin/python")
}

/// Shape of a random benchmark model: small enough for a CPU, big enough that matrix work,
/// not per-call overhead alone, decides the numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TinyModel {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    /// Seed of the random weights.
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            vocab: 4096,
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 2,
            intermediate: 1024,
            max_positions: 2048,
            seed: 0,
        }
    }
}

/// What the reference reported besides its timings.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct ReferenceEnvironment {
    pub threads: i32,
    pub torch_version: String,
    pub transformers_version: String,
    pub gpu: Option<String>,
}

/// One reference run: transformers' timings and its environment.
#[derive(Debug, Clone)]
pub struct ReferenceRun {
    pub measurement: Measurement,
    pub environment: ReferenceEnvironment,
}

/// The JSON line a reference script prints.
#[derive(Debug, Deserialize)]
pub(crate) struct ReferenceLine {
    pub(crate) seconds_all: Vec<f64>,
    #[serde(flatten)]
    pub(crate) environment: ReferenceEnvironment,
}

/// A python interpreter with torch and transformers.
#[derive(Debug, Clone)]
pub struct Python {
    pub executable: PathBuf,
    /// Torch CPU threads for every script, passed as `PRIME_THREADS`.
    pub threads: i32,
}

impl Python {
    /// Writes a random Qwen2 checkpoint (untied, f32, normal(0, 0.02) weights) to `out`.
    pub fn make_tiny_model(&self, spec: &TinyModel, out: &Path) -> Result<()> {
        let args = [
            ("--out", out.display().to_string()),
            ("--vocab", spec.vocab.to_string()),
            ("--hidden", spec.hidden.to_string()),
            ("--layers", spec.layers.to_string()),
            ("--heads", spec.heads.to_string()),
            ("--kv-heads", spec.kv_heads.to_string()),
            ("--intermediate", spec.intermediate.to_string()),
            ("--max-pos", spec.max_positions.to_string()),
            ("--init-std", "0.02".to_string()),
            ("--seed", spec.seed.to_string()),
        ];
        let args: Vec<String> = args
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_string(), value])
            .collect();
        let mut full = vec!["make".to_string()];
        full.extend(args);
        self.run_script(&model_maker_script(), &full)?;
        Ok(())
    }

    /// A random checkpoint in a fresh temporary directory, removed when the value drops.
    pub fn make_temp_tiny_model(&self, spec: &TinyModel) -> Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix("prime-bench-model-")
            .tempdir()
            .map_err(|source| BenchError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        self.make_tiny_model(spec, dir.path())?;
        Ok(dir)
    }

    /// Times transformers on the same work as [`crate::ours::measure`].
    #[allow(clippy::too_many_arguments)]
    pub fn reference(
        &self,
        model_dir: &Path,
        task: Task,
        batch: usize,
        device: &str,
        dtype: &str,
        repeats: usize,
        seed: u64,
    ) -> Result<ReferenceRun> {
        let mut args = vec![
            task.name().to_string(),
            "--model".into(),
            model_dir.display().to_string(),
            "--batch".into(),
            batch.to_string(),
            "--device".into(),
            device.into(),
            "--dtype".into(),
            dtype.into(),
            "--repeats".into(),
            repeats.to_string(),
            "--seed".into(),
            seed.to_string(),
        ];
        args.extend(task.reference_args());
        let script = reference_script();
        let line = self.run_script(&script, &args)?;
        let parsed: ReferenceLine =
            serde_json::from_str(&line).map_err(|e| BenchError::Reference {
                script: script.clone(),
                message: format!("bad JSON line {line:?}: {e}"),
            })?;
        Ok(ReferenceRun {
            measurement: Measurement::new(parsed.seconds_all, task.tokens(batch)),
            environment: parsed.environment,
        })
    }

    /// Runs a script and returns the last non-empty line it printed on stdout.
    pub fn run_script(&self, script: &Path, args: &[String]) -> Result<String> {
        let fail = |message: String| BenchError::Reference {
            script: script.to_path_buf(),
            message,
        };
        if !script.exists() {
            return Err(fail("not found (run from a checkout of prime-rs)".into()));
        }
        tracing::debug!(script = %script.display(), ?args, "running python");
        let output = Command::new(&self.executable)
            .arg(script)
            .args(args)
            .env("PRIME_THREADS", self.threads.to_string())
            .output()
            .map_err(|source| BenchError::Io {
                path: self.executable.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(fail(format!(
                "{} {args:?} failed ({}):\n{}",
                self.executable.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            )));
        }
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .map(str::to_string)
            .ok_or_else(|| fail("printed nothing".into()))
    }
}
