//! Errors a client sees, and how they become Envoy `ImmediateResponse`s.
//!
//! Every error the picker can produce is an HTTP status with a short plain-text body that
//! says what was wrong (`inference error: <Code> - <why>`, upstream's format, so log
//! searches keep working). Nothing here aborts the gRPC stream: an aborted stream would hand
//! the decision to Envoy's failure mode, which may let an unrouted request through.
//!
//! Status choices where upstream's docs and code disagree (recorded in the crate docs):
//! - shed requests (saturation, SLO admission) ⇒ **429** (code), not 503 (docs);
//! - no candidate endpoint (empty pool, subset hint matching nothing, every endpoint
//!   filtered out) ⇒ **503** (protocol spec), where upstream's code answers 500 for an empty
//!   pool on bodiless requests and 429 when filters remove everything;
//! - request body larger than `--max-request-body-bytes` ⇒ **413** (upstream has no bound).

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HeaderMutation, ImmediateResponse, ProcessingResponse, processing_response::Response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;

/// The error classes the picker answers with, named as upstream names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request cannot be routed as written.
    BadRequest,
    /// 413: the request body exceeds the picker's limit.
    PayloadTooLarge,
    /// 429: shed (saturation or a plugin refused it).
    ResourceExhausted,
    /// 500: a bug or a plugin failure.
    Internal,
    /// 503: nothing to route to.
    ServiceUnavailable,
}

impl ErrorCode {
    /// The HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ResourceExhausted => 429,
            ErrorCode::Internal => 500,
            ErrorCode::ServiceUnavailable => 503,
        }
    }

    /// The name used in the body and in the `error_code` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::ResourceExhausted => "ResourceExhausted",
            ErrorCode::Internal => "Internal",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
        }
    }

    /// The code for an HTTP status the scheduler chose.
    pub fn from_http_status(status: u16) -> ErrorCode {
        match status {
            400 => ErrorCode::BadRequest,
            413 => ErrorCode::PayloadTooLarge,
            429 => ErrorCode::ResourceExhausted,
            503 => ErrorCode::ServiceUnavailable,
            _ => ErrorCode::Internal,
        }
    }
}

/// An error answered to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    /// The class.
    pub code: ErrorCode,
    /// Why, in a sentence a user can act on.
    pub message: String,
    /// Extra response headers (for example why flow control dropped the request).
    pub headers: Vec<(&'static str, String)>,
}

impl RequestError {
    /// An error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header to the error answer.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The body the client receives.
    pub fn body(&self) -> String {
        format!(
            "inference error: {} - {}\n",
            self.code.as_str(),
            self.message
        )
    }

    /// The ext_proc message that answers the client directly with this error.
    pub fn to_response(&self) -> ProcessingResponse {
        ProcessingResponse {
            response: Some(Response::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(self.code.http_status()),
                }),
                headers: Some(HeaderMutation {
                    set_headers: std::iter::once(set_header(
                        "content-type",
                        "text/plain; charset=utf-8",
                    ))
                    .chain(self.headers.iter().map(|(k, v)| set_header(k, v)))
                    .collect(),
                    remove_headers: Vec::new(),
                }),
                body: self.body().into_bytes(),
                grpc_status: None,
                details: format!("sluice_{}", self.code.as_str()),
            })),
            ..Default::default()
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.as_str(),
            self.code.http_status(),
            self.message
        )
    }
}

/// A header mutation entry that overwrites `name` (the value goes in `raw_value`, as
/// upstream sends it).
pub fn set_header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        // OVERWRITE_IF_EXISTS_OR_ADD: a client-supplied copy is replaced, never appended to.
        append_action: 2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_response_carries_status_and_reason() {
        let e = RequestError::new(ErrorCode::BadRequest, "model not found in request body");
        let r = e.to_response();
        let Some(Response::ImmediateResponse(ir)) = r.response else {
            panic!("not immediate")
        };
        assert_eq!(ir.status.map(|s| s.code), Some(400));
        assert_eq!(
            String::from_utf8(ir.body).unwrap(),
            "inference error: BadRequest - model not found in request body\n"
        );
        assert_eq!(
            ErrorCode::from_http_status(429),
            ErrorCode::ResourceExhausted
        );
        assert_eq!(ErrorCode::from_http_status(503).http_status(), 503);
        assert_eq!(ErrorCode::from_http_status(502), ErrorCode::Internal);
    }
}
