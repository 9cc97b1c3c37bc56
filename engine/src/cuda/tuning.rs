//! The CUDA backend's performance switches in one place: each one's default, the environment
//! variable that overrides it (for measuring variants on a card without rebuilding) and what
//! the bench reports, so that a recorded figure says exactly which variant it measured and a
//! default measured better is flipped here, once.
//!
//! Every switch computes the same function; some change which kernels or GEMM algorithms run,
//! and those marked so below are no longer bitwise repeatable from run to run. A value a variable
//! cannot mean is a `ConfigError` naming the variable (never silently the default), which
//! `CudaBackend::new` returns before touching the device.
//!
//! Why each default is what it is: bench/NOTES.md, issue 5's section (v5 to v10).

use crate::error::ConfigError;

/// The switches. `Default` is what ships; [`CudaTuning::from_env`] applies the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaTuning {
    /// `SMELT_BF16_ACTIVATIONS`: activations that only matmuls, attention, GELU, LayerNorm's
    /// forward and the classifier touch are stored as bf16 (v6: on).
    pub bf16_activations: bool,
    /// `SMELT_WEIGHT_SHADOW`: bf16 matmuls read their weights from a bf16 shadow of the whole
    /// parameter buffer kept current by AdamW, instead of converting per call (v8: on).
    pub weight_shadow: bool,
    /// `SMELT_CUBLASLT`: GEMMs through cuBLASLt with fused epilogues; off, cublasGemmEx alone.
    pub cublaslt: bool,
    /// `SMELT_LT_AUTOTUNE`: each GEMM shape's first call times cuBLASLt's first algorithms and
    /// keeps the fastest (v10; measured in run 16 on an H200: GPT-2's step 34.9 -> 33.8 ms, so
    /// on). Not bitwise repeatable from one process to the next: `SMELT_LT_AUTOTUNE=0` for runs
    /// that must repeat bit for bit.
    pub lt_autotune: bool,
    /// `SMELT_LT_AUTOTUNE_CANDIDATES`: how many of cuBLASLt's heuristic algorithms autotuning
    /// times per shape, 2..=32 (8).
    pub lt_autotune_candidates: u32,
    /// `SMELT_GELU_EPILOGUE`: the MLP's up-projection + GELU and its backward as cuBLASLt
    /// GELU_AUX_BIAS / DGELU_BGRAD epilogues (v9; run 16, H200: +1.8 ms per GPT-2 step: off).
    pub gelu_epilogue: bool,
    /// `SMELT_FAST_GELU`: the bf16 GELU kernels compute sigmoid(2u) by the special-function
    /// unit's exp2 and reciprocal instead of tanhf (elementwise.cu; stop 27: within one bf16 unit
    /// of the CPU either way, ~4x fewer instructions per value). Compiled in (`-DSMELT_FAST_GELU`).
    pub fast_gelu: bool,
    /// `SMELT_FUSED_GELU_BIAS`: the MLP up-projection's bias gradient summed by the GELU backward
    /// as it writes its output (`gelu_backward_set_bias_bf16`) instead of a column-sum pass that
    /// reads it back; bitwise the same (stop 27).
    pub fused_gelu_bias: bool,
    /// `SMELT_FUSED_QKV_BIAS`: the qkv projection's bias gradient summed by the attention
    /// backward's gradient passes as they store dqkv (`attention::backward_set_with_bias`)
    /// instead of a column-sum pass that reads dqkv back; bitwise the same (stop 28).
    pub fused_qkv_bias: bool,
    /// `SMELT_FUSED_PROJ_BIAS`: the attention and MLP output projections' bias gradients summed
    /// by the LayerNorm backward that writes their output gradient's bf16 copy
    /// (`layernorm::backward_with_sum`) instead of a column-sum pass that reads it back; bitwise
    /// the same (stop 28).
    pub fused_proj_bias: bool,
    /// `SMELT_BGRAD_EPILOGUE`: bias gradients from the weight-gradient GEMM's epilogue instead
    /// of a column-sum pass (v9; run 18, H200: +0.5 ms: off).
    pub bgrad_epilogue: bool,
    /// `SMELT_FUSED_CLASSIFIER`: the classifier's forward and in-place backward of a row in one
    /// block (v9's version: no faster in runs 16 and 19, H200; v8's slower: off).
    pub fused_classifier: bool,
    /// `SMELT_CE_BLOCKS_PER_SM`: the fused classifier's blocks per SM, 1..=4, capped so the rows
    /// in flight stay in L2 (cross_entropy.rs).
    pub ce_blocks_per_sm: u32,
    /// `SMELT_ATTN_FUSED_BWD`: the bf16 attention backward in one pass over the tile pairs (5
    /// products per pair instead of 7; v10; run 16, H200: no faster: off). dq not bitwise repeatable.
    pub fused_attention_backward: bool,
    /// `SMELT_ATTN_DQ_BULK`: the fused backward adds dq by TMA bulk reductions on sm_90 (else
    /// vector atomics). Compiled in (`-DSMELT_ATTN_DQ_BULK`).
    pub attn_dq_bulk: bool,
    /// `SMELT_ATTN_WGMMA`: on sm_90 (H100, H200) the bf16 attention forward and its dkv and dq
    /// passes run on Hopper's warpgroup MMA (attention_wgmma.cuh) instead of mma.sync; the
    /// attention module is then compiled for sm_90a. Elsewhere, and for the fused backward, the
    /// mma.sync kernels run either way. Stop 28: checked by the host emulator and ptxas only
    /// (no card yet): off until a card has measured it.
    pub attn_wgmma: bool,
    /// `SMELT_ATTN_MIN_BLOCKS="fwd,dkv,dq"`: blocks per SM the hd-64 tensor-core attention
    /// kernels are compiled for (their register cap), each 1..=4 (v8 run 13). The fused
    /// backward shares the dkv pass's (it needs ~229 registers: more than 2 would spill).
    pub attn_min_blocks: [u32; 3],
    /// `SMELT_ATTN_HEAD_GROUP`: heads whose tiles the tensor-core attention kernels schedule
    /// together, heaviest first (0..=4096; 0: the launch grid's own order; v9).
    pub attn_head_group: u32,
    /// `SMELT_NCCL_OVERLAP`: gradient buckets all-reduced on a second stream while the backward
    /// pass goes on (unmeasured on several GPUs: off).
    pub nccl_overlap: bool,
    /// `SMELT_NCCL_NONBLOCKING`: the communicator is created non-blocking (`blocking = 0`) and
    /// polled, so a join whose peers never come can be aborted; NCCL calls that answer "in
    /// progress" are polled until enqueued (nccl.rs). Off: the blocking `ncclCommInitRank`,
    /// whose thread an abort leaves behind. On (run 16, H200: the world-of-one tests and a
    /// cancelled join whose peer never came passed).
    pub nccl_nonblocking: bool,
}

