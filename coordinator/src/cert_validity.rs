//! When the coordinator's TLS certificate is valid: read from the certificate's DER (its
//! `validity` field, RFC 5280 4.1.2.5) at start, so an expired or soon-expiring certificate is
//! said in the coordinator's own log, not only in every worker's refusal. A few lines of DER
//! walking rather than an X.509 crate: only two fields are needed.

/// A certificate's validity period, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// One DER element at `at`: its tag and the range of its contents.
fn element(der: &[u8], at: usize) -> Option<(u8, usize, usize)> {
    let tag = *der.get(at)?;
    let first = *der.get(at + 1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, at + 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *der.get(at + 2 + i)? as usize;
        }
        (len, at + 2 + n)
    };
    let end = start.checked_add(len)?;
    (end <= der.len()).then_some((tag, start, end))
}

/// The validity period of the DER certificate `der`; `None` if it does not parse.
pub fn validity(der: &[u8]) -> Option<Validity> {
    const SEQUENCE: u8 = 0x30;
    let (tag, cert, _) = element(der, 0)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, tbs_end) = element(der, cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // version [0] (optional), serialNumber, signature, issuer, then validity
    let mut at = tbs;
    let (tag, _, end) = element(der, at)?;
    if tag == 0xa0 {
        at = end;
    }
    for _ in 0..3 {
        at = element(der, at)?.2;
    }
    let (tag, validity, validity_end) = element(der, at)?;
    if tag != SEQUENCE || validity_end > tbs_end {
        return None;
    }
    let (tag_b, b_start, b_end) = element(der, validity)?;
    let (tag_a, a_start, a_end) = element(der, b_end)?;
    Some(Validity { not_before: time(tag_b, &der[b_start..b_end])?, not_after: time(tag_a, &der[a_start..a_end])? })
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix
/// seconds.
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What to say about a certificate valid over `v` at `now` (Unix seconds): `None` when it is
/// valid for more than `warn_days`.
pub fn concern(v: Validity, now: i64, warn_days: i64) -> Option<String> {
    let days = |s: i64| s.div_euclid(86_400);
    if now >= v.not_after {
        Some(format!("it expired {} days ago: every worker and client will refuse it; renew it", days(now - v.not_after)))
    } else if now < v.not_before {
        Some(format!("it is not valid for another {} days (check this machine's clock): workers and clients will refuse it until then", (v.not_before - now + 86_399) / 86_400))
    } else if v.not_after - now < warn_days * 86_400 {
        Some(format!("it expires in {} days: renew it before workers and clients start refusing it", days(v.not_after - now)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{date_time_ymd, CertificateParams, KeyPair};

    fn cert(from: (i32, u8, u8), to: (i32, u8, u8)) -> Vec<u8> {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_before = date_time_ymd(from.0, from.1, from.2);
        p.not_after = date_time_ymd(to.0, to.1, to.2);
        p.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn the_validity_of_a_certificate_is_read_in_both_time_forms() {
        // 2020-02-29 00:00:00 UTC and 2049-12-31 (UTCTime), 2051-03-01 (GeneralizedTime)
        let v = validity(&cert((2020, 2, 29), (2049, 12, 31))).unwrap();
        assert_eq!(v, Validity { not_before: 1_582_934_400, not_after: 2_524_521_600 });
        let v = validity(&cert((1999, 1, 1), (2051, 3, 1))).unwrap();
        assert_eq!(v, Validity { not_before: 915_148_800, not_after: 2_561_241_600 });
        assert_eq!(validity(b"not a certificate"), None);
        assert_eq!(validity(&[0x30, 0x82, 0xff]), None);
    }

    #[test]
    fn expired_not_yet_valid_and_expiring_certificates_are_named() {
        let v = Validity { not_before: 1_000 * 86_400, not_after: 2_000 * 86_400 };
        assert_eq!(concern(v, 1_500 * 86_400, 14), None);
        assert!(concern(v, 2_003 * 86_400, 14).unwrap().contains("expired 3 days ago"));
        assert!(concern(v, 1_990 * 86_400, 14).unwrap().contains("expires in 10 days"));
        assert!(concern(v, 998 * 86_400, 14).unwrap().contains("not valid for another 2 days"));
    }
}
