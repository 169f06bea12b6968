//! Device and dtype names as the CLI and configs spell them.
use tch::{Device, Kind};

use crate::error::{ModelError, Result};

/// `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| ModelError::Device(name.into())),
    }
}

/// `f32`, `bf16` or `f16` (the long torch names are accepted too).
pub fn parse_kind(name: &str) -> Result<Kind> {
    match name {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => Err(ModelError::Dtype(name.into())),
    }
}

/// The default dtype for a device: f32 on CPU (as transformers loads), bf16 on CUDA.
pub fn default_kind(device: Device) -> Kind {
    match device {
        Device::Cpu => Kind::Float,
        _ => Kind::BFloat16,
    }
}
