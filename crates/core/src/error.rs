//! The one error type of the public API.

use crate::DType;

/// Every fallible call in moe-hal returns this. Messages say what was wrong
/// and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// A router spec or layer config value is out of range.
    #[error("invalid spec: {what} = {value}; expected {expected}")]
    InvalidSpec {
        what: &'static str,
        value: String,
        expected: String,
    },
    /// A shape or buffer length does not match what the kernel needs.
    #[error("shape mismatch: {what} is {got}; expected {expected}")]
    Shape {
        what: String,
        got: String,
        expected: String,
    },
    /// A buffer has the wrong element type.
    #[error("dtype mismatch: {what} is {got}; expected {expected}")]
    DType { what: String, got: DType, expected: String },
    /// The backend is present but cannot do this (dtype, size, spec).
    #[error("{backend} does not support {what}: {reason}")]
    Unsupported {
        backend: String,
        what: String,
        reason: String,
    },
    /// The backend cannot run on this machine (no device, no driver, not compiled in).
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable { backend: String, reason: String },
    /// The backend is present but this operation is not written yet.
    #[error("{backend}: {op} is not implemented yet")]
    NotImplemented { backend: String, op: String },
    /// A model config (config.json) cannot be understood.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint or tensor file is missing, unreadable or malformed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The device reported an error (out of memory, device lost, driver error).
    #[error("{backend} device error: {message}")]
    Device { backend: String, message: String },
}

pub type Result<T, E = MoeError> = std::result::Result<T, E>;

impl MoeError {
    pub(crate) fn spec(what: &'static str, value: impl ToString, expected: impl ToString) -> Self {
        MoeError::InvalidSpec {
            what,
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// A shape error; used by every backend's argument checks.
    pub fn shape(what: impl ToString, got: impl ToString, expected: impl ToString) -> Self {
        MoeError::Shape {
            what: what.to_string(),
            got: got.to_string(),
            expected: expected.to_string(),
        }
    }

    pub fn unsupported(backend: &str, what: impl ToString, reason: impl ToString) -> Self {
        MoeError::Unsupported {
            backend: backend.to_string(),
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn unavailable(backend: &str, reason: impl ToString) -> Self {
        MoeError::BackendUnavailable {
            backend: backend.to_string(),
            reason: reason.to_string(),
        }
    }
}
