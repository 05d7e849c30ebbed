//! The device check before downloading: WebGPU present (`navigator.gpu`),
//! an adapter from wgpu with its limits and `shader-f16`, the browser's
//! memory hint (`navigator.deviceMemory`); which engine answers is decided
//! by [`crate::view::device::plan`].

use crate::view::device::{plan, AdapterFacts, Needs};

/// What the check found and what the page will do.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCheck {
    pub webgpu: bool,
    /// The adapter's name ("" when there is none or the browser hides it).
    pub adapter: String,
    pub f16: bool,
    pub max_storage_buffer: u64,
    pub max_buffer: u64,
    /// `navigator.deviceMemory` in GiB (Chromium only, rounded and capped by the browser).
    pub memory_gib: Option<f64>,
    /// Answers run on the GPU (else on the CPU path).
    pub plan_gpu: bool,
    /// What will happen, in plain words.
    pub message: String,
}

fn navigator_field(name: &str) -> Option<wasm_bindgen::JsValue> {
    let nav = web_sys::window()?.navigator();
    js_sys::Reflect::get(&nav, &name.into())
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_null())
}

async fn adapter() -> Result<AdapterFacts, String> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let a = instance
        .request_adapter(&wgpu::RequestAdapterOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let info = a.get_info();
    let limits = a.limits();
    Ok(AdapterFacts {
        name: if info.name.is_empty() {
            info.driver.clone()
        } else {
            info.name.clone()
        },
        f16: a.features().contains(wgpu::Features::SHADER_F16),
        max_storage_buffer: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
    })
}

/// Check the device for an expert pool of `expert_pool_bytes`.
pub async fn check(expert_pool_bytes: u64) -> DeviceCheck {
    check_with(Needs {
        largest_buffer: 0,
        pool_bytes: expert_pool_bytes,
    })
    .await
}

/// [`check`] with the model's largest single buffer known too.
pub async fn check_with(needs: Needs) -> DeviceCheck {
    let webgpu = navigator_field("gpu").is_some();
    let memory_gib = navigator_field("deviceMemory").and_then(|v| v.as_f64());
    let found = if webgpu {
        adapter().await
    } else {
        Err("no navigator.gpu".into())
    };
    let p = plan(
        webgpu,
        found.as_ref().map_err(String::as_str),
        memory_gib,
        needs,
    );
    let a = found.ok();
    DeviceCheck {
        webgpu,
        adapter: a.as_ref().map(|a| a.name.clone()).unwrap_or_default(),
        f16: a.as_ref().is_some_and(|a| a.f16),
        max_storage_buffer: a.as_ref().map_or(0, |a| a.max_storage_buffer),
        max_buffer: a.as_ref().map_or(0, |a| a.max_buffer),
        memory_gib,
        plan_gpu: p.gpu,
        message: p.message,
    }
}
