//! safetensors -> f32 weights, with each family's Hugging Face tensor names.
//!
//! Every loader takes either a whole checkpoint or a single-slot payload
//! (only the tensors the slot needs are read), accepts F32, F16 and BF16, and
//! checks names and shapes against [`Slot::tensors`]. Bad bytes give a
//! [`ModelError`], never a panic.
//!
//! Native only: [`ModelDir`] reads a Hugging Face directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`) and [`DirExpertSource`] reads experts
//! lazily from its checkpoint, one tensor range at a time.

use std::collections::HashMap;
use std::sync::Arc;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::{
    AttentionExtras, Config, ExpertSource, ExpertWeights, LayerAttention, Mat, ModelError,
    RouterWeights, SharedExpertWeights, SharedWeights, Slot, TensorSpec,
};

/// Largest safetensors header accepted (the crate's own limit).
pub const MAX_HEADER_BYTES: usize = 100_000_000;

/// Something that hands out tensors by name.
trait TensorGet {
    fn get(&mut self, spec: &TensorSpec) -> Result<Vec<f32>, ModelError>;
}

fn tensor_err(name: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Tensor {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Check dtype and shape of a tensor against its spec and convert its bytes.
pub(crate) fn convert_view(
    spec: &TensorSpec,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<Vec<f32>, ModelError> {
    convert(spec, dtype, shape, data)
}

fn convert(
    spec: &TensorSpec,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<Vec<f32>, ModelError> {
    if shape != spec.shape.as_slice() {
        return Err(tensor_err(
            &spec.name,
            format!("shape {shape:?}, expected {:?}", spec.shape),
        ));
    }
    let numel: usize = spec.shape.iter().product();
    let size = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(tensor_err(
                &spec.name,
                format!("dtype {other:?} is not supported (F32, F16, BF16)"),
            ))
        }
    };
    if numel.checked_mul(size) != Some(data.len()) {
        return Err(tensor_err(
            &spec.name,
            format!("{} bytes for {numel} {dtype:?} values", data.len()),
        ));
    }
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

struct BytesTensors<'a>(SafeTensors<'a>);

impl<'a> BytesTensors<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, ModelError> {
        SafeTensors::deserialize(bytes)
            .map(Self)
            .map_err(|e| ModelError::Safetensors(format!("{e:?}")))
    }
}

impl TensorGet for BytesTensors<'_> {
    fn get(&mut self, spec: &TensorSpec) -> Result<Vec<f32>, ModelError> {
        let view = self
            .0
            .tensor(&spec.name)
            .map_err(|_| tensor_err(&spec.name, "missing"))?;
        convert(spec, view.dtype(), view.shape(), view.data())
    }
}

fn mat(spec: &TensorSpec, data: Vec<f32>) -> Result<Mat, ModelError> {
    match spec.shape.as_slice() {
        [r, c] => Mat::new(*r, *c, data),
        s => Err(tensor_err(
            &spec.name,
            format!("expected a matrix, spec is {s:?}"),
        )),
    }
}

fn get_mat(src: &mut dyn TensorGet, spec: &TensorSpec) -> Result<Mat, ModelError> {
    let d = src.get(spec)?;
    mat(spec, d)
}

