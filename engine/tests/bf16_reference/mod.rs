//! The tests' own bf16 rounding, written from the definition rather than from the engine's
//! code, so that a GPU test compares the CUDA backend with the CPU on exactly the values a bf16
//! buffer holds.

/// f32 -> nearest bf16 (ties to even), widened back to f32: keep the top 16 bits, look at the 16
/// dropped ones. NaN stays NaN.
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    let bits = x.to_bits();
    let (mut upper, dropped) = (bits >> 16, bits & 0xffff);
    // Above half an ulp, or exactly half with an odd kept part: round the magnitude up (a carry
    // into the exponent is right, up to infinity from the largest finite values).
    if dropped > 0x8000 || (dropped == 0x8000 && upper & 1 == 1) {
        upper += 1;
    }
    f32::from_bits(upper << 16)
}

pub fn round_all(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}
