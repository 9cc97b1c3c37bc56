//! AdamW (decoupled weight decay, PyTorch semantics) over a range of the flat buffers.

use rayon::prelude::*;

use crate::backend::AdamWStep;

const CHUNK: usize = 1 << 14;

pub fn update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWStep) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "adamw buffers");
    let bc1 = 1.0 - hp.beta1.powi(hp.t as i32);
    let bc2 = 1.0 - hp.beta2.powi(hp.t as i32);
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * hp.grad_scale;
                p[i] -= hp.lr * hp.weight_decay * p[i];
                m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
                v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
                let mhat = m[i] / bc1;
                let vhat = v[i] / bc2;
                p[i] -= hp.lr * mhat / (vhat.sqrt() + hp.eps);
            }
        });
}
