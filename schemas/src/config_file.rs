//! What both binaries share about their TOML config files: a parse error as one line that
//! names the line, the key (with its table) and what was wrong (the caller adds the file).

/// `line 5: node.max_staleness_secs: invalid type: string "ten", expected u64`.
pub fn parse_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().lines().next().unwrap_or("").trim().to_owned();
    let Some(span) = e.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    // The table the line belongs to: the last `[header]` at or above it.
    let table = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("[[")
                .and_then(|r| r.strip_suffix("]]"))
                .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
        })
        .last()
        .map(str::trim);
    let key = match line.split_once('=') {
        Some((k, _)) if !line.starts_with('[') => Some(k.trim().trim_matches('"')),
        _ => None,
    };
    let place = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}: "),
        (None, Some(k)) => format!("{k}: "),
        (Some(t), None) => format!("[{t}]: "),
        (None, None) => String::new(),
    };
    format!("line {line_no}: {place}{message}")
}

/// Replace the password of a `scheme://user:password@host` URL by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// Blank librdkafka options that hold secrets (`sasl.password`, `ssl.key.password`, ...).
pub fn redact_options(options: &mut std::collections::BTreeMap<String, String>) {
    for (k, v) in options.iter_mut() {
        if k.contains("password") || k.contains("secret") || k.contains("token") {
            *v = "***".to_owned();
        }
    }
}

/// A config file that cannot be used: both binaries' one error type for their configs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config {path} {error}")]
    Parse { path: String, error: String },
    #[error("config: {0}")]
    Invalid(String),
    /// A producer rule (tables and key templates) that cannot work.
    #[error("config: rule #{index} of {origin} (table {table:?}): {msg}")]
    Rule {
        /// 1-based position in the file the rule is in.
        index: usize,
        /// The config file, or the rules file the rule came from.
        origin: String,
        table: String,
        msg: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Node {
        max_staleness_secs: Option<u64>,
        kind: Option<Kind>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        Redis,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct File {
        node: Node,
    }

    fn err(text: &str) -> String {
        let e = toml::from_str::<File>(text).unwrap_err();
        parse_error(text, &e)
    }

    #[test]
    fn one_line_with_file_line_table_and_key() {
        let e = err("[node]\nmax_staleness_secs = \"ten\"\n");
        assert_eq!(
            e,
            "line 2: node.max_staleness_secs: invalid type: string \"ten\", expected u64"
        );
        let e = err("[node]\nkind = \"redi\"\n");
        assert!(
            e.starts_with("line 2: node.kind: unknown variant `redi`"),
            "{e}"
        );
        let e = err("[node]\nspeed = 1\n");
        assert!(
            e.starts_with("line 2: node.speed: unknown field `speed`"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let e = err("[node\n");
        assert!(e.starts_with("line 1: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("");
        assert!(e.contains("missing field `node`"), "{e}");
    }
}
