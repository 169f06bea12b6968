//! The NCCL backend, a thin binding of our own over the few NCCL calls data parallelism
//! needs, with libnccl loaded at run time (`dlopen`): the crate builds on a machine without
//! CUDA, and at run time uses the `libnccl.so.2` the torch wheel ships (the one libtorch
//! itself links, so both agree on the version). Collectives run on the tensors' device
//! memory (`data_ptr`), on the default CUDA stream that tch's kernels use, so no copy goes
//! through the host and the order with the surrounding kernels is the stream's order.
//!
//! Search order for the library: `$PRIME_NCCL_LIB`, then `libnccl.so.2` as the dynamic
//! loader finds it (already loaded by libtorch_cuda, or on `LD_LIBRARY_PATH`), then the torch
//! wheel's `nvidia/nccl/lib` next to the libtorch this binary was built against.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::env::RankInfo;
use crate::error::{CollectiveError, Result};
use crate::rendezvous::{fetch_unique_id, serve, GroupId};
use crate::{check_numel, Collective, ReduceOp};

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type Stream = *mut c_void;
type NcclResult = c_int;

// ncclDataType_t and ncclRedOp_t values of nccl.h (stable since NCCL 2.0; bf16 since 2.10).
const NCCL_UINT8: c_int = 1;
const NCCL_INT64: c_int = 4;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;

/// The resolved entry points.
struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> NcclResult,
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> NcclResult,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

/// A loaded libnccl.
pub struct Nccl {
    api: Api,
    /// Where it was loaded from, for messages.
    pub origin: String,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("origin", &self.origin)
            .finish()
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns a thread-local C string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null dlerror strings are NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// `dlopen`s the first loadable candidate.
fn open_first(candidates: &[String]) -> Result<(*mut c_void, String)> {
    let mut errors = Vec::new();
    for name in candidates {
        let c = CString::new(name.as_str()).map_err(|e| CollectiveError::Nccl(e.to_string()))?;
        // SAFETY: dlopen with a valid C string; the handle is never closed (the library
        // stays loaded for the life of the process, as libtorch's own copy does).
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return Ok((handle, name.clone()));
        }
        errors.push(format!("{name}: {}", dl_error()));
    }
    Err(CollectiveError::Nccl(format!(
        "could not load libnccl ({}); set PRIME_NCCL_LIB to its path",
        errors.join("; ")
    )))
}

