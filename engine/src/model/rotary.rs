//! The cosine and sine table of rotary position embeddings (RoPE: Su et al. 2021; the "rotate
//! half" layout of GPT-NeoX and Llama), which `Backend::rope` reads.

/// RoPE's base: frequency i of a head of width hd is base^(-2i/hd).
pub const ROPE_BASE: f64 = 10_000.0;

/// (t_max, hd/2) cosines followed by (t_max, hd/2) sines of position p times frequency i,
/// computed in f64 and rounded once, so every backend turns by the same f32 values.
pub fn table(t_max: usize, head_dim: usize) -> Vec<f32> {
    assert!(head_dim.is_multiple_of(2), "rotary positions need an even head width, not {head_dim}");
    let half = head_dim / 2;
    let mut out = vec![0.0f32; 2 * t_max * half];
    for p in 0..t_max {
        for i in 0..half {
            let angle = p as f64 * ROPE_BASE.powf(-((2 * i) as f64) / head_dim as f64);
            out[p * half + i] = angle.cos() as f32;
            out[t_max * half + p * half + i] = angle.sin() as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_the_identity_and_frequencies_fall() {
        let t = table(5, 8);
        let (cos, sin) = t.split_at(5 * 4);
        assert_eq!(&cos[..4], &[1.0; 4]);
        assert_eq!(&sin[..4], &[0.0; 4]);
        // position 1: angle = base^(-2i/8) for i = 0..4
        assert_eq!(sin[4], 1f64.sin() as f32);
        assert_eq!(cos[5], (10_000f64.powf(-0.25)).cos() as f32);
        assert!(sin[4] > sin[5] && sin[5] > sin[6] && sin[6] > sin[7]);
    }
}
