//! What the op tests fill, read and compare buffers with: seeded normal values, whole-buffer
//! views, host copies and the relative error in f64. Included with `mod op_buffers;` by the
//! tests that need it (each test binary compiles its own copy; unused items are allowed).
#![allow(dead_code)]

use smelt_engine::backend::Backend;
use smelt_engine::rng::Rng;

/// `n` values from N(0, std²), the same for a seed on every machine.
pub fn randn(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

/// The whole buffer, read-only.
pub fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}

/// The whole buffer, writable.
pub fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.len(buf);
    be.view_mut(buf, 0..n)
}

/// An activation buffer (`Backend::activation_zeros`: bf16 on a Bf16 CUDA backend, f32 on the
/// CPU) holding `values`.
pub fn activation<B: Backend>(be: &B, values: &[f32]) -> B::Buf {
    let mut buf = be.activation_zeros(values.len());
    be.write(all_mut(be, &mut buf), values);
    buf
}

/// The whole buffer on the host (as f32 whatever its storage).
pub fn host<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f32> {
    be.download(all(be, buf))
}

/// ‖got − want‖ / ‖want‖ in f64 (‖got‖ where want is all zeros).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut d, mut w) = (0.0f64, 0.0f64);
    for (&g, &x) in got.iter().zip(want) {
        d += (g as f64 - x as f64).powi(2);
        w += (x as f64).powi(2);
    }
    if w == 0.0 {
        d.sqrt()
    } else {
        (d / w).sqrt()
    }
}
