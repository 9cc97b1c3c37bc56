//! Range coalescing: the byte ranges a batch of reads needs, merged into few large GETs.
//!
//! On a store where every request costs a round trip (S3: milliseconds), reading 32 sequences
//! with 32 ranged GETs is bound by latency, not bandwidth. [`coalesce`] sorts the ranges of each
//! object by offset and merges neighbours whose gap is at most `max_gap` bytes, as long as the
//! merged range stays within `max_len` bytes: reading a small gap costs less than another request.
//! A pure function, so the plan is the same on any machine and can be tested on its own.

use std::ops::Range;

/// A byte range of object (shard) `object` that one read needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub object: usize,
    pub range: Range<u64>,
}

/// One GET: a byte range of one object, and the needs (indices into the input) it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub object: usize,
    pub range: Range<u64>,
    pub needs: Vec<usize>,
}

/// How ranges are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalesce {
    /// Neighbouring ranges of an object at most this many bytes apart are read in one GET.
    pub max_gap: u64,
    /// A merged GET is at most this long (a single need longer than it stays one GET).
    pub max_len: u64,
}

/// Plans the GETs for `needs`: with `how` = `None`, one GET per need (in input order); otherwise
/// ranges merged per object as described in the module docs, ordered by (object, offset). Every
/// need is served by exactly one extent that contains its whole range.
pub fn coalesce(needs: &[Need], how: Option<Coalesce>) -> Vec<Extent> {
    let Some(how) = how else {
        return needs.iter().enumerate().map(|(i, n)| Extent { object: n.object, range: n.range.clone(), needs: vec![i] }).collect();
    };
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by_key(|&i| (needs[i].object, needs[i].range.start, needs[i].range.end));
    let mut out: Vec<Extent> = Vec::new();
    for i in order {
        let n = &needs[i];
        if let Some(e) = out.last_mut() {
            let end = e.range.end.max(n.range.end);
            if e.object == n.object && n.range.start <= e.range.end.saturating_add(how.max_gap) && end - e.range.start <= how.max_len {
                e.range.end = end;
                e.needs.push(i);
                continue;
            }
        }
        out.push(Extent { object: n.object, range: n.range.clone(), needs: vec![i] });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(object: usize, a: u64, b: u64) -> Need {
        Need { object, range: a..b }
    }

    /// Every need is inside its extent, served once; no extent over `max_len` unless a single need.
    fn check(needs: &[Need], ext: &[Extent], how: Coalesce) {
        let mut seen = vec![0; needs.len()];
        for e in ext {
            assert!(e.range.end - e.range.start <= how.max_len || e.needs.len() == 1, "{e:?}");
            for &i in &e.needs {
                seen[i] += 1;
                assert_eq!(needs[i].object, e.object);
                assert!(e.range.start <= needs[i].range.start && needs[i].range.end <= e.range.end, "{e:?} {:?}", needs[i]);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
    }

    #[test]
    fn merges_close_ranges_per_object_and_respects_the_cap() {
        let needs = vec![
            need(0, 100, 110),
            need(1, 0, 10),
            need(0, 0, 10),
            need(0, 15, 25), // gap 5 after 0..10
            need(0, 24, 30), // overlaps
            need(0, 200, 400),
            need(1, 5, 8), // inside 0..10
        ];
        let how = Coalesce { max_gap: 8, max_len: 150 };
        let ext = coalesce(&needs, Some(how));
        check(&needs, &ext, how);
        let got: Vec<(usize, Range<u64>)> = ext.iter().map(|e| (e.object, e.range.clone())).collect();
        // 0..30 merged; 100..110 is 70 bytes away (over the gap); 200..400 alone exceeds the cap
        assert_eq!(got, [(0, 0..30), (0, 100..110), (0, 200..400), (1, 0..10)]);
        // a wide gap merges everything the cap allows
        let how = Coalesce { max_gap: 1000, max_len: 150 };
        let ext = coalesce(&needs, Some(how));
        check(&needs, &ext, how);
        let got: Vec<Range<u64>> = ext.iter().map(|e| e.range.clone()).collect();
        assert_eq!(got, [0..110, 200..400, 0..10]);
    }

    #[test]
    fn none_is_one_get_per_need_in_order() {
        let needs = vec![need(2, 5, 9), need(0, 0, 4), need(2, 5, 9)];
        let ext = coalesce(&needs, None);
        assert_eq!(ext.len(), 3);
        assert_eq!(ext[0], Extent { object: 2, range: 5..9, needs: vec![0] });
        assert_eq!(ext[2].needs, [2]);
        assert!(coalesce(&[], Some(Coalesce { max_gap: 1, max_len: 1 })).is_empty());
    }

    #[test]
    fn random_plans_are_sound() {
        // a small xorshift, so the cases are the same on every run
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..200 {
            let needs: Vec<Need> = (0..rnd(40) + 1)
                .map(|_| {
                    let a = rnd(5000);
                    need(rnd(3) as usize, a, a + 1 + rnd(300))
                })
                .collect();
            let how = Coalesce { max_gap: rnd(400), max_len: 1 + rnd(2000) };
            let ext = coalesce(&needs, Some(how));
            check(&needs, &ext, how);
            assert!(ext.len() <= needs.len());
        }
    }
}
