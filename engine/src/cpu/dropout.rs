//! Inverted dropout with a counter-based mask: whether element i is kept is a pure function of
//! `(seed, offset + i)`, so the backward pass recomputes the mask instead of storing it, and the
//! CUDA kernel (`cuda/kernels/dropout.cu`, the same hash) draws bit-identical masks.
//!
//! The hash is SplitMix64 read at a counter: `key = mix64(seed)`, element c draws
//! `mix64(key + (c + 1) * 0x9E3779B97F4A7C15)` (the c-th output of a SplitMix64 stream started at
//! `key`), and keeps its upper 32 bits `u` when `u >= round(p * 2^32)`: probability `1 - p`.

use rayon::prelude::*;

use crate::backend::Dropout;
use crate::error::ConfigError;

const CHUNK: usize = 1 << 14;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Stafford's Mix13), a bijection with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform u32 of element `counter` under a key (`mix64(seed)`).
fn uniform(key: u64, counter: u64) -> u32 {
    (mix64(key.wrapping_add(counter.wrapping_add(1).wrapping_mul(GOLDEN))) >> 32) as u32
}

/// Why `p` cannot be a dropout probability, or Ok.
pub fn check_probability(p: f32) -> Result<(), ConfigError> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(ConfigError::new("dropout", format!("probability {p} is outside [0, 1)")))
    }
}

/// (threshold, scale) of a probability: keep when `uniform >= threshold`, scale kept values by
/// `1 / (1 - p)`. Panics on a probability outside [0, 1), naming it. Every backend takes both
/// from here, so the CPU and the GPU multiply by the same f32.
pub fn mask_params(p: f32) -> (u32, f32) {
    if let Err(e) = check_probability(p) {
        panic!("{e}");
    }
    // p < 1 in f32 is at most 1 - 2^-24, so the product stays below 2^32
    let threshold = (p as f64 * 4_294_967_296.0).round() as u32;
    (threshold, 1.0 / (1.0 - p))
}

/// Whether element `index` (counter `offset + index`) of a `mask` is kept.
pub fn keeps(mask: Dropout, index: u64) -> bool {
    let (threshold, _) = mask_params(mask.p);
    uniform(mix64(mask.seed), mask.offset.wrapping_add(index)) >= threshold
}

/// out = inp * keep / (1 - p)
pub fn forward(out: &mut [f32], inp: &[f32], mask: Dropout) {
    assert_eq!(out.len(), inp.len(), "dropout: out {} vs inp {}", out.len(), inp.len());
    let (threshold, scale) = mask_params(mask.p);
    let key = mix64(mask.seed);
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).enumerate().for_each(|(k, (o, x))| {
        let base = mask.offset.wrapping_add((k * CHUNK) as u64);
        for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
            *o = if uniform(key, base.wrapping_add(j as u64)) >= threshold { x * scale } else { 0.0 };
        }
    });
}

/// dinp += dout * keep / (1 - p)
pub fn backward(dinp: &mut [f32], dout: &[f32], mask: Dropout) {
    assert_eq!(dinp.len(), dout.len(), "dropout backward: dinp {} vs dout {}", dinp.len(), dout.len());
    let (threshold, scale) = mask_params(mask.p);
    let key = mix64(mask.seed);
    dinp.par_chunks_mut(CHUNK).zip(dout.par_chunks(CHUNK)).enumerate().for_each(|(k, (dx, dy))| {
        let base = mask.offset.wrapping_add((k * CHUNK) as u64);
        for (j, (dx, &dy)) in dx.iter_mut().zip(dy).enumerate() {
            if uniform(key, base.wrapping_add(j as u64)) >= threshold {
                *dx += dy * scale;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 seeded with 0 (Vigna's splitmix64.c): its first outputs.
        let out: Vec<u64> = (1..=3u64).map(|c| mix64(c.wrapping_mul(GOLDEN))).collect();
        assert_eq!(out, vec![0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
    }

    #[test]
    fn thresholds() {
        assert_eq!(mask_params(0.0), (0, 1.0));
        assert_eq!(mask_params(0.5).0, 1 << 31);
        assert!(mask_params(0.999_999_94).0 > u32::MAX - 512);
    }
}
