//! A TOML error of a job spec as a user reads it: the dotted field it is about
//! (`train.steps`, from the key on the error's line and the table above it) and the line, where
//! toml's own message names neither.

/// The field and message for toml's error `e` on `text`.
pub fn describe(text: &str, e: &toml::de::Error) -> (String, String) {
    let message = e.message().trim().to_string();
    let Some(span) = e.span() else { return ("toml".to_string(), message) };
    let at = span.start.min(text.len());
    let line_no = text[..at].matches('\n').count() + 1;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let column = text[line_start..at].chars().count() + 1;
    let located = format!("{message} (line {line_no}, column {column})");
    // a missing field: toml points at the table that lacks it (or the document's start)
    if let Some(name) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
        let table = line.trim().strip_prefix('[').and_then(|h| h.strip_suffix(']')).map(|h| h.trim_matches(['[', ']']).trim());
        let field = match table {
            Some(t) if !t.is_empty() => format!("{t}.{name}"),
            _ => name.to_string(),
        };
        return (field, "required, and not in the spec".to_string());
    }
    // a `key = value` line: the key, under the nearest table header above it
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('['));
    let Some(key) = key else {
        // a table header (`[trian]`) or a syntax error: the line says where
        let header = line.trim();
        let field = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')).map(|h| h.trim_matches(['[', ']']).trim().to_string());
        return (field.unwrap_or_else(|| "toml".to_string()), located);
    };
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| h.trim_matches(['[', ']']).trim().to_string());
    let field = match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    };
    (field, located)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> (String, String) {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Train {
            steps: u64,
            #[serde(default)]
            micro_batch: u64,
        }
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Spec {
            name: String,
            train: Train,
        }
        let e = toml::from_str::<Spec>(text).unwrap_err();
        describe(text, &e)
    }

    #[test]
    fn a_bad_value_names_its_dotted_field_and_line() {
        let (field, message) = of("name = \"x\"\n\n[train]\nsteps = \"thirty\"\n");
        assert_eq!(field, "train.steps");
        assert!(message.contains("invalid type: string \"thirty\", expected u64") && message.contains("(line 4, column 9)"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_named_under_its_table() {
        let (field, message) = of("name = \"x\"\n[train]\nsteps = 3\nmicro_bach = 2\n");
        assert_eq!(field, "train.micro_bach");
        assert!(message.contains("unknown field `micro_bach`") && message.contains("line 4"), "{message}");
    }

    #[test]
    fn a_missing_field_or_table_is_named_as_a_field() {
        assert_eq!(of("name = \"x\"\n"), ("train".to_string(), "required, and not in the spec".to_string()));
        assert_eq!(of("").0, "name");
        assert_eq!(of("name = \"x\"\n[train]\nmicro_batch = 2\n").0, "train.steps");
    }

    #[test]
    fn a_syntax_error_gives_its_line() {
        let (field, message) = of("name = \"x\"\n[train\nsteps = 3\n");
        assert_eq!(field, "toml");
        assert!(message.contains("line 2"), "{message}");
    }
}