fn symbol(handle: *mut c_void, name: &str) -> Result<*mut c_void> {
    let c = CString::new(name).expect("symbol names have no NUL");
    // SAFETY: handle came from dlopen; name is a valid C string.
    let ptr = unsafe { libc::dlsym(handle, c.as_ptr()) };
    if ptr.is_null() {
        return Err(CollectiveError::Nccl(format!(
            "libnccl lacks {name}: {}",
            dl_error()
        )));
    }
    Ok(ptr)
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

/// The torch wheel's `nvidia/<package>/lib/<file>` next to the libtorch we were built with.
fn wheel_library(package: &str, file: &str) -> Option<String> {
    let torch_lib = PathBuf::from(env!("PRIME_TORCH_LIB_DIR"));
    let site = torch_lib.parent()?.parent()?;
    let path = site.join("nvidia").join(package).join("lib").join(file);
    path.exists().then(|| path.to_string_lossy().into_owned())
}

impl Nccl {
    /// Loads libnccl and resolves every entry point (see the module doc for the search).
    pub fn load() -> Result<Self> {
        let mut candidates: Vec<String> = std::env::var("PRIME_NCCL_LIB").into_iter().collect();
        candidates.push("libnccl.so.2".into());
        candidates.extend(wheel_library("nccl", "libnccl.so.2"));
        let (handle, origin) = open_first(&candidates)?;
        macro_rules! resolve {
            ($name:literal) => {
                // SAFETY: the field's type is the signature nccl.h declares for this symbol.
                unsafe { function(symbol(handle, $name)?) }
            };
        }
        let api = Api {
            get_version: resolve!("ncclGetVersion"),
            get_unique_id: resolve!("ncclGetUniqueId"),
            comm_init_rank: resolve!("ncclCommInitRank"),
            all_reduce: resolve!("ncclAllReduce"),
            reduce_scatter: resolve!("ncclReduceScatter"),
            all_gather: resolve!("ncclAllGather"),
            broadcast: resolve!("ncclBroadcast"),
            comm_abort: resolve!("ncclCommAbort"),
            comm_destroy: resolve!("ncclCommDestroy"),
            comm_get_async_error: resolve!("ncclCommGetAsyncError"),
            get_error_string: resolve!("ncclGetErrorString"),
        };
        Ok(Self { api, origin })
    }

    fn check(&self, what: &str, result: NcclResult) -> Result<()> {
        if result == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let text = unsafe { CStr::from_ptr((self.api.get_error_string)(result)) };
        Err(CollectiveError::Nccl(format!(
            "{what}: {} (code {result})",
            text.to_string_lossy()
        )))
    }

    /// NCCL's version code (e.g. 22703 for 2.27.3).
    pub fn version(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int.
        self.check("ncclGetVersion", unsafe { (self.api.get_version)(&mut v) })?;
        Ok(v)
    }

    /// A fresh communicator id (rank 0 makes it; it embeds rank 0's bootstrap address).
    pub fn unique_id(&self) -> Result<Vec<u8>> {
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: writes one ncclUniqueId.
        self.check("ncclGetUniqueId", unsafe {
            (self.api.get_unique_id)(&mut id)
        })?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }
}

/// Makes `index` the calling thread's current CUDA device, as ncclCommInitRank requires,
/// through the CUDA runtime libtorch already loaded.
fn set_device(index: usize) -> Result<()> {
    let mut candidates = vec!["libcudart.so.12".to_string(), "libcudart.so".to_string()];
    candidates.extend(wheel_library("cuda_runtime", "libcudart.so.12"));
    let (handle, _) =
        open_first(&candidates).map_err(|e| CollectiveError::Nccl(format!("CUDA runtime: {e}")))?;
    // SAFETY: cudaSetDevice(int) -> cudaError_t, as cuda_runtime_api.h declares.
    let set: unsafe extern "C" fn(c_int) -> c_int =
        unsafe { function(symbol(handle, "cudaSetDevice")?) };
    // SAFETY: plain call with a device ordinal.
    let code = unsafe { set(index as c_int) };
    if code != 0 {
        return Err(CollectiveError::Nccl(format!(
            "cudaSetDevice({index}) failed with {code}"
        )));
    }
    Ok(())
}

/// Aborts a communicator from another thread (the watchdog's abort).
#[derive(Clone)]
pub struct NcclAbort {
    lib: Arc<Nccl>,
    comm: usize,
}

impl std::fmt::Debug for NcclAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclAbort")
    }
}

impl NcclAbort {
    /// `ncclCommAbort`: pending and later operations on the communicator fail.
    pub fn abort(&self) {
        // SAFETY: the comm stays allocated while its group lives; aborting from another
        // thread is what ncclCommAbort is for.
        let r = unsafe { (self.lib.api.comm_abort)(self.comm as Comm) };
        if r != 0 {
            tracing::error!(code = r, "ncclCommAbort failed");
        }
    }
}

/// An NCCL communicator over one CUDA device per rank, implementing [`Collective`].
pub struct NcclGroup {
    lib: Arc<Nccl>,
    comm: Comm,
    rank: usize,
    world_size: usize,
    device: usize,
    aborted: bool,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device)
            .finish()
    }
}

