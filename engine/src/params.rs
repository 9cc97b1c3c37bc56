//! One flat parameter buffer, one flat gradient buffer, and the name table that maps Hugging Face
//! tensor names to ranges of both.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// What a tensor is, which decides its weight decay and its initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// A matmul weight: decayed.
    Weight,
    /// An embedding table: decayed only if the optimizer is configured to.
    Embedding,
    /// A bias: never decayed.
    Bias,
    /// A LayerNorm gain or shift: never decayed.
    Norm,
}

/// How a tensor starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f32 },
    Zeros,
    Ones,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub kind: ParamKind,
    pub init: Init,
    /// Values reserved right after the tensor in the flat buffers, zero for good: room for a
    /// GEMM to run over more rows than the tensor has (GPT's LM head over its vocabulary
    /// rounded up, `GptConfig::head_rows`). Never named in a file, never initialised, never
    /// given a nonzero gradient.
    pub spare: usize,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
    /// The tensor and its spare values.
    pub fn reserved_range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel() + self.spare
    }
}

/// Tensors in order, back to back (with a tensor's spare values, if any, between it and the
/// next).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamTable {
    specs: Vec<ParamSpec>,
    by_name: HashMap<String, usize>,
    total: usize,
}

/// Index of a tensor in its table.
pub type ParamId = usize;

impl ParamTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, name: &str, shape: &[usize], kind: ParamKind, init: Init) -> ParamId {
        self.push_with_spare(name, shape, kind, init, 0)
    }

    /// A tensor followed by `spare` values that stay zero (see [`ParamSpec::spare`]).
    pub fn push_with_spare(&mut self, name: &str, shape: &[usize], kind: ParamKind, init: Init, spare: usize) -> ParamId {
        assert!(!self.by_name.contains_key(name), "duplicate parameter {name}");
        let spec = ParamSpec { name: name.to_string(), shape: shape.to_vec(), offset: self.total, kind, init, spare };
        self.total += spec.numel() + spare;
        self.by_name.insert(name.to_string(), self.specs.len());
        self.specs.push(spec);
        self.specs.len() - 1
    }

    /// A copy of `spec` (from another table) at the end of this one, its spare values too:
    /// tables built from others (a checkpoint's moments, a model and its head) keep the flat
    /// layout of the buffers they describe.
    pub fn push_like(&mut self, spec: &ParamSpec) -> ParamId {
        self.push_with_spare(&spec.name, &spec.shape, spec.kind, spec.init, spec.spare)
    }

    /// Values in a flat buffer of this table: every tensor and its spare values.
    pub fn total(&self) -> usize {
        self.total
    }
    /// Values of the tensors themselves (what a parameter count reports).
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }
    pub fn reserved_range(&self, id: ParamId) -> Range<usize> {
        self.specs[id].reserved_range()
    }

    /// Sets every spare value of `host` (a flat buffer of this table) back to zero: for
    /// buffers made by perturbing or drawing every value, which [`Self::check_buffer`] would
    /// refuse.
    pub fn zero_spare(&self, host: &mut [f32]) {
        for s in self.specs.iter().filter(|s| s.spare > 0) {
            host[s.range().end..s.reserved_range().end].fill(0.0);
        }
    }

    /// Why `host` cannot be a flat parameter buffer of this table, if it cannot: its length,
    /// or a nonzero spare value (they must stay zero: the LM head's padding).
    pub fn check_buffer(&self, host: &[f32]) -> Result<(), String> {
        if host.len() != self.total {
            return Err(format!("parameter buffer holds {} values, the config needs {}", host.len(), self.total));
        }
        for s in self.specs.iter().filter(|s| s.spare > 0) {
            let spare = &host[s.range().end..s.reserved_range().end];
            if let Some(bad) = spare.iter().position(|&x| x != 0.0) {
                return Err(format!(
                    "parameter buffer holds {} at spare value {bad} of {} after {}, which must stay zero (the LM head's padding)",
                    spare[bad],
                    spare.len(),
                    s.name
                ));
            }
        }
        Ok(())
    }
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id]
    }
    pub fn range(&self, id: ParamId) -> Range<usize> {
        self.specs[id].range()
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }

    /// Host values of every tensor, each drawn from its own stream derived from (seed, name), so
    /// a tensor's start does not depend on which tensors come before it.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut out = vec![0.0f32; self.total];
        for s in &self.specs {
            let dst = &mut out[s.range()];
            match s.init {
                Init::Zeros => dst.fill(0.0),
                Init::Ones => dst.fill(1.0),
                Init::Normal { std } => {
                    let mut rng = Rng::derive(seed, &s.name);
                    dst.iter_mut().for_each(|x| *x = (rng.normal() * std as f64) as f32);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_of_the_wrong_length_or_with_a_nonzero_spare_value_is_named() {
        let mut t = ParamTable::new();
        t.push_with_spare("wte", &[2, 2], ParamKind::Embedding, Init::Zeros, 3);
        t.push("b", &[2], ParamKind::Bias, Init::Zeros);
        assert_eq!(t.total(), 9);
        assert_eq!(t.check_buffer(&[0.0; 9]), Ok(()));
        assert!(t.check_buffer(&[0.0; 8]).unwrap_err().contains("holds 8 values, the config needs 9"));
        let mut host = [1.0f32; 9];
        host[4..7].copy_from_slice(&[0.0, 0.0, 0.5]);
        let e = t.check_buffer(&host).unwrap_err();
        assert!(e.contains("0.5 at spare value 2 of 3 after wte"), "{e}");
    }
}
