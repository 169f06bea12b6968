//! Device and dtype names as the CLI and configs spell them.
use tch::{Device, Kind};

use crate::error::{ModelError, Result};

/// `cpu`, `cuda` (device 0) or `cuda:N`, on a device this process can use: a CUDA name on a
/// machine without that CUDA device is an error here (see [`check_device`]), not a libtorch
/// panic at the first tensor.
pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| ModelError::Device(name.into())),
    }?;
    check_device(device)
}

/// `device`, if torch can reach it: CUDA needs a CUDA build of libtorch, a driver and a
/// visible device of that index.
pub fn check_device(device: Device) -> Result<Device> {
    if let Device::Cuda(index) = device {
        let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        if count == 0 {
            return Err(ModelError::NoCuda(format!("cuda:{index}")));
        }
        if index >= count {
            return Err(ModelError::CudaIndex { index, count });
        }
    }
    Ok(device)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_names_need_a_cuda_device() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(matches!(parse_device("gpu"), Err(ModelError::Device(_))));
        assert!(matches!(parse_device("cuda:x"), Err(ModelError::Device(_))));
        let count = tch::Cuda::device_count() as usize;
        if count == 0 {
            for name in ["cuda", "cuda:0", "cuda:3"] {
                let message = parse_device(name).unwrap_err().to_string();
                assert!(message.contains("no CUDA device"), "{message}");
            }
        } else {
            assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
            let beyond = format!("cuda:{count}");
            let message = parse_device(&beyond).unwrap_err().to_string();
            assert!(
                message.contains(&format!("{count} CUDA device")),
                "{message}"
            );
        }
    }
}
