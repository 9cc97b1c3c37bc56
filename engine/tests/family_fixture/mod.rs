//! Reading the golden fixtures of the transformer family (safetensors written by
//! `tools/golden/{bert,t5}_jax.py`; config as JSON in the metadata).

#![allow(dead_code)]

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors};
use smelt_engine::params::ParamTable;

pub struct Fixture {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// int32 tensors read as u32 (so -1 becomes `IGNORE_INDEX`).
    pub ints: HashMap<String, Vec<u32>>,
    pub meta: serde_json::Value,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let config = header.metadata().as_ref().and_then(|m| m.get("config")).expect("fixture metadata lacks config");
        let meta = serde_json::from_str(config).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut f = Fixture { tensors: HashMap::new(), ints: HashMap::new(), meta };
        for (name, t) in st.tensors() {
            let data = t.data();
            match t.dtype() {
                Dtype::F32 => {
                    let v = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                    f.tensors.insert(name, (t.shape().to_vec(), v));
                }
                Dtype::I32 => {
                    let v = data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect();
                    f.ints.insert(name, v);
                }
                d => panic!("unexpected dtype {d:?}"),
            }
        }
        f
    }

    pub fn get(&self, name: &str) -> &[f32] {
        &self.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name}")).1
    }

    /// The flat buffer for `table` from tensors named `prefix.<name>`; every table entry must be
    /// in the fixture with its shape, and the fixture must hold no parameter the table lacks.
    pub fn flat(&self, table: &ParamTable, prefix: &str) -> Vec<f32> {
        let mut out = vec![0.0; table.total()];
        for s in table.specs() {
            let (shape, v) = self.tensors.get(&format!("{prefix}.{}", s.name)).unwrap_or_else(|| panic!("fixture lacks {prefix}.{}", s.name));
            assert_eq!(shape, &s.shape, "{}", s.name);
            out[s.range()].copy_from_slice(v);
        }
        let in_fixture = self.tensors.keys().filter(|k| k.starts_with(&format!("{prefix}."))).count();
        assert_eq!(in_fixture, table.specs().len(), "the fixture has {prefix}.* tensors the model's table lacks");
        out
    }
}

/// max |a - b| / max(max |b|, 1e-6): one scale for a whole tensor.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
