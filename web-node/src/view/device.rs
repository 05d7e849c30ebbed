//! The device check's decision, apart from the browser: given what WebGPU
//! reported (or that it is missing) and the browser's memory hint, which
//! engine answers and why, in plain words.

use super::fmt_bytes;

/// What the adapter reported.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFacts {
    /// The adapter's name ("" when the browser hides it).
    pub name: String,
    /// `shader-f16` is supported.
    pub f16: bool,
    /// `maxStorageBufferBindingSize`, bytes.
    pub max_storage_buffer: u64,
    /// `maxBufferSize`, bytes.
    pub max_buffer: u64,
}

/// What the model needs from a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Needs {
    /// The largest single binding the engine allocates (0: unknown).
    pub largest_buffer: u64,
    /// Bytes of the expert pool.
    pub pool_bytes: u64,
}

/// The share of `navigator.deviceMemory` the expert pool may take.
pub const MEMORY_SHARE: f64 = 0.5;

/// The engine the page plans to use, and the sentence that says so.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub gpu: bool,
    pub message: String,
}

const CPU: &str = "answers run on the CPU (wasm)";
const GIB: f64 = (1u64 << 30) as f64;

fn gib(x: f64) -> String {
    if x >= 1.0 {
        format!("{x:.0} GiB")
    } else {
        format!("{:.0} MiB", x * 1024.0)
    }
}

/// Decide the engine: the GPU when WebGPU gave an adapter whose limits hold
/// the model's largest buffer and the pool fits the memory budget, else
/// the CPU. `adapter` is `Err(reason)` when WebGPU is present but gave no
/// adapter; ignored when `webgpu` is false.
pub fn plan(
    webgpu: bool,
    adapter: Result<&AdapterFacts, &str>,
    memory_gib: Option<f64>,
    needs: Needs,
) -> Plan {
    let cpu = |message: String| Plan {
        gpu: false,
        message,
    };
    if !webgpu {
        return cpu(format!("No WebGPU in this browser: {CPU}."));
    }
    let a = match adapter {
        Ok(a) => a,
        Err(e) => {
            return cpu(format!(
                "WebGPU is present but gave no adapter ({}): {CPU}.",
                if e.is_empty() { "no reason given" } else { e }
            ))
        }
    };
    let name = if a.name.trim().is_empty() {
        "unnamed adapter"
    } else {
        a.name.trim()
    };
    let bind = a.max_storage_buffer.min(a.max_buffer);
    let head = format!(
        "WebGPU: {name} (f16: {}), storage buffers up to {}",
        if a.f16 { "yes" } else { "no" },
        fmt_bytes(bind)
    );
    if needs.largest_buffer > bind {
        return cpu(format!(
            "{head}: too small for the model's largest buffer ({}): {CPU}.",
            fmt_bytes(needs.largest_buffer)
        ));
    }
    if let Some(m) = memory_gib.filter(|m| *m > 0.0) {
        let budget = m * MEMORY_SHARE;
        if needs.pool_bytes as f64 > budget * GIB {
            return cpu(format!(
                "{head}: the expert pool ({}) is more than this device's memory budget \
                 ({} of {}): {CPU}.",
                fmt_bytes(needs.pool_bytes),
                gib(budget),
                gib(m)
            ));
        }
    }
    Plan {
        gpu: true,
        message: format!("{head}: answers run on the GPU."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swiftshader() -> AdapterFacts {
        AdapterFacts {
            name: "SwiftShader".into(),
            f16: false,
            max_storage_buffer: 128 << 20,
            max_buffer: 256 << 20,
        }
    }

    #[test]
    fn no_webgpu_means_cpu() {
        let p = plan(false, Err(""), None, Needs::default());
        assert!(!p.gpu);
        assert_eq!(
            p.message,
            "No WebGPU in this browser: answers run on the CPU (wasm)."
        );
    }

    #[test]
    fn no_adapter_means_cpu() {
        let p = plan(true, Err("blocklisted"), Some(8.0), Needs::default());
        assert!(!p.gpu);
        assert!(
            p.message.contains("no adapter (blocklisted)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn adapter_that_fits_means_gpu() {
        let a = swiftshader();
        let needs = Needs {
            largest_buffer: 4 << 20,
            pool_bytes: 64 << 20,
        };
        let p = plan(true, Ok(&a), Some(8.0), needs);
        assert!(p.gpu);
        assert_eq!(
            p.message,
            "WebGPU: SwiftShader (f16: no), storage buffers up to 128.0 MiB: answers run on the GPU."
        );
        // No memory hint (Firefox, Safari): the limits decide.
        assert!(plan(true, Ok(&a), None, needs).gpu);
    }

    #[test]
    fn small_limits_or_memory_mean_cpu() {
        let a = swiftshader();
        let big = Needs {
            largest_buffer: 200 << 20,
            pool_bytes: 0,
        };
        let p = plan(true, Ok(&a), None, big);
        assert!(!p.gpu);
        assert!(p.message.contains("too small"), "{}", p.message);
        let pool = Needs {
            largest_buffer: 1,
            pool_bytes: 3 << 30,
        };
        let p = plan(true, Ok(&a), Some(4.0), pool);
        assert!(!p.gpu);
        assert!(p.message.contains("2 GiB of 4 GiB"), "{}", p.message);
    }

    #[test]
    fn unnamed_adapter() {
        let a = AdapterFacts {
            name: " ".into(),
            f16: true,
            ..swiftshader()
        };
        let p = plan(true, Ok(&a), None, Needs::default());
        assert!(p.message.starts_with("WebGPU: unnamed adapter (f16: yes)"));
    }
}
