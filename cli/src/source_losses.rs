//! A data mixture's per-source validation losses as the CLI prints them beside the validation
//! loss (`smelt submit --follow`, `smelt jobs get`): ` [web 2.1000, code 2.5500]`, each source by
//! the last part of its corpus URI, or by the whole URIs when two would read the same.

use smelt_proto::v1::SourceLoss;

/// Short names of the sources, in order.
pub(crate) fn labels(names: &[&str]) -> Vec<String> {
    let short: Vec<&str> = names
        .iter()
        .map(|n| n.trim_end_matches('/').rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or(n))
        .collect();
    let mut seen = short.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() == short.len() {
        short.into_iter().map(str::to_string).collect()
    } else {
        names.iter().map(|n| n.to_string()).collect()
    }
}

/// ` [name loss, ...]`, to follow a printed validation loss; empty without sources.
pub(crate) fn bracketed(sources: &[SourceLoss]) -> String {
    if sources.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    let parts: Vec<String> = labels(&names).iter().zip(sources).map(|(name, s)| format!("{name} {:.4}", s.loss)).collect();
    format!(" [{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, loss: f32) -> SourceLoss {
        SourceLoss { name: name.into(), loss }
    }

    #[test]
    fn sources_print_by_their_short_names() {
        let s = [src("s3://bucket/corpora/web", 2.1), src("/data/corpora/code/", 2.55)];
        assert_eq!(bracketed(&s), " [web 2.1000, code 2.5500]");
        assert_eq!(bracketed(&[]), "");
        assert_eq!(labels(&["plain"]), ["plain"]);
    }

    #[test]
    fn sources_that_would_read_the_same_keep_their_whole_names() {
        assert_eq!(labels(&["s3://a/web", "s3://b/web"]), ["s3://a/web", "s3://b/web"]);
    }
}
