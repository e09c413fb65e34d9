//! Why a reconcile failed. Each error becomes a condition and an Event on the resource,
//! and the resource is looked at again after a backoff.

/// A failed reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The Broker named by `brokerRef` does not exist (yet).
    #[error("Broker {0:?} not found in this namespace")]
    BrokerNotFound(String),
    /// The broker's admin API could not be reached.
    #[error("the broker's admin API at {url} is unreachable: {reason}")]
    Unreachable {
        /// Where it was looked for.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The broker's admin API answered with an error.
    #[error("the broker refused: {}", .0.message())]
    Refused(#[from] tonic::Status),
    /// The resource asks for something that cannot be (beyond what its schema checks).
    #[error("{0}")]
    InvalidSpec(String),
}

impl Error {
    /// A short PascalCase reason for conditions, Events and the error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::BrokerNotFound(_) => "BrokerNotFound",
            Error::Unreachable { .. } => "BrokerUnreachable",
            Error::Refused(s) if s.code() == tonic::Code::InvalidArgument => "InvalidSpec",
            Error::Refused(s) if s.code() == tonic::Code::Unavailable => "BrokerUnavailable",
            Error::Refused(_) => "BrokerRefused",
            Error::InvalidSpec(_) => "InvalidSpec",
        }
    }
}