fn shared_from(cfg: &Config, src: &mut dyn TensorGet) -> Result<SharedWeights, ModelError> {
    let specs = Slot::Shared.tensors(cfg);
    let mut it = specs.iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| ModelError::Config("shared slot spec is shorter than expected".into()))
    };
    let embed_tokens = get_mat(src, next()?)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for _ in 0..cfg.num_hidden_layers {
        let input_layernorm = src.get(next()?)?;
        let post_attention_layernorm = src.get(next()?)?;
        let q_proj = get_mat(src, next()?)?;
        let k_proj = get_mat(src, next()?)?;
        let v_proj = get_mat(src, next()?)?;
        let o_proj = get_mat(src, next()?)?;
        let mut extras = AttentionExtras::default();
        for (name, _) in crate::spec::family::attention_extras(cfg) {
            extras.set(name, src.get(next()?)?)?;
        }
        layers.push(LayerAttention {
            input_layernorm,
            post_attention_layernorm,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            extras,
        });
    }
    let norm = src.get(next()?)?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(get_mat(src, next()?)?)
    };
    Ok(SharedWeights {
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}

fn check_layer(cfg: &Config, slot: Slot) -> Result<(), ModelError> {
    Ok(slot.check_in_spec(cfg)?)
}

fn router_from(
    cfg: &Config,
    layer: usize,
    src: &mut dyn TensorGet,
) -> Result<RouterWeights, ModelError> {
    let slot = Slot::Router { layer };
    check_layer(cfg, slot)?;
    let specs = slot.tensors(cfg);
    let gate = get_mat(src, &specs[0])?;
    Ok(RouterWeights {
        gate,
        shared_expert: None,
    })
}

/// The `layer{layer}.shared_expert` slot (families with one).
fn shared_expert_from(
    cfg: &Config,
    layer: usize,
    src: &mut dyn TensorGet,
) -> Result<SharedExpertWeights, ModelError> {
    let slot = Slot::SharedExpert { layer };
    check_layer(cfg, slot)?;
    let specs = slot.tensors(cfg);
    let [g, d, u, gate] = specs.as_slice() else {
        return Err(ModelError::Config(format!(
            "slot {slot} has {} tensors, expected 4",
            specs.len()
        )));
    };
    Ok(SharedExpertWeights {
        expert: ExpertWeights {
            w1: get_mat(src, g)?.into(),
            w2: get_mat(src, d)?.into(),
            w3: get_mat(src, u)?.into(),
        },
        gate: src.get(gate)?,
    })
}

/// A layer's router with its shared expert (when the family has one), from
/// a source holding both (a whole checkpoint).
fn layer_router_from(
    cfg: &Config,
    layer: usize,
    src: &mut dyn TensorGet,
) -> Result<RouterWeights, ModelError> {
    let mut r = router_from(cfg, layer, src)?;
    if cfg.family().has_shared_expert() {
        r.shared_expert = Some(shared_expert_from(cfg, layer, src)?);
    }
    Ok(r)
}

fn expert_from(
    cfg: &Config,
    layer: usize,
    expert: usize,
    src: &mut dyn TensorGet,
) -> Result<ExpertWeights, ModelError> {
    let slot = Slot::Expert { layer, expert };
    check_layer(cfg, slot)?;
    let specs = slot.tensors(cfg);
    Ok(ExpertWeights {
        w1: get_mat(src, &specs[0])?.into(),
        w2: get_mat(src, &specs[1])?.into(),
        w3: get_mat(src, &specs[2])?.into(),
    })
}

impl SharedWeights {
    /// Read the `shared` slot from a whole checkpoint or a `shared` payload.
    pub fn from_safetensors(cfg: &Config, bytes: &[u8]) -> Result<Self, ModelError> {
        shared_from(cfg, &mut BytesTensors::new(bytes)?)
    }
}

impl RouterWeights {
    /// Read `layer{layer}.router` from a whole checkpoint or its payload
    /// (the gate only: a shared expert is in its own slot, see
    /// [`RouterWeights::from_payloads`]).
    pub fn from_safetensors(cfg: &Config, layer: usize, bytes: &[u8]) -> Result<Self, ModelError> {
        router_from(cfg, layer, &mut BytesTensors::new(bytes)?)
    }

    /// A layer's router from its `layerN.router` payload and, for a family
    /// with a shared expert, its `layerN.shared_expert` payload.
    pub fn from_payloads(
        cfg: &Config,
        layer: usize,
        router: &[u8],
        shared_expert: Option<&[u8]>,
    ) -> Result<Self, ModelError> {
        let mut r = Self::from_safetensors(cfg, layer, router)?;
        match (cfg.family().has_shared_expert(), shared_expert) {
            (true, Some(p)) => {
                r.shared_expert = Some(SharedExpertWeights::from_safetensors(cfg, layer, p)?)
            }
            (true, None) => {
                return Err(ModelError::Source(format!(
                    "layer{layer}.shared_expert payload is missing"
                )))
            }
            (false, Some(_)) => {
                return Err(ModelError::Source(format!(
                    "model_type {} has no layer{layer}.shared_expert",
                    cfg.family().model_type()
                )))
            }
            (false, None) => {}
        }
        Ok(r)
    }
}

impl SharedExpertWeights {
    /// Read `layer{layer}.shared_expert` from a whole checkpoint or its payload.
    pub fn from_safetensors(cfg: &Config, layer: usize, bytes: &[u8]) -> Result<Self, ModelError> {
        shared_expert_from(cfg, layer, &mut BytesTensors::new(bytes)?)
    }
}

impl ExpertWeights {
    /// Read `layer{layer}.expert{expert}` from a whole checkpoint or its
    /// payload, float or quantized (a `NAME.scales` tensor beside its first
    /// matrix marks a quantized payload; its values' dtype says the format).
    pub fn from_safetensors(
        cfg: &Config,
        layer: usize,
        expert: usize,
        bytes: &[u8],
    ) -> Result<Self, ModelError> {
        let src = BytesTensors::new(bytes)?;
        let slot = Slot::Expert { layer, expert };
        check_layer(cfg, slot)?;
        let first = &slot.tensors(cfg)[0].name;
        if src
            .0
            .tensor(&crate::spec::quant::scales_name(first))
            .is_ok()
        {
            let format = match src.0.tensor(first).map(|v| v.dtype()) {
                Ok(Dtype::I8) => crate::spec::quant::QuantFormat::Q8_0,
                Ok(Dtype::U8) => crate::spec::quant::QuantFormat::Q4_0,
                Ok(d) => {
                    return Err(tensor_err(
                        first,
                        format!("dtype {d:?} beside a scales tensor (q8_0 is I8, q4_0 is U8)"),
                    ))
                }
                Err(_) => return Err(tensor_err(first, "missing")),
            };
            return super::quant::expert_from_quantized(cfg, layer, expert, format, bytes);
        }
        let mut src = src;
        expert_from(cfg, layer, expert, &mut src)
    }
}

/// Every router (with its shared expert, when the family has one) of a
/// model, from a whole checkpoint.
pub fn routers_from_safetensors(
    cfg: &Config,
    bytes: &[u8],
) -> Result<Vec<RouterWeights>, ModelError> {
    let mut src = BytesTensors::new(bytes)?;
    (0..cfg.num_hidden_layers)
        .map(|l| layer_router_from(cfg, l, &mut src))
        .collect()
}

impl<T: ExpertSource + ?Sized> ExpertSource for Box<T> {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        (**self).load_expert(layer, expert)
    }
}

