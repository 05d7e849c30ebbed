//! Quantized expert weights (`q8_0`, `q4_0`; layout in
//! [`crate::spec::quant`]): deterministic quantization, the payload of a
//! quantized expert block, its re-derivation check, and the CPU product
//! that reads the packed values directly (one row is expanded at a time,
//! never the whole matrix).
//!
//! Quantization is a pure function of the source weights: scalar f32
//! arithmetic in a fixed order (no threads, no fused multiply-add), IEEE
//! f16 scales rounded to nearest even, so every machine makes the same bytes.

use std::collections::BTreeMap;

use half::f16;

use super::{Config, ExpertWeights, Mat, ModelError, Slot, TensorSpec, Weight};
use crate::spec::quant::{quant_tensors, scales_name, QuantFormat, GROUP};

/// A quantized `[rows, cols]` matrix: packed values row by row
/// (`format.row_bytes(cols)` bytes per row) and one scale per group of 32
/// (kept as f32; stored as f16 in payloads).
#[derive(Debug, Clone, PartialEq)]
pub struct QMat {
    pub rows: usize,
    pub cols: usize,
    pub format: QuantFormat,
    pub values: Vec<u8>,
    /// The f16 scales as stored (bit patterns), `rows * cols / 32`.
    pub scale_bits: Vec<u16>,
    /// The same scales as f32.
    pub scales: Vec<f32>,
}