impl Default for CudaTuning {
    fn default() -> Self {
        CudaTuning {
            bf16_activations: true,
            weight_shadow: true,
            cublaslt: true,
            lt_autotune: true,
            lt_autotune_candidates: 8,
            gelu_epilogue: false,
            fast_gelu: true,
            fused_gelu_bias: true,
            fused_qkv_bias: true,
            fused_proj_bias: true,
            bgrad_epilogue: false,
            fused_classifier: false,
            ce_blocks_per_sm: 2,
            fused_attention_backward: false,
            attn_dq_bulk: true,
            attn_wgmma: false,
            attn_min_blocks: [4, 1, 3],
            attn_head_group: 16,
            nccl_overlap: false,
            nccl_nonblocking: true,
        }
    }
}

/// The most blocks per SM the fused classifier may ask for (more would not fit by threads).
pub(crate) const MAX_CE_BLOCKS_PER_SM: u32 = 4;
/// The most algorithms autotuning may time per GEMM shape.
pub(crate) const MAX_AUTOTUNE_CANDIDATES: u32 = 32;
/// The largest head group `tile_order` takes.
const MAX_HEAD_GROUP: u32 = 4096;

impl CudaTuning {
    /// The defaults with this process's environment applied.
    pub fn from_env() -> Result<CudaTuning, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The defaults with `get`'s values applied (`get(name)`: a variable's value, if set).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CudaTuning, ConfigError> {
        let mut t = CudaTuning::default();
        let flag = |name: &str, value: &mut bool| -> Result<(), ConfigError> {
            if let Some(v) = get(name) {
                *value = match v.trim() {
                    "1" => true,
                    "0" => false,
                    _ => return Err(ConfigError::new(name, format!("`{v}` is not 0 (off) or 1 (on)"))),
                };
            }
            Ok(())
        };
        flag("SMELT_BF16_ACTIVATIONS", &mut t.bf16_activations)?;
        flag("SMELT_WEIGHT_SHADOW", &mut t.weight_shadow)?;
        flag("SMELT_CUBLASLT", &mut t.cublaslt)?;
        flag("SMELT_LT_AUTOTUNE", &mut t.lt_autotune)?;
        flag("SMELT_GELU_EPILOGUE", &mut t.gelu_epilogue)?;
        flag("SMELT_FAST_GELU", &mut t.fast_gelu)?;
        flag("SMELT_FUSED_GELU_BIAS", &mut t.fused_gelu_bias)?;
        flag("SMELT_FUSED_QKV_BIAS", &mut t.fused_qkv_bias)?;
        flag("SMELT_FUSED_PROJ_BIAS", &mut t.fused_proj_bias)?;
        flag("SMELT_BGRAD_EPILOGUE", &mut t.bgrad_epilogue)?;
        flag("SMELT_FUSED_CLASSIFIER", &mut t.fused_classifier)?;
        flag("SMELT_ATTN_FUSED_BWD", &mut t.fused_attention_backward)?;
        flag("SMELT_ATTN_DQ_BULK", &mut t.attn_dq_bulk)?;
        flag("SMELT_ATTN_WGMMA", &mut t.attn_wgmma)?;
        flag("SMELT_NCCL_OVERLAP", &mut t.nccl_overlap)?;
        flag("SMELT_NCCL_NONBLOCKING", &mut t.nccl_nonblocking)?;
        if let Some(v) = get("SMELT_CE_BLOCKS_PER_SM") {
            t.ce_blocks_per_sm = count(&v, 1..=MAX_CE_BLOCKS_PER_SM)
                .ok_or_else(|| ConfigError::new("SMELT_CE_BLOCKS_PER_SM", format!("`{v}` is not a count of blocks in 1..={MAX_CE_BLOCKS_PER_SM}")))?;
        }
        if let Some(v) = get("SMELT_LT_AUTOTUNE_CANDIDATES") {
            t.lt_autotune_candidates = count(&v, 2..=MAX_AUTOTUNE_CANDIDATES).ok_or_else(|| {
                ConfigError::new("SMELT_LT_AUTOTUNE_CANDIDATES", format!("`{v}` is not a count of algorithms in 2..={MAX_AUTOTUNE_CANDIDATES}"))
            })?;
        }
        if let Some(v) = get("SMELT_ATTN_MIN_BLOCKS") {
            let n: Option<Vec<u32>> = v.split(',').map(|x| count(x, 1..=4)).collect();
            t.attn_min_blocks = n.and_then(|n| n.try_into().ok()).ok_or_else(|| {
                ConfigError::new("SMELT_ATTN_MIN_BLOCKS", format!("`{v}` is not three counts \"fwd,dkv,dq\", each in 1..=4"))
            })?;
        }
        if let Some(v) = get("SMELT_ATTN_HEAD_GROUP") {
            t.attn_head_group = count(&v, 0..=MAX_HEAD_GROUP)
                .ok_or_else(|| ConfigError::new("SMELT_ATTN_HEAD_GROUP", format!("`{v}` is not a head count in 0..={MAX_HEAD_GROUP}")))?;
        }
        Ok(t)
    }

    /// Every switch as the variable and value that select it: what the bench reports, and
    /// what reproduces the variant (`env` with these set).
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let b = |on: bool| if on { "1" } else { "0" }.to_string();
        let [fwd, dkv, dq] = self.attn_min_blocks;
        vec![
            ("SMELT_BF16_ACTIVATIONS", b(self.bf16_activations)),
            ("SMELT_WEIGHT_SHADOW", b(self.weight_shadow)),
            ("SMELT_CUBLASLT", b(self.cublaslt)),
            ("SMELT_LT_AUTOTUNE", b(self.lt_autotune)),
            ("SMELT_LT_AUTOTUNE_CANDIDATES", self.lt_autotune_candidates.to_string()),
            ("SMELT_GELU_EPILOGUE", b(self.gelu_epilogue)),
            ("SMELT_FAST_GELU", b(self.fast_gelu)),
            ("SMELT_FUSED_GELU_BIAS", b(self.fused_gelu_bias)),
            ("SMELT_FUSED_QKV_BIAS", b(self.fused_qkv_bias)),
            ("SMELT_FUSED_PROJ_BIAS", b(self.fused_proj_bias)),
            ("SMELT_BGRAD_EPILOGUE", b(self.bgrad_epilogue)),
            ("SMELT_FUSED_CLASSIFIER", b(self.fused_classifier)),
            ("SMELT_CE_BLOCKS_PER_SM", self.ce_blocks_per_sm.to_string()),
            ("SMELT_ATTN_FUSED_BWD", b(self.fused_attention_backward)),
            ("SMELT_ATTN_DQ_BULK", b(self.attn_dq_bulk)),
            ("SMELT_ATTN_WGMMA", b(self.attn_wgmma)),
            ("SMELT_ATTN_MIN_BLOCKS", format!("{fwd},{dkv},{dq}")),
            ("SMELT_ATTN_HEAD_GROUP", self.attn_head_group.to_string()),
            ("SMELT_NCCL_OVERLAP", b(self.nccl_overlap)),
            ("SMELT_NCCL_NONBLOCKING", b(self.nccl_nonblocking)),
        ]
    }

    /// The preprocessor definitions the kernels are compiled with (every module gets all of
    /// them; the sources' own `#ifndef` defaults serve the host emulator).
    pub fn defines(&self) -> Vec<String> {
        let [fwd, dkv, dq] = self.attn_min_blocks;
        vec![
            format!("-DSMELT_ATTN_FWD_MIN_BLOCKS={fwd}"),
            format!("-DSMELT_ATTN_DKV_MIN_BLOCKS={dkv}"),
            format!("-DSMELT_ATTN_DQ_MIN_BLOCKS={dq}"),
            format!("-DSMELT_ATTN_DQ_BULK={}", u32::from(self.attn_dq_bulk)),
            format!("-DSMELT_ATTN_HEAD_GROUP={}", self.attn_head_group),
            format!("-DSMELT_FAST_GELU={}", u32::from(self.fast_gelu)),
        ]
    }
}

