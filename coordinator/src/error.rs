//! The coordinator's errors, and their one mapping to gRPC status codes.

use smelt_jobspec::SpecError;
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum CoordError {
    /// A job spec that does not parse or validate; the message names the field.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the target is in the wrong state for it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The attempt the caller works for was aborted (or superseded).
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

impl CoordError {
    pub fn job_not_found(id: &str) -> Self {
        CoordError::NotFound(format!("job {id} not found"))
    }

    pub fn worker_not_found(id: &str) -> Self {
        CoordError::NotFound(format!("worker {id} not found; register first"))
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        let msg = e.to_string();
        match e {
            CoordError::InvalidSpec(_) | CoordError::InvalidArgument(_) => Status::invalid_argument(msg),
            CoordError::NotFound(_) => Status::not_found(msg),
            CoordError::FailedPrecondition(_) => Status::failed_precondition(msg),
            CoordError::Aborted(_) => Status::aborted(msg),
            CoordError::PermissionDenied(_) => Status::permission_denied(msg),
            CoordError::Unavailable(_) => Status::unavailable(msg),
            CoordError::Internal(_) => Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_and_messages() {
        let spec = SpecError { field: "train.steps".into(), message: "must be at least 1".into() };
        let s: Status = CoordError::from(spec).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("train.steps"), "{}", s.message());
        let s: Status = CoordError::job_not_found("job-000009").into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "job job-000009 not found");
        let s: Status = CoordError::Internal("disk full".into()).into();
        assert_eq!(s.code(), Code::Internal);
    }
}
