//! Device setup, apart from the work functions: pick an adapter from the
//! environment, request a device within its limits, and read buffers back.

use wgpu::util::DeviceExt;

/// Preferred invocations per workgroup for the one-row-per-invocation
/// kernels, clamped to what the adapter reports (SwiftShader: 128 or 256).
/// On lavapipe here 128 decoded fastest (gpu_engine bench, default model:
/// about 4-6.5 ms/token at 128 against 9-10 ms at 64 and 256; noisy, shared CPU).
pub const PREFERRED_WORKGROUP: u32 = 128;

/// Errors of the GPU layer.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    #[error("request device: {0}")]
    Device(String),
    #[error("buffer readback: {0}")]
    Readback(String),
    #[error("adapter limit: {0}")]
    Limit(String),
    #[error("invalid input: {0}")]
    Input(String),
}

/// A wgpu device and queue plus what the kernels need to know about the adapter.
/// A clone shares the device and queue (wgpu handles), so tests can run
/// engines with other workgroup sizes or limits on one device.
#[derive(Debug, Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Invocations per workgroup used by the kernels (passed as the `WG`
    /// pipeline-overridable constant).
    pub workgroup_size: u32,
    /// Invocations per workgroup of the decode kernels that synchronise a
    /// workgroup (`attn_decode`, `expert_up`: workgroup barriers, one
    /// workgroup per head or per token). [`barrier_workgroup_size`] of the
    /// adapter; `AIBLOCK_GPU_BARRIER_WG` overrides natively. In the browser
    /// `expert_up` has its own ([`GpuContext::expert_up_workgroup_size`]).
    pub barrier_workgroup_size: u32,
    /// At most this many workgroups per token in `expert_up`
    /// ([`expert_up_groups`]); 0: no limit.
    pub expert_up_groups: u32,
    /// The CPU threads a software adapter ([`wgpu::DeviceType::Cpu`]) runs
    /// workgroups on; 0 for other adapters ([`GpuContext::spread_workgroup`]).
    pub cpu_threads: u32,
    /// At most this many query heads per `attn_decode` workgroup
    /// ([`super::attn_decode::heads_per_group`]); 0: all of a kv head's
    /// (one workgroup per kv head where its memory holds them), 1: one
    /// workgroup per query head. `AIBLOCK_GPU_ATTN_GROUP` sets it natively.
    pub attn_heads_per_group: u32,
}

/// The CPU threads a software adapter runs workgroups on: the machine's
/// (natively), or the page's `navigator.hardwareConcurrency`; at least 1.
fn cpu_threads() -> u32 {
    #[cfg(not(target_arch = "wasm32"))]
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(target_arch = "wasm32")]
    let n = web_sys::window().map_or(1.0, |w| w.navigator().hardware_concurrency()) as usize;
    n.clamp(1, 256) as u32
}

/// `expert_up`'s workgroups per token for an adapter of `device_type`.
/// Each workgroup of a token routes it (norm, gate, softmax, top-k) and
/// stages its row again; a GPU hides that behind its parallelism, but a CPU
/// implementation (SwiftShader, lavapipe: [`wgpu::DeviceType::Cpu`]) runs a
/// workgroup at a time per thread, so more workgroups than threads only
/// repeat that work: at most one per CPU thread there (SwiftShader, 2
/// threads, the default model's shape: 2 workgroups of 16 for 8 took
/// ~0.8x the time); no limit elsewhere (0).
pub fn expert_up_groups(device_type: wgpu::DeviceType, threads: u32) -> u32 {
    match device_type {
        wgpu::DeviceType::Cpu => threads,
        _ => 0,
    }
}

/// Workgroup size of the barrier kernels on the browser's WebGPU, whose
/// adapter may be SwiftShader (Chromium's CPU fallback, unnamed to the page).
pub const BROWSER_BARRIER_WORKGROUP: u32 = 16;

/// `expert_up`'s workgroup size on the browser's WebGPU. With its workgroup
/// arrays sized for the model ([`super::kernel::sized_source`]), its vec4
/// kernel on SwiftShader took 0.34 ms per dispatch at 16, 0.46 at 32, 0.58
/// at 64 invocations (the default model's shape, 2 of 8 experts routed
/// in-kernel; with the arrays at their largest: 1.20 ms at 16, 0.58 at 64).
pub const BROWSER_EXPERT_UP_WORKGROUP: u32 = 16;

