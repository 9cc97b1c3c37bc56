//! Weights in safetensors: tensors under their Hugging Face names, f32, with string metadata
//! (smelt stores the model config and tokenizer there).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::EngineError;
use crate::params::ParamTable;

fn err(path: &str, message: impl Into<String>) -> EngineError {
    EngineError::Weights { path: path.to_string(), message: message.into() }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Serializes every tensor of `table` from the flat host buffer `params`.
pub fn to_bytes(table: &ParamTable, params: &[f32], metadata: HashMap<String, String>) -> Result<Vec<u8>, EngineError> {
    assert_eq!(params.len(), table.total(), "parameter buffer size");
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = table
        .specs()
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone(), f32_bytes(&params[s.range()])))
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| err("<memory>", e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| err("<memory>", e.to_string()))?;
    Ok(with_sorted_metadata(bytes))
}

/// `file` with its header's `__metadata__` keys in sorted order. safetensors writes them in a
/// `HashMap`'s order, which differs from process to process: two runs that trained the same
/// weights wrote files whose bytes (and sha256) differed. The header keeps its length (the
/// same keys and values, compact), so the padding and every offset stay as they were.
fn with_sorted_metadata(mut file: Vec<u8>) -> Vec<u8> {
    let Some(len) = file.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else { return file };
    let Some(header) = file.get(8..8 + len) else { return file };
    let Ok(serde_json::Value::Object(mut top)) = serde_json::from_slice::<serde_json::Value>(header) else { return file };
    let Some(serde_json::Value::Object(meta)) = top.remove("__metadata__") else { return file };
    let sorted: std::collections::BTreeMap<String, serde_json::Value> = meta.into_iter().collect();
    // (the tensors' entries keep their offsets, which is what readers go by)
    let mut out = serde_json::Map::new();
    out.insert("__metadata__".into(), serde_json::to_value(sorted).expect("strings"));
    out.extend(top);
    let Ok(text) = serde_json::to_vec(&serde_json::Value::Object(out)) else { return file };
    let padded = header.len();
    if text.len() > padded {
        return file;
    }
    let mut new_header = text;
    new_header.resize(padded, b' ');
    file[8..8 + len].copy_from_slice(&new_header);
    file
}

/// Writes a file atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    use std::io::Write;
    let io = |e| EngineError::Io { path: path.display().to_string(), cause: e };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads the flat parameter buffer of `table` from safetensors bytes, checking that every
/// tensor is present with the right shape and dtype. Returns the parameters and the metadata.
pub fn from_bytes(table: &ParamTable, bytes: &[u8], path: &str) -> Result<(Vec<f32>, HashMap<String, String>), EngineError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let mut out = vec![0.0f32; table.total()];
    for s in table.specs() {
        let t = st.tensor(&s.name).map_err(|_| err(path, format!("missing tensor {}", s.name)))?;
        if t.dtype() != Dtype::F32 {
            return Err(err(path, format!("tensor {} is {:?}, expected F32", s.name, t.dtype())));
        }
        if t.shape() != s.shape.as_slice() {
            return Err(err(path, format!("tensor {} has shape {:?}, expected {:?}", s.name, t.shape(), s.shape)));
        }
        for (dst, chunk) in out[s.range()].iter_mut().zip(t.data().chunks_exact(4)) {
            *dst = f32::from_le_bytes(chunk.try_into().unwrap());
        }
        // A weight no training writes: the file is damaged (or was saved from a diverged run).
        // Refused here, naming the tensor, rather than sampling, exporting or training from it.
        if let Some(i) = out[s.range()].iter().position(|v| !v.is_finite()) {
            let v = out[s.range()][i];
            return Err(err(path, format!("tensor {} holds a non-finite value ({v}) at element {i}: the file is damaged, or was saved from a run that diverged", s.name)));
        }
    }
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| err(path, e.to_string()))?;
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Only the metadata of a safetensors file.
pub fn metadata(bytes: &[u8], path: &str) -> Result<HashMap<String, String>, EngineError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

pub fn read_file(path: &Path) -> Result<Vec<u8>, EngineError> {
    std::fs::read(path).map_err(|e| EngineError::Io { path: path.display().to_string(), cause: e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{Init, ParamKind, ParamTable};

    #[test]
    fn the_same_weights_and_metadata_make_the_same_bytes() {
        let mut table = ParamTable::new();
        table.push("wte", &[3, 2], ParamKind::Weight, Init::Zeros);
        table.push("b", &[2], ParamKind::Bias, Init::Zeros);
        let params: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
        let pairs: Vec<(String, String)> = (0..40).map(|i| (format!("smelt.key{i}"), format!("value {i}"))).collect();
        // two maps whose iteration orders differ (each HashMap has its own random state)
        let files: Vec<Vec<u8>> = (0..4)
            .map(|k| {
                let mut m = HashMap::new();
                for (key, value) in pairs.iter().cycle().skip(k * 7).take(pairs.len()) {
                    m.insert(key.clone(), value.clone());
                }
                to_bytes(&table, &params, m).unwrap()
            })
            .collect();
        assert!(files.windows(2).all(|w| w[0] == w[1]), "the same model wrote different bytes");
        let (back, meta) = from_bytes(&table, &files[0], "f").unwrap();
        assert_eq!(back, params);
        assert_eq!(meta.len(), 40);
        assert_eq!(meta["smelt.key7"], "value 7");
        // the header is what safetensors itself reads
        let st = SafeTensors::deserialize(&files[0]).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[2]);
    }
}
