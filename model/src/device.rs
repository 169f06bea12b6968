//! Device and dtype names as the CLI and configs spell them, and a CUDA device's memory.
use std::ffi::{c_int, c_void, CStr, CString};

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

/// Free and total bytes of CUDA device `index` (`cudaMemGetInfo`), from the CUDA runtime that
/// libtorch's CUDA library brought into the process (found by symbol, whatever its version),
/// else the first `libcudart.so` the dynamic loader finds. Makes `index` the calling thread's
/// current device, as every later tch call on that device would.
pub fn cuda_memory(index: usize) -> Result<(u64, u64)> {
    let runtime = cuda_runtime()?;
    let symbol = |name: &str| -> Result<*mut c_void> {
        let c = CString::new(name).expect("symbol names have no NUL");
        // SAFETY: dlsym on a handle from dlopen (or RTLD_DEFAULT) with a valid C string.
        let ptr = unsafe { libc::dlsym(runtime, c.as_ptr()) };
        if ptr.is_null() {
            Err(ModelError::Cuda(format!("the CUDA runtime lacks {name}")))
        } else {
            Ok(ptr)
        }
    };
    // SAFETY: the signatures cuda_runtime_api.h declares: cudaError_t cudaSetDevice(int) and
    // cudaError_t cudaMemGetInfo(size_t *free, size_t *total).
    let (set_device, mem_get_info) = unsafe {
        (
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> c_int>(symbol(
                "cudaSetDevice",
            )?),
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut usize, *mut usize) -> c_int>(
                symbol("cudaMemGetInfo")?,
            ),
        )
    };
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: plain calls with a device ordinal and two valid out-pointers.
    let code = unsafe {
        match set_device(index as c_int) {
            0 => mem_get_info(&mut free, &mut total),
            code => code,
        }
    };
    if code != 0 {
        return Err(ModelError::Cuda(format!(
            "cuda:{index}: the CUDA runtime's memory query failed with error {code}"
        )));
    }
    Ok((free as u64, total as u64))
}

/// A handle that resolves the CUDA runtime's symbols.
fn cuda_runtime() -> Result<*mut c_void> {
    let probe = CString::new("cudaMemGetInfo").expect("no NUL");
    // SAFETY: dlsym over the global scope with a valid C string.
    if !unsafe { libc::dlsym(libc::RTLD_DEFAULT, probe.as_ptr()) }.is_null() {
        return Ok(libc::RTLD_DEFAULT);
    }
    let mut errors = Vec::new();
    for name in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle stays open for the process's life.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return Ok(handle);
        }
        // SAFETY: dlerror returns null or a thread-local NUL-terminated string.
        let error = unsafe { libc::dlerror() };
        if !error.is_null() {
            errors.push(
                unsafe { CStr::from_ptr(error) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    Err(ModelError::Cuda(format!(
        "no CUDA runtime to ask for the device's memory ({})",
        errors.join("; ")
    )))
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