/// Experts from one in-memory whole checkpoint (works in wasm).
#[derive(Debug, Clone)]
pub struct BytesExpertSource {
    cfg: Config,
    bytes: Arc<[u8]>,
}

impl BytesExpertSource {
    /// Checks the safetensors header once, so later loads only fail on the
    /// expert's own tensors.
    pub fn new(cfg: Config, bytes: impl Into<Arc<[u8]>>) -> Result<Self, ModelError> {
        let bytes = bytes.into();
        BytesTensors::new(&bytes)?;
        Ok(Self { cfg, bytes })
    }
}

impl ExpertSource for BytesExpertSource {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        ExpertWeights::from_safetensors(&self.cfg, layer, expert, &self.bytes)
    }
}

/// Experts from per-slot payloads (safetensors bytes of one `layerN.expertM`
/// block each), e.g. blocks already fetched and verified. Works in wasm.
#[derive(Debug, Clone, Default)]
pub struct MapExpertSource {
    cfg: Option<Config>,
    payloads: HashMap<(usize, usize), Arc<[u8]>>,
}

impl MapExpertSource {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg: Some(cfg),
            payloads: HashMap::new(),
        }
    }

    /// Add (or replace) the payload of `layer{layer}.expert{expert}`.
    pub fn insert(&mut self, layer: usize, expert: usize, payload: impl Into<Arc<[u8]>>) {
        self.payloads.insert((layer, expert), payload.into());
    }

    pub fn contains(&self, layer: usize, expert: usize) -> bool {
        self.payloads.contains_key(&(layer, expert))
    }
}

impl ExpertSource for MapExpertSource {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        let cfg = self
            .cfg
            .as_ref()
            .ok_or_else(|| ModelError::Source("MapExpertSource has no config".into()))?;
        let p = self.payloads.get(&(layer, expert)).ok_or_else(|| {
            ModelError::Source(format!("layer{layer}.expert{expert} is not available"))
        })?;
        ExpertWeights::from_safetensors(cfg, layer, expert, p)
    }
}

