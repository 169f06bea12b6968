//! Device and dtype names as the CLI and configs spell them, and a CUDA device's memory.
use std::ffi::{c_int, c_void, CStr, CString};

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