/// `s` as a count within `range`, or None.
fn count(s: &str, range: std::ops::RangeInclusive<u32>) -> Option<u32> {
    s.trim().parse::<u32>().ok().filter(|n| range.contains(n))
}

#[cfg(test)]
mod tests {
    use super::CudaTuning;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<CudaTuning, crate::error::ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CudaTuning::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variables_give_the_defaults() {
        assert_eq!(with(&[]).unwrap(), CudaTuning::default());
    }

    #[test]
    fn every_setting_read_back_gives_the_same_tuning() {
        // a tuning far from the defaults: each switch flipped, each count moved
        let mut t = CudaTuning::default();
        t.bf16_activations = false;
        t.weight_shadow = false;
        t.cublaslt = false;
        t.lt_autotune = false;
        t.lt_autotune_candidates = 16;
        t.gelu_epilogue = true;
        t.fast_gelu = false;
        t.fused_gelu_bias = false;
        t.fused_qkv_bias = false;
        t.fused_proj_bias = false;
        t.bgrad_epilogue = true;
        t.fused_classifier = true;
        t.ce_blocks_per_sm = 3;
        t.fused_attention_backward = true;
        t.attn_dq_bulk = false;
        t.attn_wgmma = true;
        t.attn_min_blocks = [2, 2, 1];
        t.attn_head_group = 0;
        t.nccl_overlap = true;
        t.nccl_nonblocking = false;
        let settings = t.settings();
        let vars: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(with(&vars).unwrap(), t);
        // and every field has a variable: the defaults' settings differ from t's in each one
        let defaults = CudaTuning::default().settings();
        assert_eq!(defaults.len(), settings.len());
        for ((name, a), (_, b)) in defaults.iter().zip(&settings) {
            assert_ne!(a, b, "{name} did not move");
        }
    }

