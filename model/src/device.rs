//! Device and dtype names as the CLI and configs spell them, and the free memory of a CUDA
//! device.
use std::ffi::{c_int, c_uint, c_void};

use tch::{Device, Kind};

use crate::error::{ModelError, Result};

/// `cpu`, `cuda` (device 0), `cuda:N` or `auto` ([`auto_device`]), on a device this process
/// can use: a CUDA name on a machine without that CUDA device is an error here (see
/// [`check_device`]), not a libtorch panic at the first tensor.
pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto_device()),
        "cuda" => Ok(Device::Cuda(0)),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| ModelError::Device(name.into())),
    }?;
    check_device(device)
}

/// `--device auto`: the first CUDA device when torch sees one (a CUDA build of libtorch, a
/// driver and a visible device), else the CPU.
pub fn auto_device() -> Device {
    if tch::Cuda::device_count() > 0 {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
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

/// Free and total bytes of CUDA device `ordinal` as the driver reports them (`cuMemGetInfo` in
/// the device's primary context, the one libtorch uses), or `None` when the driver library
/// (`libcuda.so.1`, loaded at run time so that CPU builds need no CUDA) is missing or a call
/// fails. Memory that libtorch's caching allocator holds counts as taken.
pub fn cuda_memory_info(ordinal: usize) -> Option<(u64, u64)> {
    let ordinal = c_int::try_from(ordinal).ok()?;
    let driver = CudaDriver::open()?;
    // SAFETY: the function pointers come from libcuda with the documented signatures; the
    // context retained here is pushed, popped and released in pairs on this thread.
    unsafe {
        check((driver.init)(0))?;
        let mut device: c_int = 0;
        check((driver.device_get)(&mut device, ordinal))?;
        let mut context: *mut c_void = std::ptr::null_mut();
        check((driver.primary_ctx_retain)(&mut context, device))?;
        let info = match check((driver.ctx_push)(context)) {
            Some(()) => {
                let (mut free, mut total) = (0usize, 0usize);
                let info = check((driver.mem_get_info)(&mut free, &mut total));
                let mut popped: *mut c_void = std::ptr::null_mut();
                (driver.ctx_pop)(&mut popped);
                info.map(|()| (free as u64, total as u64))
            }
            None => None,
        };
        (driver.primary_ctx_release)(device);
        info
    }
}

/// Free and total bytes of CUDA device `index` ([`cuda_memory_info`]), or an error saying the
/// driver did not report them.
pub fn cuda_memory(index: usize) -> Result<(u64, u64)> {
    cuda_memory_info(index).ok_or_else(|| {
        ModelError::Cuda(format!(
            "cuda:{index}: the CUDA driver (libcuda.so.1) did not report the device's memory"
        ))
    })
}

/// `Some(())` when a CUDA driver call returned `CUDA_SUCCESS` (0).
fn check(result: c_int) -> Option<()> {
    (result == 0).then_some(())
}

/// The CUDA driver entry points [`cuda_memory_info`] calls.
struct CudaDriver {
    init: unsafe extern "C" fn(c_uint) -> c_int,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> c_int,
    primary_ctx_retain: unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int,
    primary_ctx_release: unsafe extern "C" fn(c_int) -> c_int,
    ctx_push: unsafe extern "C" fn(*mut c_void) -> c_int,
    ctx_pop: unsafe extern "C" fn(*mut *mut c_void) -> c_int,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> c_int,
}

impl CudaDriver {
    /// Loads libcuda (the handle is never closed: libtorch keeps it loaded anyway).
    fn open() -> Option<Self> {
        // SAFETY: dlopen with a NUL-terminated name.
        let handle = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() {
            return None;
        }
        macro_rules! resolve {
            ($name:literal) => {{
                // SAFETY: handle came from dlopen; the name is NUL-terminated.
                let ptr = unsafe { libc::dlsym(handle, $name.as_ptr()) };
                if ptr.is_null() {
                    return None;
                }
                // SAFETY: the field's type is the signature cuda.h declares for the symbol
                // (CUdevice is an int, CUcontext a pointer, sizes are size_t).
                unsafe { function(ptr) }
            }};
        }
        Some(Self {
            init: resolve!(c"cuInit"),
            device_get: resolve!(c"cuDeviceGet"),
            primary_ctx_retain: resolve!(c"cuDevicePrimaryCtxRetain"),
            primary_ctx_release: resolve!(c"cuDevicePrimaryCtxRelease_v2"),
            ctx_push: resolve!(c"cuCtxPushCurrent_v2"),
            ctx_pop: resolve!(c"cuCtxPopCurrent_v2"),
            mem_get_info: resolve!(c"cuMemGetInfo_v2"),
        })
    }
}

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `F` must be an `extern "C"` function pointer type matching the symbol's C declaration.
unsafe fn function<F: Copy>(ptr: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size, and the caller vouches for the signature.
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&ptr) }
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
        let auto = parse_device("auto").unwrap();
        assert_eq!(
            auto,
            if count == 0 {
                Device::Cpu
            } else {
                Device::Cuda(0)
            }
        );
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