/// Experts already in memory as weights.
#[derive(Debug, Clone, Default)]
pub struct WeightsExpertSource {
    pub experts: HashMap<(usize, usize), ExpertWeights>,
}

impl ExpertSource for WeightsExpertSource {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        self.experts.get(&(layer, expert)).cloned().ok_or_else(|| {
            ModelError::Source(format!("layer{layer}.expert{expert} is not available"))
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use native::*;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom};
    use std::path::{Path, PathBuf};

    use safetensors::tensor::TensorInfo;

    use super::*;
    use crate::model::tokenizer::Tokenizer;

    fn io_err(path: &Path, e: std::io::Error) -> ModelError {
        ModelError::Io(format!("{}: {e}", path.display()))
    }

    /// A safetensors file whose header is parsed once; tensors are read from
    /// their byte ranges on demand.
    #[derive(Debug)]
    pub struct SafetensorsFile {
        path: PathBuf,
        file: File,
        data_start: u64,
        tensors: HashMap<String, TensorInfo>,
    }

    impl SafetensorsFile {
        pub fn open(path: &Path) -> Result<Self, ModelError> {
            let mut file = File::open(path).map_err(|e| io_err(path, e))?;
            let len = file.metadata().map_err(|e| io_err(path, e))?.len();
            let bad = |m: String| ModelError::Safetensors(format!("{}: {m}", path.display()));
            let mut n = [0u8; 8];
            file.read_exact(&mut n)
                .map_err(|_| bad("file shorter than its header".into()))?;
            let n = u64::from_le_bytes(n);
            if n > MAX_HEADER_BYTES as u64 || n + 8 > len {
                return Err(bad(format!(
                    "header length {n} is invalid for a {len}-byte file"
                )));
            }
            let mut header = vec![0u8; n as usize];
            file.read_exact(&mut header).map_err(|e| io_err(path, e))?;
            let map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
            let data_len = len - 8 - n;
            let mut tensors = HashMap::new();
            for (name, v) in map {
                if name == "__metadata__" {
                    continue;
                }
                let info: TensorInfo =
                    serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
                let (s, e) = info.data_offsets;
                if s > e || e as u64 > data_len {
                    return Err(bad(format!("tensor {name}: offsets {s}..{e} out of range")));
                }
                tensors.insert(name, info);
            }
            Ok(Self {
                path: path.to_path_buf(),
                file,
                data_start: 8 + n,
                tensors,
            })
        }

        /// Names of all tensors in the file.
        pub fn names(&self) -> impl Iterator<Item = &str> {
            self.tensors.keys().map(|s| s.as_str())
        }

        fn read(&mut self, spec: &TensorSpec) -> Result<Vec<f32>, ModelError> {
            let info = self
                .tensors
                .get(&spec.name)
                .ok_or_else(|| tensor_err(&spec.name, "missing"))?;
            let (s, e) = info.data_offsets;
            let (dtype, shape) = (info.dtype, info.shape.clone());
            if shape != spec.shape {
                return Err(tensor_err(
                    &spec.name,
                    format!("shape {shape:?}, expected {:?}", spec.shape),
                ));
            }
            let mut buf = vec![0u8; e - s];
            self.file
                .seek(SeekFrom::Start(self.data_start + s as u64))
                .and_then(|_| self.file.read_exact(&mut buf))
                .map_err(|err| io_err(&self.path, err))?;
            convert(spec, dtype, &shape, &buf)
        }
    }

    impl SafetensorsFile {
        /// A tensor's dtype, shape and bytes as stored.
        pub fn read_raw(&mut self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>), ModelError> {
            let info = self
                .tensors
                .get(name)
                .ok_or_else(|| tensor_err(name, "missing"))?;
            let (s, e) = info.data_offsets;
            let (dtype, shape) = (info.dtype, info.shape.clone());
            let mut buf = vec![0u8; e - s];
            self.file
                .seek(SeekFrom::Start(self.data_start + s as u64))
                .and_then(|_| self.file.read_exact(&mut buf))
                .map_err(|err| io_err(&self.path, err))?;
            Ok((dtype, shape, buf))
        }
    }

    impl TensorGet for SafetensorsFile {
        fn get(&mut self, spec: &TensorSpec) -> Result<Vec<f32>, ModelError> {
            self.read(spec)
        }
    }

    /// A quantized expert from a checkpoint whose config is quantized
    /// (`aiblock export` of a quantized model writes one).
    fn quantized_expert_from_file(
        cfg: &Config,
        format: crate::spec::quant::QuantFormat,
        layer: usize,
        expert: usize,
        file: &mut SafetensorsFile,
    ) -> Result<ExpertWeights, ModelError> {
        let slot = Slot::Expert { layer, expert };
        check_layer(cfg, slot)?;
        let mut mats = Vec::new();
        for spec in slot.tensors(cfg) {
            let [vt, st] = crate::spec::quant::quant_tensors(&spec, format)
                .map_err(|m| tensor_err(&spec.name, m))?;
            let mut get = |t: &crate::spec::quant::QuantTensor| {
                let (d, shape, bytes) = file.read_raw(&t.name)?;
                if d != t.dtype || shape != t.shape {
                    return Err(tensor_err(
                        &t.name,
                        format!(
                            "{d:?} {shape:?}, {format} implies {:?} {:?}",
                            t.dtype, t.shape
                        ),
                    ));
                }
                Ok(bytes)
            };
            let (v, sc) = (get(&vt)?, get(&st)?);
            mats.push(crate::model::Weight::Q(
                crate::model::quant::QMat::from_bytes(
                    &spec.name,
                    spec.shape[0],
                    spec.shape[1],
                    format,
                    &v,
                    &sc,
                )?,
            ));
        }
        let mut it = mats.into_iter();
        match (it.next(), it.next(), it.next()) {
            (Some(w1), Some(w2), Some(w3)) => Ok(ExpertWeights { w1, w2, w3 }),
            _ => Err(ModelError::Input("an expert has three matrices".into())),
        }
    }

    /// Reads experts lazily from a checkpoint file: only the three tensors of
    /// the expert asked for are read.
    #[derive(Debug)]
    pub struct DirExpertSource {
        cfg: Config,
        file: SafetensorsFile,
    }

    impl DirExpertSource {
        pub fn open(cfg: Config, safetensors: &Path) -> Result<Self, ModelError> {
            Ok(Self {
                cfg,
                file: SafetensorsFile::open(safetensors)?,
            })
        }
    }

    impl ExpertSource for DirExpertSource {
        fn load_expert(
            &mut self,
            layer: usize,
            expert: usize,
        ) -> Result<ExpertWeights, ModelError> {
            match self.cfg.expert_quant()? {
                Some(q) => quantized_expert_from_file(&self.cfg, q, layer, expert, &mut self.file),
                None => expert_from(&self.cfg, layer, expert, &mut self.file),
            }
        }
    }

    /// A Hugging Face model directory: config, tokenizer, shared weights and
    /// routers read eagerly; experts come from [`ModelDir::expert_source`].
    #[derive(Debug)]
    pub struct ModelDir {
        pub path: PathBuf,
        pub config: Config,
        /// `config.json` as it is on disk.
        pub config_json: Vec<u8>,
        pub tokenizer: Tokenizer,
        /// `tokenizer.json` as it is on disk.
        pub tokenizer_json: Vec<u8>,
        pub shared: SharedWeights,
        pub routers: Vec<RouterWeights>,
    }

    impl ModelDir {
        pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
            let path = path.as_ref().to_path_buf();
            let read = |name: &str| {
                let p = path.join(name);
                std::fs::read(&p).map_err(|e| io_err(&p, e))
            };
            let config_json = read("config.json")?;
            let config = Config::from_json(&config_json)?;
            let tokenizer_json = read("tokenizer.json")?;
            let tokenizer = Tokenizer::from_bytes(&tokenizer_json)?;
            let mut file = SafetensorsFile::open(&path.join("model.safetensors"))?;
            let shared = shared_from(&config, &mut file)?;
            let routers = (0..config.num_hidden_layers)
                .map(|l| layer_router_from(&config, l, &mut file))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Self {
                path,
                config,
                config_json,
                tokenizer,
                tokenizer_json,
                shared,
                routers,
            })
        }

        pub fn safetensors_path(&self) -> PathBuf {
            self.path.join("model.safetensors")
        }

        /// A fresh lazy expert source over this directory's checkpoint.
        pub fn expert_source(&self) -> Result<DirExpertSource, ModelError> {
            DirExpertSource::open(self.config.clone(), &self.safetensors_path())
        }
    }
}
