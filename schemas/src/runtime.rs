//! What both binaries set up the same way at start: the log (format, filter, colours), the
//! `--version` text, and the clock their events and metrics read.

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An error and its causes, outermost first, as one line (`a: b: c`): what a log line or an
/// exit message shows of an error whose causes are [`std::error::Error::source`]s.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `--log-format`: lines for people, or one JSON object per line for collectors.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Log to stderr in `format`, filtered by `RTINVAL_LOG` (tracing's directive syntax, default
/// `info`); colours only for a person at a terminal: files, journald and collectors get plain
/// text.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTINVAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `--version`: the package version and the event schema version the binary speaks (built
/// once, when the command line is parsed; clap keeps it for the process's life).
pub fn long_version(package_version: &str) -> &'static str {
    Box::leak(
        format!(
            "{package_version} (event schema_version {})",
            crate::SCHEMA_VERSION
        )
        .into_boxed_str(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_schema_version() {
        assert_eq!(
            super::long_version("1.2.3"),
            format!("1.2.3 (event schema_version {})", crate::SCHEMA_VERSION)
        );
    }
}