// SAFETY: the communicator is used by one thread at a time (every operation takes
// `&mut self`); NCCL allows that thread to differ from the creating one.
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Forms the group on GPU `info.local_rank`: rank 0 makes the id and serves it over gRPC
    /// on `MASTER_ADDR:MASTER_PORT` with `epoch`; the others fetch it (until `join_timeout`);
    /// then every rank calls `ncclCommInitRank`, which returns once all have.
    pub fn join(
        info: &RankInfo,
        epoch: u64,
        join_timeout: Duration,
        token: Option<&str>,
    ) -> Result<Self> {
        let lib = Arc::new(Nccl::load()?);
        set_device(info.local_rank)?;
        let (bytes, _server) = if info.rank == 0 {
            let bytes = lib.unique_id()?;
            let addr = format!("0.0.0.0:{}", info.master_port)
                .parse()
                .expect("a socket address");
            let server = serve(
                addr,
                GroupId {
                    unique_id: bytes.clone(),
                    epoch,
                    world_size: info.world_size,
                },
                token.map(String::from),
            )?;
            (bytes, Some(server))
        } else {
            let bytes = fetch_unique_id(
                &info.master(),
                info.rank,
                info.world_size,
                epoch,
                join_timeout,
                token,
            )?;
            (bytes, None)
        };
        let group = Self::with_unique_id(lib, &bytes, info.rank, info.world_size, info.local_rank)?;
        tracing::info!(
            rank = info.rank,
            world_size = info.world_size,
            epoch,
            nccl = group.lib.version().unwrap_or_default(),
            "joined the NCCL group"
        );
        Ok(group)
    }

    /// Forms a group from an id handed out by other means (the learner's weight broadcast
    /// sends it in a gRPC reply): every rank calls `ncclCommInitRank` on CUDA device
    /// `device`, which returns once all have.
    pub fn from_unique_id(
        unique_id: &[u8],
        rank: usize,
        world_size: usize,
        device: usize,
    ) -> Result<Self> {
        let lib = Arc::new(Nccl::load()?);
        set_device(device)?;
        Self::with_unique_id(lib, unique_id, rank, world_size, device)
    }

    /// `ncclCommInitRank` with `bytes` as the id.
    fn with_unique_id(
        lib: Arc<Nccl>,
        bytes: &[u8],
        rank: usize,
        world_size: usize,
        device: usize,
    ) -> Result<Self> {
        if bytes.len() != UNIQUE_ID_BYTES {
            return Err(CollectiveError::Join(format!(
                "the group id has {} bytes, NCCL's has {UNIQUE_ID_BYTES}",
                bytes.len()
            )));
        }
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (d, s) in id.internal.iter_mut().zip(bytes) {
            *d = *s as c_char;
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: comm receives the new communicator; id is passed by value as nccl.h says.
        let r =
            unsafe { (lib.api.comm_init_rank)(&mut comm, world_size as c_int, id, rank as c_int) };
        lib.check("ncclCommInitRank", r)?;
        Ok(Self {
            lib,
            comm,
            rank,
            world_size,
            device,
            aborted: false,
        })
    }

    /// A handle that aborts this communicator from any thread.
    pub fn abort_handle(&self) -> NcclAbort {
        NcclAbort {
            lib: self.lib.clone(),
            comm: self.comm as usize,
        }
    }

    fn dtype(&self, t: &Tensor) -> Result<c_int> {
        if t.device() != Device::Cuda(self.device) {
            return Err(CollectiveError::Tensor(format!(
                "NCCL rank {} works on cuda:{}, the tensor is on {:?}",
                self.rank,
                self.device,
                t.device()
            )));
        }
        if !t.is_contiguous() {
            return Err(CollectiveError::Tensor(
                "NCCL needs contiguous tensors".into(),
            ));
        }
        Ok(match t.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::Double => NCCL_FLOAT64,
            Kind::BFloat16 => NCCL_BFLOAT16,
            Kind::Int64 => NCCL_INT64,
            Kind::Uint8 => NCCL_UINT8,
            k => {
                return Err(CollectiveError::Tensor(format!(
                    "NCCL: unsupported dtype {k:?}"
                )))
            }
        })
    }

    /// Waits for the enqueued operation (so errors and the watchdog see its real end) and
    /// reports an asynchronous communicator error.
    fn finish(&mut self, what: &str, result: NcclResult) -> Result<()> {
        self.lib.check(what, result)?;
        tch::Cuda::synchronize(self.device as i64);
        let mut async_error = 0;
        // SAFETY: writes one ncclResult_t.
        let r = unsafe { (self.lib.api.comm_get_async_error)(self.comm, &mut async_error) };
        self.lib.check("ncclCommGetAsyncError", r)?;
        if async_error != 0 {
            self.aborted = true;
            return self.lib.check(what, async_error);
        }
        Ok(())
    }

    fn red_op(op: ReduceOp) -> c_int {
        match op {
            ReduceOp::Sum => NCCL_SUM,
            ReduceOp::Mean => NCCL_AVG,
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the comm is valid until here; a failed one is aborted, not destroyed.
        unsafe {
            if self.aborted {
                (self.lib.api.comm_abort)(self.comm);
            } else {
                (self.lib.api.comm_destroy)(self.comm);
            }
        }
    }
}

