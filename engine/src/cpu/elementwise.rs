//! Elementwise ops: GELU (tanh approximation) and the residual add.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "gelu");
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            let u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
            *o = 0.5 * x * (1.0 + u.tanh());
        }
    });
}

/// dinp += dout * gelu'(x)
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len(), "gelu backward");
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| {
            for i in 0..dx.len() {
                let x = x[i];
                let u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
                let t = u.tanh();
                let sech2 = 1.0 - t * t;
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
                dx[i] += dy[i] * (0.5 * (1.0 + t) + 0.5 * x * sech2 * du);
            }
        });
}

/// out = a + b
/// `out = a + out` elementwise (the residual add with the projection already in `out`).
pub fn add_onto(out: &mut [f32], a: &[f32]) {
    assert_eq!(out.len(), a.len(), "residual");
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(o, a)| {
        // residual + projection: IEEE addition commutes, so this is a[i] + o[i] bit for bit
        for (o, a) in o.iter_mut().zip(a) {
            *o += a;
        }
    });
}

pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(out.len() == a.len() && a.len() == b.len(), "residual");
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for i in 0..o.len() {
                o[i] = a[i] + b[i];
            }
        });
}

/// da += dout; db += dout
pub fn residual_backward(da: &mut [f32], db: &mut [f32], dout: &[f32]) {
    assert!(da.len() == dout.len() && db.len() == dout.len(), "residual backward");
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK).zip(dout.par_chunks(CHUNK)))
        .for_each(|(da, (db, dy))| {
            for i in 0..dy.len() {
                da[i] += dy[i];
                db[i] += dy[i];
            }
        });
}
