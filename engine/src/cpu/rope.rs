//! Rotary position embedding on packed q|k|v rows, in place (see `Backend::rope`).

use rayon::prelude::*;

use crate::backend::RopeShape;

/// Turns each (i, i + hd/2) pair of every q and k head of every row by its position's angle
/// (`inverse`: the other way). `table`: (T_max, hd/2) cosines then (T_max, hd/2) sines.
pub fn rope(qkv: &mut [f32], table: &[f32], s: RopeShape, inverse: bool) {
    let (c, heads) = (s.channels, s.heads);
    let hd = s.head_dim();
    let half = hd / 2;
    assert!(heads > 0 && c.is_multiple_of(heads) && hd.is_multiple_of(2), "rope: head width {c}/{heads} must be even");
    assert_eq!(qkv.len(), s.rows * 3 * c, "rope: qkv holds {} values, not rows x 3C = {}", qkv.len(), s.rows * 3 * c);
    let t_max = table.len() / (2 * half);
    assert!(table.len() == 2 * half * t_max && s.seq_len <= t_max, "rope: a table of {t_max} positions for sequences of {}", s.seq_len);
    let (cos, sin) = table.split_at(t_max * half);
    qkv.par_chunks_mut(3 * c).enumerate().for_each(|(row, r)| {
        let pos = row % s.seq_len;
        let (cs, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        // q: r[0..C], k: r[C..2C], head h at h*hd within each
        for head in r[..2 * c].chunks_exact_mut(hd) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                let (co, si) = (cs[i], if inverse { -sn[i] } else { sn[i] });
                lo[i] = a * co - b * si;
                hi[i] = b * co + a * si;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_undoes_the_rotation_and_v_is_untouched() {
        let s = RopeShape { rows: 6, seq_len: 3, channels: 8, heads: 2 };
        let half = 2;
        let t_max = 4;
        let mut table = vec![0.0f32; 2 * t_max * half];
        for p in 0..t_max {
            for i in 0..half {
                let a = p as f64 * 10000f64.powf(-((2 * i) as f64) / 4.0);
                table[p * half + i] = a.cos() as f32;
                table[t_max * half + p * half + i] = a.sin() as f32;
            }
        }
        let orig: Vec<f32> = (0..6 * 24).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let mut x = orig.clone();
        rope(&mut x, &table, s, false);
        // position 0 rows are unchanged (cos 1, sin 0); others moved; v never
        assert_eq!(&x[..24], &orig[..24]);
        assert_ne!(&x[24..40], &orig[24..40]);
        for r in 0..6 {
            assert_eq!(&x[r * 24 + 16..r * 24 + 24], &orig[r * 24 + 16..r * 24 + 24]);
        }
        // a rotation keeps each pair's length
        let (a, b) = (orig[24], orig[26]);
        assert!(((x[24] * x[24] + x[26] * x[26]) - (a * a + b * b)).abs() < 1e-5);
        rope(&mut x, &table, s, true);
        for (u, v) in x.iter().zip(&orig) {
            assert!((u - v).abs() < 1e-5, "{u} vs {v}");
        }
    }
}
