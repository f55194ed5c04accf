//! One tower layer that keeps every gRPC status our servers send honest and small, whichever
//! service or tonic itself produced it:
//!
//! - a request body that is not valid protobuf, or not valid gRPC framing (a message cut short,
//!   a compression flag other than 0 and 1 or set without `grpc-encoding`, no message at all in
//!   a unary call), is the client's fault: INVALID_ARGUMENT, not the INTERNAL that tonic answers
//!   (found by the fuzz suite, `tests/it/fuzz.rs`);
//! - a request over the server's decoding limit is RESOURCE_EXHAUSTED (as in gRPC's own
//!   status-code guide), not the OUT_OF_RANGE tonic answers;
//! - no `grpc-message` is longer than [`MAX_STATUS_MESSAGE`] bytes, as defence in depth against
//!   an error message that quotes unbounded input.
//!
//! A unary failure travels in the response headers (trailers-only response); a streaming one in
//! the body's trailers, so the layer rewrites both.

use bytes::Bytes;
use http_body::{Body, Frame};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::{Code, Status};

/// Longest `grpc-message` sent, in bytes (before percent-encoding).
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Prefix of the message of tonic's prost codec when a body does not decode.
const DECODE_FAILURE: &str = "failed to decode Protobuf message";
/// Prefixes of tonic's messages for request bodies that are not valid gRPC framing.
const BAD_FRAMING: &[&str] = &[
    "Unexpected EOF decoding stream",
    "protocol error: received message with compressed-flag but no grpc-encoding",
    "protocol error: received message with invalid compression flag",
    "Missing request message",
];
/// Prefix of the message of tonic when a request is over the decoding limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// The status a client should see instead of `status`, if it differs.
pub fn sanitize(status: &Status) -> Option<Status> {
    let message = status.message();
    let code = match status.code() {
        Code::Internal if message.starts_with(DECODE_FAILURE) => Code::InvalidArgument,
        Code::Internal if BAD_FRAMING.iter().any(|p| message.starts_with(p)) => {
            Code::InvalidArgument
        }
        Code::OutOfRange if message.starts_with(TOO_LARGE) => Code::ResourceExhausted,
        code => code,
    };
    let short = truncate(message, MAX_STATUS_MESSAGE);
    if code == status.code() && short.len() == message.len() {
        return None;
    }
    Some(Status::with_details(
        code,
        short,
        Bytes::copy_from_slice(status.details()),
    ))
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let ellipsis = '…';
    let mut end = max - ellipsis.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &s[..end])
}

/// Rewrites the gRPC status in `headers` (response headers or trailers), if there is one.
fn fix(headers: &mut HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let Some(fixed) = sanitize(&status) else {
        return;
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if let Err(e) = fixed.add_header(headers) {
        tracing::warn!(error = %e, "cannot rewrite a gRPC status");
    }
}

/// The layer; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusHygieneLayer;

impl<S> tower::Layer<S> for StatusHygieneLayer {
    type Service = StatusHygiene<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StatusHygiene { inner }
    }
}

/// The service made by [`StatusHygieneLayer`].
#[derive(Debug, Clone)]
pub struct StatusHygiene<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for StatusHygiene<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<HygieneBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            fix(response.headers_mut());
            Ok(response.map(|inner| HygieneBody { inner }))
        })
    }
}

/// A response body whose trailers are rewritten like the headers.
#[derive(Debug)]
pub struct HygieneBody<B> {
    inner: B,
}

impl<B: Body + Unpin> Body for HygieneBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|f| {
            f.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    fix(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_statuses_are_mapped_and_messages_bounded() {
        let decode = Status::internal("failed to decode Protobuf message: invalid wire type");
        assert_eq!(
            sanitize(&decode).expect("mapped").code(),
            Code::InvalidArgument
        );
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        );
        assert_eq!(
            sanitize(&big).expect("mapped").code(),
            Code::ResourceExhausted
        );
        for framing in [
            "Unexpected EOF decoding stream.",
            "protocol error: received message with compressed-flag but no grpc-encoding was \
             specified",
            "protocol error: received message with invalid compression flag: 2 (valid flags are \
             0 and 1), while sending request",
            "Missing request message.",
        ] {
            let mapped = sanitize(&Status::internal(framing)).expect("mapped");
            assert_eq!(mapped.code(), Code::InvalidArgument, "{framing}");
            assert_eq!(mapped.message(), framing);
        }
        assert!(sanitize(&Status::internal("internal error")).is_none());
        assert!(sanitize(&Status::out_of_range("past the end")).is_none());
        let long = Status::invalid_argument("é".repeat(10_000));
        let fixed = sanitize(&long).expect("truncated");
        assert!(fixed.message().len() <= MAX_STATUS_MESSAGE);
        assert!(fixed.message().ends_with('…'));
        assert_eq!(fixed.code(), Code::InvalidArgument);
    }

    #[test]
    fn trailers_are_rewritten() {
        let mut trailers = HeaderMap::new();
        Status::internal(format!("{DECODE_FAILURE}: x {}", "y".repeat(5000)))
            .add_header(&mut trailers)
            .expect("header");
        fix(&mut trailers);
        let status = Status::from_header_map(&trailers).expect("status");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE);
    }
}
