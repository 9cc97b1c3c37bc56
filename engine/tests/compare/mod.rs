//! How the CUDA tests compare a result with the CPU's.

/// ‖got − want‖ / ‖want‖ in f64. Panics on different lengths, and on an all-zero reference
/// (the comparison would prove nothing).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    assert!(den > 0.0, "reference is all zeros: the comparison would prove nothing");
    (num / den).sqrt()
}
