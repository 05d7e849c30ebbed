//! Quantized expert formats and their payload layout: which safetensors
//! tensors a quantized matrix is stored as. Block validation
//! ([`crate::chain`]) and the loaders ([`crate::model::quant`]) share it.
//!
//! A matrix `W` of shape `[rows, cols]` (Hugging Face `Linear` layout,
//! `[out, in]`) is cut along each row into groups of [`GROUP`] consecutive
//! weights (so `cols` must be a multiple of 32). Each group has one scale
//! `d` (IEEE f16) and 32 small integers `q`; the weight is `d * q`.
//!
//! | format | tensor `NAME` | tensor `NAME.scales` | value |
//! |---|---|---|---|
//! | `q8_0` | `I8 [rows, cols]`: `q` in -127..=127, row-major | `F16 [rows, cols/32]` | `d * q` |
//! | `q4_0` | `U8 [rows, cols/2]`: per group 16 bytes, byte `j` holds weight `j` in its low nibble and weight `j+16` in its high nibble (ggml's order) | `F16 [rows, cols/32]` | `d * (q - 8)`, `q` in 0..=15 |
//!
//! `NAME` is the Hugging Face tensor name of the unquantized weight (for
//! example `model.layers.0.block_sparse_moe.experts.3.w1.weight`). Only
//! expert matrices are quantized: routers, norms, embeddings and attention
//! keep their float dtype.

use super::TensorSpec;

/// Weights per group (one scale each).
pub const GROUP: usize = 32;

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit symmetric: `d = max|w| / 127`, `q = round(w / d)`.
    Q8_0,
    /// 4-bit: `d = w_max / -8` (`w_max` the weight of largest magnitude,
    /// with its sign), `q = min(15, trunc(w / d + 8.5))`.
    Q4_0,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 2] = [QuantFormat::Q8_0, QuantFormat::Q4_0];

    pub fn as_str(&self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "q8_0" | "Q8_0" => Some(QuantFormat::Q8_0),
            "q4_0" | "Q4_0" => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }

    /// The safetensors dtype of the packed values.
    pub fn values_dtype(&self) -> safetensors::Dtype {
        match self {
            QuantFormat::Q8_0 => safetensors::Dtype::I8,
            QuantFormat::Q4_0 => safetensors::Dtype::U8,
        }
    }

    /// Bytes of packed values in one row of `cols` weights.
    pub fn row_bytes(&self, cols: usize) -> usize {
        match self {
            QuantFormat::Q8_0 => cols,
            QuantFormat::Q4_0 => cols / 2,
        }
    }

    /// Bytes a `[rows, cols]` matrix takes (values and f16 scales).
    pub fn matrix_bytes(&self, rows: usize, cols: usize) -> usize {
        rows * (self.row_bytes(cols) + 2 * (cols / GROUP))
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tensor of a quantized payload: name, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

/// The name of the scales tensor of a quantized matrix.
pub fn scales_name(name: &str) -> String {
    format!("{name}.scales")
}

/// The two tensors (packed values, scales) a float matrix becomes in
/// `format`, or why it cannot be quantized.
pub fn quant_tensors(spec: &TensorSpec, format: QuantFormat) -> Result<[QuantTensor; 2], String> {
    let [rows, cols] = spec.shape[..] else {
        return Err(format!(
            "{}: only matrices are quantized, shape is {:?}",
            spec.name, spec.shape
        ));
    };
    if cols == 0 || !cols.is_multiple_of(GROUP) {
        return Err(format!(
            "{}: {cols} columns are not a multiple of the group size {GROUP}",
            spec.name
        ));
    }
    Ok([
        QuantTensor {
            name: spec.name.clone(),
            dtype: format.values_dtype(),
            shape: vec![rows, format.row_bytes(cols)],
        },
        QuantTensor {
            name: scales_name(&spec.name),
            dtype: safetensors::Dtype::F16,
            shape: vec![rows, cols / GROUP],
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes() {
        let spec = TensorSpec {
            name: "w".into(),
            shape: vec![4, 64],
        };
        let [v, s] = quant_tensors(&spec, QuantFormat::Q4_0).unwrap();
        assert_eq!(v.shape, vec![4, 32]);
        assert_eq!(s.shape, vec![4, 2]);
        assert_eq!(s.name, "w.scales");
        assert_eq!(QuantFormat::Q8_0.matrix_bytes(4, 64), 4 * (64 + 4));
        let odd = TensorSpec {
            name: "w".into(),
            shape: vec![4, 48],
        };
        let e = quant_tensors(&odd, QuantFormat::Q8_0).unwrap_err();
        assert!(e.contains("multiple of the group size 32"), "{e}");
        for f in QuantFormat::ALL {
            assert_eq!(QuantFormat::parse(f.as_str()), Some(f));
        }
    }
}