    #[test]
    fn values_are_trimmed() {
        let t = with(&[("SMELT_GELU_EPILOGUE", " 1 "), ("SMELT_ATTN_MIN_BLOCKS", "4, 2 ,3")]).unwrap();
        assert!(t.gelu_epilogue);
        assert_eq!(t.attn_min_blocks, [4, 2, 3]);
    }

    #[test]
    fn a_value_a_variable_cannot_mean_is_an_error_naming_it() {
        let bad = [
            ("SMELT_GELU_EPILOGUE", "yes"),
            ("SMELT_BF16_ACTIVATIONS", "2"),
            ("SMELT_NCCL_OVERLAP", ""),
            ("SMELT_CE_BLOCKS_PER_SM", "0"),
            ("SMELT_CE_BLOCKS_PER_SM", "5"),
            ("SMELT_CE_BLOCKS_PER_SM", "two"),
            ("SMELT_ATTN_MIN_BLOCKS", "4,1"),
            ("SMELT_ATTN_MIN_BLOCKS", "4,1,3,2"),
            ("SMELT_ATTN_MIN_BLOCKS", "4,0,3"),
            ("SMELT_ATTN_HEAD_GROUP", "-1"),
            ("SMELT_ATTN_HEAD_GROUP", "4097"),
        ];
        for (name, value) in bad {
            let e = with(&[(name, value)]).expect_err(&format!("{name}={value}"));
            assert_eq!(e.field, name);
            assert!(e.message.contains(&format!("`{value}`")), "{name}={value}: {}", e.message);
        }
    }

    #[test]
    fn the_default_defines_are_the_sources_own_defaults() {
        // the emulator compiles the sources without defines: both must build the same kernels
        let src: String = crate::cuda::kernels::MODULES.iter().map(|(_, s)| *s).collect();
        for define in CudaTuning::default().defines() {
            let (name, value) = define.trim_start_matches("-D").split_once('=').unwrap();
            let default = format!("#ifndef {name}\n#define {name} {value}\n#endif");
            assert!(src.contains(&default), "the kernel sources' default for {name} is not {value}");
        }
    }
}