/// Null: the legacy default stream, the one tch's kernels run on (tch never sets another).
const DEFAULT_STREAM: Stream = std::ptr::null_mut();

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let dtype = self.dtype(tensor)?;
        let p = tensor.data_ptr();
        // SAFETY: in-place on the tensor's own device memory, numel elements of dtype.
        let r = unsafe {
            (self.lib.api.all_reduce)(
                p,
                p,
                tensor.numel(),
                dtype,
                Self::red_op(op),
                self.comm,
                DEFAULT_STREAM,
            )
        };
        self.finish("ncclAllReduce", r)
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        let dtype = self.dtype(input)?;
        if self.dtype(output)? != dtype {
            return Err(CollectiveError::Tensor(
                "reduce_scatter output dtype differs".into(),
            ));
        }
        let n = input.numel() / self.world_size;
        check_numel(input, n * self.world_size, "reduce_scatter input")?;
        check_numel(output, n, "reduce_scatter output")?;
        // SAFETY: input holds world·n elements, output n, both on this rank's device.
        let r = unsafe {
            (self.lib.api.reduce_scatter)(
                input.data_ptr(),
                output.data_ptr(),
                n,
                dtype,
                Self::red_op(op),
                self.comm,
                DEFAULT_STREAM,
            )
        };
        self.finish("ncclReduceScatter", r)
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let dtype = self.dtype(input)?;
        if self.dtype(output)? != dtype {
            return Err(CollectiveError::Tensor(
                "all_gather output dtype differs".into(),
            ));
        }
        check_numel(output, input.numel() * self.world_size, "all_gather output")?;
        // SAFETY: input holds n elements, output world·n, both on this rank's device.
        let r = unsafe {
            (self.lib.api.all_gather)(
                input.data_ptr(),
                output.data_ptr(),
                input.numel(),
                dtype,
                self.comm,
                DEFAULT_STREAM,
            )
        };
        self.finish("ncclAllGather", r)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let dtype = self.dtype(tensor)?;
        let p = tensor.data_ptr();
        // SAFETY: in-place on the tensor's own device memory.
        let r = unsafe {
            (self.lib.api.broadcast)(
                p,
                p,
                tensor.numel(),
                dtype,
                root as c_int,
                self.comm,
                DEFAULT_STREAM,
            )
        };
        self.finish("ncclBroadcast", r)
    }

    fn set_op_timeout(&mut self, _limit: Duration) -> Duration {
        // NCCL has no timeout; the watchdog around the group enforces one.
        Duration::MAX
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = Tensor::ones([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce(&mut one, ReduceOp::Sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A world-size-1 communicator on real device memory: all-reduce (sum and mean) and
    /// broadcast leave the values as they are, reduce-scatter and all-gather copy. Runs only
    /// where CUDA is available (a GPU task); elsewhere it checks nothing.
    #[test]
    fn world_of_one_on_cuda() {
        if !tch::Cuda::is_available() {
            eprintln!("no CUDA device here: the NCCL run needs a GPU task");
            return;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let info = RankInfo {
            master_port: port,
            ..RankInfo::single()
        };
        let mut group = NcclGroup::join(&info, 0, Duration::from_secs(60), None).unwrap();
        let device = Device::Cuda(0);
        for kind in [Kind::Float, Kind::BFloat16] {
            let values = Tensor::from_slice(&[1.5f32, -2.0, 3.25, 0.0]).to_kind(kind);
            let mut t = values.to_device(device);
            group.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            group.all_reduce(&mut t, ReduceOp::Mean).unwrap();
            group.broadcast(&mut t, 0).unwrap();
            assert!(t.to_device(Device::Cpu).equal(&values), "{kind:?}");
            let mut out = Tensor::zeros([4], (kind, device));
            group.reduce_scatter(&t, &mut out, ReduceOp::Sum).unwrap();
            assert!(out.to_device(Device::Cpu).equal(&values));
            let mut gathered = Tensor::zeros([4], (kind, device));
            group.all_gather(&out, &mut gathered).unwrap();
            assert!(gathered.to_device(Device::Cpu).equal(&values));
        }
        group.barrier().unwrap();
    }

    /// Loads the libnccl of the torch wheel (present even in this CPU-only environment),
    /// resolves every symbol the binding uses and makes two unique ids; skipped where no
    /// libnccl exists.
    #[test]
    fn loads_the_wheels_libnccl() {
        match Nccl::load() {
            Ok(lib) => {
                let v = lib.version().unwrap();
                eprintln!("loaded NCCL {v} from {}", lib.origin);
                assert!(v >= 21000, "NCCL {v} predates bf16 support");
                // Making a unique id needs no GPU (it opens rank 0's bootstrap socket).
                let (a, b) = (lib.unique_id().unwrap(), lib.unique_id().unwrap());
                assert_eq!(a.len(), UNIQUE_ID_BYTES);
                assert!(a.iter().any(|&x| x != 0));
                assert_ne!(a, b, "two groups got the same id");
            }
            Err(e) => eprintln!("no libnccl here, nothing to check: {e}"),
        }
    }
}