/// The barrier kernels' workgroup size for `backend` given the kernels'
/// `workgroup_size`. SwiftShader runs each group of 4 invocations of a
/// workgroup with barriers as a coroutine, and its cost grows with the
/// workgroup size, not the work: attn_decode at the model's shape (hidden
/// 128, 4 heads of 32) took 1.70 ms per dispatch with 128 invocations, 1.05
/// ms with 64, 0.77 ms with 32, 0.38 ms with 16 (same work). The page cannot
/// tell SwiftShader from a GPU, so in the browser these kernels use
/// [`BROWSER_BARRIER_WORKGROUP`] (one workgroup per head or token does little
/// work either way); native adapters keep `workgroup_size`.
///
/// `expert_up` (one token's rows over several workgroups, each routing the
/// token itself) has its own, [`BROWSER_EXPERT_UP_WORKGROUP`]
/// ([`GpuContext::expert_up_workgroup_size`]): with its workgroup arrays
/// sized for the model it is the same size now.
pub fn barrier_workgroup_size(backend: wgpu::Backend, workgroup_size: u32) -> u32 {
    match backend {
        wgpu::Backend::BrowserWebGpu => BROWSER_BARRIER_WORKGROUP.min(workgroup_size),
        _ => workgroup_size,
    }
}

impl GpuContext {
    /// Pick an adapter the way wgpu's examples do: backends from
    /// `WGPU_BACKEND`, an adapter whose name contains `WGPU_ADAPTER_NAME`
    /// (case-insensitive) if that is set, else the default adapter
    /// (`WGPU_POWER_PREF` respected). Then request a device with the
    /// adapter's own limits.
    pub async fn new() -> Result<Self, GpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env());
        let adapter = pick_adapter(&instance).await?;
        Self::from_adapter(adapter).await
    }

    /// Native convenience: [`GpuContext::new`] driven by `pollster`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> Result<Self, GpuError> {
        pollster::block_on(Self::new())
    }

    /// Request a device on a given adapter.
    pub async fn from_adapter(adapter: wgpu::Adapter) -> Result<Self, GpuError> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("aiblock"),
                required_features: wgpu::Features::empty(),
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| GpuError::Device(e.to_string()))?;
        let mut workgroup_size = PREFERRED_WORKGROUP
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(wg) = std::env::var("AIBLOCK_GPU_WG")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            workgroup_size = wg
                .clamp(1, limits.max_compute_invocations_per_workgroup)
                .min(limits.max_compute_workgroup_size_x);
        }
        workgroup_size = workgroup_size.max(1);
        #[allow(unused_mut)]
        let mut barrier_wg = barrier_workgroup_size(info.backend, workgroup_size);
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(wg) = std::env::var("AIBLOCK_GPU_BARRIER_WG")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            barrier_wg = wg
                .clamp(1, limits.max_compute_invocations_per_workgroup)
                .min(limits.max_compute_workgroup_size_x);
        }
        #[allow(unused_mut)]
        let mut threads = match info.device_type {
            wgpu::DeviceType::Cpu => cpu_threads(),
            _ => 0,
        };
        // Natively, `AIBLOCK_GPU_CPU_THREADS` sets them (0: a GPU's schedule
        // on any adapter; benchmarks compare the two).
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(t) = std::env::var("AIBLOCK_GPU_CPU_THREADS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            threads = t.min(256);
        }
        #[allow(unused_mut)]
        let mut up_groups = expert_up_groups(info.device_type, threads);
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(g) = std::env::var("AIBLOCK_GPU_EXPERT_GROUPS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            up_groups = g;
        }
        #[allow(unused_mut)]
        let mut attn_group = 0;
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(g) = std::env::var("AIBLOCK_GPU_ATTN_GROUP")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            attn_group = g;
        }
        tracing::info!(
            adapter = %info.name,
            attn_group,
            device_type = ?info.device_type,
            up_groups,
            backend = ?info.backend,
            workgroup_size,
            barrier_wg,
            max_storage_binding = limits.max_storage_buffer_binding_size,
            "gpu context ready"
        );
        Ok(Self {
            device,
            queue,
            info,
            limits,
            workgroup_size,
            barrier_workgroup_size: barrier_wg,
            expert_up_groups: up_groups,
            cpu_threads: threads,
            attn_heads_per_group: attn_group,
        })
    }

    /// `expert_up`'s workgroup size: [`BROWSER_EXPERT_UP_WORKGROUP`] on the
    /// browser's WebGPU (unless the barrier kernels' size was set smaller),
    /// else [`GpuContext::barrier_workgroup_size`].
    pub fn expert_up_workgroup_size(&self) -> u32 {
        match self.info.backend {
            wgpu::Backend::BrowserWebGpu => BROWSER_EXPERT_UP_WORKGROUP.min(self.workgroup_size),
            _ => self.barrier_workgroup_size,
        }
    }

    /// The workgroup size for a kernel without barriers that runs
    /// `invocations` per token: [`GpuContext::workgroup_size`], except on a
    /// software adapter, where a workgroup runs on one CPU thread: there
    /// the invocations are spread over one workgroup per thread (a
    /// multiple of 4, the SIMD width SwiftShader runs invocations in).
    /// `expert_down` at the default model's shape (16 invocations) on
    /// SwiftShader, 2 threads: 0.19 ms per dispatch in 2 workgroups of 8
    /// against 0.24 in one of 128.
    pub fn spread_workgroup(&self, invocations: u64) -> u32 {
        if self.cpu_threads == 0 {
            return self.workgroup_size;
        }
        let per = invocations
            .div_ceil(u64::from(self.cpu_threads))
            .div_ceil(4)
            * 4;
        per.clamp(1, u64::from(self.workgroup_size)) as u32
    }

    /// True for CPU implementations (lavapipe/llvmpipe, SwiftShader, WARP).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Largest storage binding the device accepts, in bytes.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// A storage buffer initialised with `data` (at least 4 bytes, so that
    /// empty inputs still bind).
    pub fn storage_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let padded;
        let contents = if data.len() < 4 || !data.len().is_multiple_of(4) {
            let mut v = data.to_vec();
            v.resize(data.len().div_ceil(4).max(1) * 4, 0);
            padded = v;
            &padded[..]
        } else {
            data
        };
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
            })
    }

    /// A zeroed storage buffer of `bytes` (rounded up to 4, at least 4).
    pub fn storage_zeroed(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.div_ceil(4).max(1) * 4,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A uniform buffer holding `data`.
    pub fn uniform_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: data,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// A buffer the CPU can map for reading.
    pub fn readback_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.div_ceil(4).max(1) * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Map `bytes` of a `MAP_READ` buffer and copy them out. Natively this
    /// blocks in `device.poll`; in the browser it awaits `map_async`.
    pub async fn read_mapped(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<u8>, GpuError> {
        let m = self.begin_map(buffer, bytes, None);
        self.finish_map(buffer, m).await
    }

    /// Start mapping `bytes` of a `MAP_READ` buffer, written by work already
    /// submitted (`after`: that submission, which a native wait stops at, so
    /// that later submissions keep running; `None`: every submission so
    /// far). Work submitted after this runs on while the mapping waits;
    /// [`GpuContext::finish_map`] reads the bytes and unmaps. The buffer
    /// must not be used by a submission until then.
    pub fn begin_map(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Mapping {
        let size = bytes.div_ceil(4).max(1) * 4;
        let (tx, rx) = futures_channel::oneshot::channel();
        buffer
            .slice(..size)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        // The browser resolves the mapping on its own; only a native wait
        // needs the submission.
        #[cfg(target_arch = "wasm32")]
        let _ = after;
        Mapping {
            rx,
            bytes,
            #[cfg(not(target_arch = "wasm32"))]
            after,
        }
    }

    /// Wait for a [`GpuContext::begin_map`] of `buffer`, copy its bytes out
    /// and unmap it.
    pub async fn finish_map(&self, buffer: &wgpu::Buffer, m: Mapping) -> Result<Vec<u8>, GpuError> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: m.after,
                timeout: None,
            })
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let mapped =
            m.rx.await
                .map_err(|_| GpuError::Readback("map callback dropped".into()))
                .and_then(|r| r.map_err(|e| GpuError::Readback(e.to_string())));
        // Not mapped (a failed mapping leaves the buffer unmapped).
        mapped?;
        let size = m.bytes.div_ceil(4).max(1) * 4;
        let out = {
            let view = buffer
                .slice(..size)
                .get_mapped_range()
                .map_err(|e| GpuError::Readback(e.to_string()));
            view.map(|v| v[..m.bytes as usize].to_vec())
        };
        buffer.unmap();
        out
    }

    /// Copy `bytes` of a storage buffer into a fresh readback buffer, submit,
    /// and return them (tests and one-shot kernels).
    pub async fn read_buffer(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let size = bytes.div_ceil(4).max(1) * 4;
        let rb = self.readback_buffer("readback", size);
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, &rb, 0, size);
        self.queue.submit([enc.finish()]);
        self.read_mapped(&rb, bytes).await
    }

    /// [`GpuContext::read_buffer`] as `f32`s.
    pub async fn read_f32(&self, src: &wgpu::Buffer, count: usize) -> Result<Vec<f32>, GpuError> {
        let bytes = self.read_buffer(src, (count * 4) as u64).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// [`GpuContext::read_buffer`] as `u32`s.
    pub async fn read_u32(&self, src: &wgpu::Buffer, count: usize) -> Result<Vec<u32>, GpuError> {
        let bytes = self.read_buffer(src, (count * 4) as u64).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// A mapping in flight ([`GpuContext::begin_map`]).
#[derive(Debug)]
pub struct Mapping {
    rx: futures_channel::oneshot::Receiver<Result<(), wgpu::BufferAsyncError>>,
    bytes: u64,
    #[cfg(not(target_arch = "wasm32"))]
    after: Option<wgpu::SubmissionIndex>,
}

async fn pick_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter, GpuError> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Ok(want) = std::env::var("WGPU_ADAPTER_NAME") {
        let want = want.to_lowercase();
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&want))
            .ok_or_else(|| {
                GpuError::NoAdapter(format!(
                    "WGPU_ADAPTER_NAME={want:?} matches none of {names:?}"
                ))
            });
    }
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::from_env().unwrap_or_default(),
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        })
        .await
        .map_err(|e| GpuError::NoAdapter(e.to_string()))
}
