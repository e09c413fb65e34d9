//! Installs the process-wide tracing subscriber: text or JSON lines on stdout.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{DEFAULT_LOG_LEVEL, LogFormat};

/// Installs the global subscriber with `level` as filter directives, or `RUST_LOG` when
/// `level` is `None`, or [`DEFAULT_LOG_LEVEL`] when neither is set.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), LoggingError> {
    let directives = match level {
        Some(level) => level.to_owned(),
        None => std::env::var(EnvFilter::DEFAULT_ENV)
            .ok()
            .filter(|value| !value.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned()),
    };
    let filter = EnvFilter::try_new(&directives)
        .map_err(|source| LoggingError::Filter { directives, source })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|source| LoggingError::Install { source })
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// The log level setting (or `RUST_LOG`) is not a valid filter.
    #[error("invalid log level `{directives}`")]
    Filter {
        /// The directives as given.
        directives: String,
        /// The parser's error.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("cannot install the log subscriber")]
    Install {
        /// The subscriber's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
