//! Token sampling: greedy, temperature, top-p (nucleus), seeded with an own
//! PRNG so the same seed gives the same tokens natively and in wasm.

use super::ModelError;

/// SplitMix64: tiny, fast, deterministic everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform_pm1(&mut self) -> f32 {
        (self.next_f64() * 2.0 - 1.0) as f32
    }
}

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; 1 keeps every token.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Input(format!(
                "temperature {} must be finite and >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
    scratch: Vec<(f32, u32)>,
}

/// Index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            rng: SplitMix64::new(cfg.seed),
            scratch: Vec::new(),
        })
    }

    pub fn greedy() -> Self {
        Self {
            cfg: SamplerConfig::greedy(),
            rng: SplitMix64::new(0),
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Temperature 0: the sample is the argmax, so an engine may pick it.
    pub fn is_greedy(&self) -> bool {
        self.cfg.temperature == 0.0
    }

    /// Pick a token from logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, ModelError> {
        if logits.is_empty() {
            return Err(ModelError::Input("no logits to sample from".into()));
        }
        if self.cfg.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Ok(argmax(logits));
        }
        self.scratch.clear();
        let mut sum = 0f32;
        for (i, &v) in logits.iter().enumerate() {
            let p = if v.is_nan() {
                0.0
            } else {
                ((v - max) * inv_t).exp()
            };
            sum += p;
            self.scratch.push((p, i as u32));
        }
        // Sort by probability, descending (ties: lower id first) and cut to
        // the nucleus.
        self.scratch
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut keep = self.scratch.len();
        if self.cfg.top_p < 1.0 {
            let target = self.cfg.top_p * sum;
            let mut acc = 0f32;
            for (n, (p, _)) in self.scratch.iter().enumerate() {
                acc += p;
                if acc >= target {
                    keep = n + 1;
                    break;
                }
            }
        }
        let kept = &self.scratch[..keep];
        let total: f32 = kept.iter().map(|(p, _)| p).sum();
        let mut r = self.rng.next_f64() as f32 * total;
        for &(p, id) in kept {
            if r < p {
                return Ok(id);
            }
            r -= p;
        }
        Ok(kept.last().map(|&(_, id)| id).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 3.0, -1.0]).unwrap(), 1);
        assert!(s.sample(&[]).is_err());
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_follows_probabilities() {
        let logits = [0.0f32, (3f32).ln(), f32::NEG_INFINITY];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let run = || {
            let mut s = Sampler::new(cfg).unwrap();
            (0..4000)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert!(!a.contains(&2));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = [2.0f32, 1.9, -5.0, -6.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        };
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..500 {
            assert_eq!(s.sample(&logits).unwrap(), 0);
        }
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 0.9,
            seed: 1,
        };
        let mut s = Sampler::new(cfg).unwrap();
        let got: Vec<u32> = (0..500).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(got.contains(&0) && got.contains(&1));
        assert!(got.iter().all(|&t| t < 2));
    }

    #[test]
    fn bad_settings_are_errors() {
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let cfg = SamplerConfig {
                temperature: t,
                top_p: p,
                seed: 0,
            };
            assert!(matches!(Sampler::new(cfg), Err(ModelError::Input(_))));
        }
    }
}