fn tensor_err(name: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Tensor {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Quantize one group of 32 weights: (scale as f16, 32 values as stored:
/// i8 as u8 for q8_0, 32 nibbles in 16 bytes for q4_0).
fn quantize_group(x: &[f32], format: QuantFormat, out: &mut Vec<u8>) -> f16 {
    match format {
        QuantFormat::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            let df = d.to_f32();
            let id = if df != 0.0 { 1.0 / df } else { 0.0 };
            for &v in x {
                let q = (v * id).round().clamp(-127.0, 127.0) as i8;
                out.push(q as u8);
            }
            d
        }
        QuantFormat::Q4_0 => {
            // ggml's q4_0: the weight of largest magnitude, with its sign, maps to -8.
            let mut amax = 0f32;
            let mut max = 0f32;
            for &v in x {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = f16::from_f32(max / -8.0);
            let df = d.to_f32();
            let id = if df != 0.0 { 1.0 / df } else { 0.0 };
            let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
            for j in 0..GROUP / 2 {
                out.push(q(x[j]) | (q(x[j + GROUP / 2]) << 4));
            }
            d
        }
    }
}

impl QMat {
    /// Quantize a float matrix (its `cols` a multiple of 32).
    pub fn quantize(m: &Mat, format: QuantFormat) -> Result<QMat, ModelError> {
        if m.cols == 0 || !m.cols.is_multiple_of(GROUP) {
            return Err(tensor_err(
                "<matrix>",
                format!(
                    "{} columns are not a multiple of the group size {GROUP}",
                    m.cols
                ),
            ));
        }
        let groups = m.rows * m.cols / GROUP;
        let mut values = Vec::with_capacity(m.rows * format.row_bytes(m.cols));
        let mut scale_bits = Vec::with_capacity(groups);
        for g in m.data.chunks_exact(GROUP) {
            scale_bits.push(quantize_group(g, format, &mut values).to_bits());
        }
        Ok(Self::from_parts(m.rows, m.cols, format, values, scale_bits))
    }

    fn from_parts(
        rows: usize,
        cols: usize,
        format: QuantFormat,
        values: Vec<u8>,
        scale_bits: Vec<u16>,
    ) -> QMat {
        let scales = scale_bits
            .iter()
            .map(|&b| f16::from_bits(b).to_f32())
            .collect();
        QMat {
            rows,
            cols,
            format,
            values,
            scale_bits,
            scales,
        }
    }

    /// From stored tensors: packed values and little-endian f16 scales,
    /// checked against the shape (a bad size is an error naming `name`).
    pub fn from_bytes(
        name: &str,
        rows: usize,
        cols: usize,
        format: QuantFormat,
        values: &[u8],
        scales: &[u8],
    ) -> Result<QMat, ModelError> {
        if cols == 0 || !cols.is_multiple_of(GROUP) {
            return Err(tensor_err(
                name,
                format!("{cols} columns are not a multiple of the group size {GROUP}"),
            ));
        }
        let want_v = rows * format.row_bytes(cols);
        let want_s = 2 * rows * cols / GROUP;
        if values.len() != want_v || scales.len() != want_s {
            return Err(tensor_err(
                name,
                format!(
                    "{} value bytes and {} scale bytes, {format} [{rows}, {cols}] needs {want_v} and {want_s}",
                    values.len(),
                    scales.len()
                ),
            ));
        }
        let scale_bits: Vec<u16> = scales
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(g) = scale_bits
            .iter()
            .position(|&b| !f16::from_bits(b).is_finite())
        {
            return Err(tensor_err(
                name,
                format!(
                    "scale of group {} (row {}) is not finite",
                    g % (cols / GROUP),
                    g / (cols / GROUP)
                ),
            ));
        }
        Ok(Self::from_parts(
            rows,
            cols,
            format,
            values.to_vec(),
            scale_bits,
        ))
    }

    /// Row `r` as f32 weights, into `out` (`cols` long).
    #[inline(always)]
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let gpr = self.cols / GROUP;
        let rb = self.format.row_bytes(self.cols);
        let vals = &self.values[r * rb..(r + 1) * rb];
        let scales = &self.scales[r * gpr..(r + 1) * gpr];
        match self.format {
            QuantFormat::Q8_0 => {
                for ((o, v), &d) in out
                    .chunks_exact_mut(GROUP)
                    .zip(vals.chunks_exact(GROUP))
                    .zip(scales)
                {
                    for j in 0..GROUP {
                        o[j] = d * (v[j] as i8) as f32;
                    }
                }
            }
            QuantFormat::Q4_0 => {
                for ((o, v), &d) in out
                    .chunks_exact_mut(GROUP)
                    .zip(vals.chunks_exact(GROUP / 2))
                    .zip(scales)
                {
                    for j in 0..GROUP / 2 {
                        o[j] = d * ((v[j] & 0x0f) as i32 - 8) as f32;
                        o[j + GROUP / 2] = d * ((v[j] >> 4) as i32 - 8) as f32;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32 (tests and export only; the engines never
    /// expand a whole matrix).
    pub fn dequantize(&self) -> Mat {
        let mut data = vec![0f32; self.rows * self.cols];
        for (r, row) in data.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        Mat {
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }

    /// Bytes as stored (values and f16 scales).
    pub fn stored_bytes(&self) -> usize {
        self.values.len() + 2 * self.scale_bits.len()
    }
}

/// One thread's rows of a quantized product.
struct QRowsOp<'a> {
    w: &'a QMat,
    x: &'a [f32],
    /// `x` packed for the lane product (several rows, natively).
    #[cfg(not(target_arch = "wasm32"))]
    packed: Option<&'a super::reference::PackedRows<'a>>,
    t: usize,
    o0: usize,
    chunk: &'a mut [f32],
}

#[cfg(not(target_arch = "wasm32"))]
impl pulp::WithSimd for QRowsOp<'_> {
    type Output = ();
    // Inlined into pulp's `#[target_feature]` entry point: the row expansion
    // (i8/nibble -> f32, times the scale) and the products below are
    // vectorised for the dispatched level (AVX2 + FMA on x86-64 v3, NEON).
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        use super::reference::{fma_level, SimdTiles};
        if fma_level() {
            qrows_kernel(SimdTiles::<S, true>(simd), self)
        } else {
            qrows_kernel(SimdTiles::<S, false>(simd), self)
        }
    }
}

impl QRowsOp<'_> {
    fn run(self) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            pulp::Arch::new().dispatch(self)
        }
        #[cfg(target_arch = "wasm32")]
        {
            qrows_kernel(super::reference::PortableTiles::<false>, self)
        }
    }
}

/// Floats of weight rows a quantized prefill expands at a time (then
/// multiplies as f32 by the blocked product).
const EXPAND_FLOATS: usize = 16 << 10;

/// One quantized row against one input row, without expanding the row:
/// per group, 16 accumulators over the 32 products (q8: weights `j` and
/// `j+16`; q4: the low and the high nibble of byte `j`), times the scale.
#[inline(always)]
fn qrow_dot(format: QuantFormat, vals: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mut s = 0f32;
    match format {
        QuantFormat::Q8_0 => {
            for ((v, xg), &d) in vals
                .chunks_exact(GROUP)
                .zip(x.chunks_exact(GROUP))
                .zip(scales)
            {
                let mut acc = [0f32; 16];
                for j in 0..16 {
                    acc[j] = (v[j] as i8) as f32 * xg[j] + (v[j + 16] as i8) as f32 * xg[j + 16];
                }
                s += d * super::reference::reduce16(&acc);
            }
        }
        QuantFormat::Q4_0 => {
            for ((v, xg), &d) in vals
                .chunks_exact(GROUP / 2)
                .zip(x.chunks_exact(GROUP))
                .zip(scales)
            {
                let mut acc = [0f32; 16];
                for j in 0..16 {
                    let lo = (v[j] & 0x0f) as i32 - 8;
                    let hi = (v[j] >> 4) as i32 - 8;
                    acc[j] = lo as f32 * xg[j] + hi as f32 * xg[j + 16];
                }
                s += d * super::reference::reduce16(&acc);
            }
        }
    }
    s
}

#[inline(always)]
fn qrows_kernel<K: super::reference::Tiles>(k: K, op: QRowsOp<'_>) {
    let QRowsOp {
        w,
        x,
        #[cfg(not(target_arch = "wasm32"))]
        packed,
        t,
        o0,
        chunk,
    } = op;
    let inn = w.cols;
    if t == 1 {
        // Decode: one input row; read each packed row once, never expanded.
        let gpr = inn / GROUP;
        let rb = w.format.row_bytes(inn);
        for (r, y) in chunk.iter_mut().enumerate() {
            let o = o0 + r;
            *y = qrow_dot(
                w.format,
                &w.values[o * rb..(o + 1) * rb],
                &w.scales[o * gpr..(o + 1) * gpr],
                &x[..inn],
            );
        }
        return;
    }
    // Prefill: a block of rows is expanded once, then multiplied with
    // every input row by the blocked f32 product (natively the lane
    // product, over the input packed once; a multiple of 24 rows, so of
    // every lane tile).
    let block = (EXPAND_FLOATS / inn.max(1)).max(1);
    let block = if block >= 24 { block / 24 * 24 } else { block };
    let mut rows = vec![0f32; block.min(chunk.len() / t) * inn];
    for (b, out) in chunk.chunks_mut(block * t).enumerate() {
        let n = out.len() / t;
        for (r, row) in rows.chunks_exact_mut(inn).take(n).enumerate() {
            w.row_into(o0 + b * block + r, row);
        }
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(px) = packed {
            k.packed(&rows[..n * inn], inn, px, out);
            continue;
        }
        super::reference::block_product(k, &rows[..n * inn], inn, x, t, out);
    }
}

/// `y[t, o] = sum_i w[o, i] * x[t, i]` with a quantized `w`: one input row
/// reads the packed rows directly; several expand each weight row once
/// (for all `t` input rows) and multiply with the blocked f32 product.
pub fn qmatmul(x: &[f32], t: usize, w: &QMat, threads: usize) -> Vec<f32> {
    #[cfg(not(target_arch = "wasm32"))]
    let packed = super::reference::packed_input(x, t, w.cols);
    super::reference::par_rows(w.rows, w.cols, t, threads, |o0, chunk| {
        QRowsOp {
            w,
            x,
            #[cfg(not(target_arch = "wasm32"))]
            packed: packed.as_ref(),
            t,
            o0,
            chunk,
        }
        .run()
    })
}

/// Quantize every matrix of an expert (`Err` if one is already quantized
/// in another format or its columns do not fit the group size).
pub fn quantize_expert(
    w: &ExpertWeights,
    format: QuantFormat,
) -> Result<ExpertWeights, ModelError> {
    let q = |name: &str, m: &Weight| -> Result<Weight, ModelError> {
        match m {
            Weight::F32(m) => QMat::quantize(m, format)
                .map(Weight::Q)
                .map_err(|e| tensor_err(name, e.to_string())),
            Weight::Q(q) if q.format == format => Ok(Weight::Q(q.clone())),
            Weight::Q(q) => Err(tensor_err(
                name,
                format!("already quantized as {}, not {format}", q.format),
            )),
        }
    };
    Ok(ExpertWeights {
        w1: q("w1", &w.w1)?,
        w2: q("w2", &w.w2)?,
        w3: q("w3", &w.w3)?,
    })
}

/// An [`ExpertSource`](super::ExpertSource) whose experts are quantized as
/// they load (`aiblock chat/logits --quant`): the same bytes a quantized
/// block of the expert would hold.
#[derive(Debug)]
pub struct QuantizingSource<S> {
    pub inner: S,
    pub format: QuantFormat,
}

impl<S: super::ExpertSource> super::ExpertSource for QuantizingSource<S> {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        let w = self.inner.load_expert(layer, expert)?;
        quantize_expert(&w, self.format)
            .map_err(|e| ModelError::Source(format!("layer{layer}.expert{expert}: {e}")))
    }
}

/// Read a float tensor of `payload` as f32 (F32, F16 or BF16).
fn float_tensor(
    st: &safetensors::SafeTensors<'_>,
    spec: &TensorSpec,
) -> Result<Vec<f32>, ModelError> {
    let view = st
        .tensor(&spec.name)
        .map_err(|_| tensor_err(&spec.name, "missing"))?;
    super::load::convert_view(spec, view.dtype(), view.shape(), view.data())
}

/// The quantized payload of a float slot payload: every matrix of the slot
/// in `format` (only expert slots are quantized). Deterministic: the same
/// source gives the same bytes on every machine.
pub fn quantize_payload(
    cfg: &Config,
    slot: Slot,
    source: &[u8],
    format: QuantFormat,
) -> Result<Vec<u8>, ModelError> {
    if !matches!(slot, Slot::Expert { .. }) {
        return Err(ModelError::Input(format!(
            "only expert slots are quantized, not {slot}"
        )));
    }
    let st = safetensors::SafeTensors::deserialize(source)
        .map_err(|e| ModelError::Safetensors(format!("{e:?}")))?;
    let mut owned: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for spec in slot.tensors(cfg) {
        let data = float_tensor(&st, &spec)?;
        let [vt, stt] = quant_tensors(&spec, format).map_err(|m| tensor_err(&spec.name, m))?;
        let m = Mat::new(spec.shape[0], spec.shape[1], data)?;
        let q = QMat::quantize(&m, format).map_err(|e| tensor_err(&spec.name, e.to_string()))?;
        let scales: Vec<u8> = q.scale_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        owned.insert(vt.name, (vt.dtype, vt.shape, q.values));
        owned.insert(stt.name, (stt.dtype, stt.shape, scales));
    }
    let views = owned
        .iter()
        .map(|(n, (d, s, b))| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| tensor_err(n, format!("{e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, &None).map_err(|e| ModelError::Safetensors(format!("{e:?}")))
}

/// Why a quantized payload is not the quantization of its source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantMismatch {
    #[error("the source cannot be quantized: {0}")]
    Source(String),
    #[error("the quantized payload is not readable: {0}")]
    Payload(String),
    #[error("tensor {tensor}: group {group} (row {row}, columns {col}..{}) differs from the re-derived quantization ({what})", col + GROUP)]
    Group {
        tensor: String,
        row: usize,
        group: usize,
        col: usize,
        what: &'static str,
    },
    #[error("tensor {0} differs from the re-derived quantization in its shape or dtype")]
    Shape(String),
    #[error("the payload's tensors equal the re-derived ones but its bytes differ (tensor order, header or padding)")]
    Layout,
}

/// Re-derive the quantization of `source` and compare it with `quantized`
/// byte for byte. A difference names the tensor and the group (row and
/// columns) where it first appears.
pub fn verify_quantized(
    cfg: &Config,
    slot: Slot,
    source: &[u8],
    quantized: &[u8],
    format: QuantFormat,
) -> Result<(), QuantMismatch> {
    let want = quantize_payload(cfg, slot, source, format)
        .map_err(|e| QuantMismatch::Source(e.to_string()))?;
    if want == quantized {
        return Ok(());
    }
    let got = safetensors::SafeTensors::deserialize(quantized)
        .map_err(|e| QuantMismatch::Payload(format!("{e:?}")))?;
    let exp = safetensors::SafeTensors::deserialize(&want)
        .map_err(|e| QuantMismatch::Source(format!("{e:?}")))?;
    for spec in slot.tensors(cfg) {
        let gpr = spec.shape.get(1).copied().unwrap_or(0) / GROUP;
        let sname = scales_name(&spec.name);
        for (name, is_scales) in [(&sname, true), (&spec.name, false)] {
            let (Ok(g), Ok(e)) = (got.tensor(name), exp.tensor(name)) else {
                return Err(QuantMismatch::Shape(name.clone()));
            };
            if g.dtype() != e.dtype() || g.shape() != e.shape() {
                return Err(QuantMismatch::Shape(name.clone()));
            }
            let per_group = if is_scales {
                2
            } else {
                format.row_bytes(GROUP)
            };
            let (gd, ed) = (g.data(), e.data());
            if let Some(i) = gd.iter().zip(ed).position(|(a, b)| a != b) {
                let group_index = i / per_group;
                let row = group_index / gpr.max(1);
                let group = group_index % gpr.max(1);
                return Err(QuantMismatch::Group {
                    tensor: spec.name.clone(),
                    row,
                    group,
                    col: group * GROUP,
                    what: if is_scales { "scale" } else { "values" },
                });
            }
        }
    }
    Err(QuantMismatch::Layout)
}

/// An expert from a quantized payload (`format`'s layout, names from the
/// slot's float tensors).
pub fn expert_from_quantized(
    cfg: &Config,
    layer: usize,
    expert: usize,
    format: QuantFormat,
    bytes: &[u8],
) -> Result<ExpertWeights, ModelError> {
    let slot = Slot::Expert { layer, expert };
    slot.check_in_spec(cfg)?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::Safetensors(format!("{e:?}")))?;
    let mut mats = Vec::with_capacity(3);
    for spec in slot.tensors(cfg) {
        let [vt, stt] = quant_tensors(&spec, format).map_err(|m| tensor_err(&spec.name, m))?;
        let get = |t: &crate::spec::quant::QuantTensor| {
            let v = st
                .tensor(&t.name)
                .map_err(|_| tensor_err(&t.name, "missing"))?;
            if v.dtype() != t.dtype || v.shape() != t.shape.as_slice() {
                return Err(tensor_err(
                    &t.name,
                    format!(
                        "{:?} {:?}, {format} implies {:?} {:?}",
                        v.dtype(),
                        v.shape(),
                        t.dtype,
                        t.shape
                    ),
                ));
            }
            Ok(v.data())
        };
        let (vals, scales) = (get(&vt)?, get(&stt)?);
        mats.push(Weight::Q(QMat::from_bytes(
            &spec.name,
            spec.shape[0],
            spec.shape[1],
            format,
            vals,
            scales,
        )?));
    }
    let w3 = mats.pop();
    let w2 = mats.pop();
    let w1 = mats.pop();
    match (w1, w2, w3) {
        (Some(w1), Some(w2), Some(w3)) => Ok(ExpertWeights { w1, w2, w3 }),
        _ => Err(ModelError::Input("an expert has three matrices".into())),
    }
}

/// The format of an expert payload: `Some` when its tensors are quantized
/// (scales present), `None` for float payloads.
pub fn payload_quant(bytes: &[u8]) -> Result<Option<QuantFormat>, ModelError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::Safetensors(format!("{e:?}")))?;
    let tensors = st.tensors();
    let d = crate::chain::payload_dtype_of_tensors(
        tensors.iter().map(|(n, v)| (n.as_str(), v.dtype())),
    )
    .map_err(ModelError::Safetensors)?;
    Ok(d.quant())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = crate::eval::corpus::Rng::new(seed);
        let data = (0..rows * cols)
            .map(|_| (rng.unit_f64() as f32 - 0.5) * 0.2)
            .collect();
        Mat::new(rows, cols, data).unwrap()
    }

    #[test]
    fn q8_and_q4_error_bounds_and_exact_round_trip() {
        let m = mat(8, 64, 1);
        for f in QuantFormat::ALL {
            let q = QMat::quantize(&m, f).unwrap();
            assert_eq!(q.stored_bytes(), f.matrix_bytes(8, 64));
            let d = q.dequantize();
            for (g, (a, b)) in m.data.chunks(32).zip(d.data.chunks(32)).enumerate() {
                let amax = a.iter().fold(0f32, |x, v| x.max(v.abs()));
                let bound = match f {
                    QuantFormat::Q8_0 => amax / 127.0 * 0.5 * 1.01 + 1e-6,
                    QuantFormat::Q4_0 => amax / 8.0 * 1.01 + 1e-6,
                };
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= bound, "{f} group {g}: {x} vs {y}");
                }
            }
            // Re-quantizing the dequantized matrix gives the same bytes.
            let again = QMat::quantize(&d, f).unwrap();
            assert_eq!(again.values, q.values, "{f}");
            assert_eq!(again.scale_bits, q.scale_bits, "{f}");
        }
    }

    #[test]
    fn product_equals_dequantized_product() {
        // 203 rows: past one block of expanded rows (170 of 96) and odd.
        let m = mat(203, 96, 2);
        let x: Vec<f32> = (0..7 * 96)
            .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect();
        for f in QuantFormat::ALL {
            let q = QMat::quantize(&m, f).unwrap();
            let d = q.dequantize();
            for t in [1usize, 3, 7] {
                for threads in [1usize, 2] {
                    let a = qmatmul(&x[..t * 96], t, &q, threads);
                    let b = super::super::reference::matmul(&x[..t * 96], t, &d, 1);
                    for (u, v) in a.iter().zip(&b) {
                        assert!(
                            (u - v).abs() <= 1e-5 * (1.0 + v.abs()),
                            "{f} t={t}: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_and_extreme_groups() {
        let mut data = vec![0f32; 64];
        data[40] = 1e4;
        data[41] = -1e4;
        let m = Mat::new(1, 64, data).unwrap();
        for f in QuantFormat::ALL {
            let q = QMat::quantize(&m, f).unwrap();
            assert_eq!(q.scales[0], 0.0, "{f}: an all-zero group has scale 0");
            let d = q.dequantize();
            assert!(d.data[..32].iter().all(|&v| v == 0.0));
            assert!((d.data[40] - 1e4).abs() / 1e4 < 0.01, "{f}: {}", d.data[40]);
        }
        assert!(
            QMat::quantize(&Mat::new(1, 48, vec![0.0; 48]).unwrap(), QuantFormat::Q8_0).is_err()
        );
    }

    #[test]
    fn from_bytes_refuses_bad_sizes_and_scales() {
        let e = QMat::from_bytes("w", 2, 32, QuantFormat::Q8_0, &[0; 63], &[0; 4]).unwrap_err();
        assert!(e.to_string().contains("w"), "{e}");
        let inf = half::f16::INFINITY.to_bits().to_le_bytes();
        let mut s = vec![0u8; 4];
        s[2..].copy_from_slice(&inf);
        let e = QMat::from_bytes("w", 2, 32, QuantFormat::Q8_0, &[0; 64], &s).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
    }
}
