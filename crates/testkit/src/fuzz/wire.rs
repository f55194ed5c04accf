//! Hostile bytes on the wire: random bytes on a raw TCP connection, a valid HTTP/2 preface
//! followed by random frames, and valid HTTP/2 + gRPC request headers followed by broken gRPC
//! framing (truncated or oversized length prefixes, the compressed flag without compression,
//! several messages for a unary call, hostile `grpc-timeout` and `grpc-encoding` headers).
//!
//! Every probe is bounded by [`PROBE_BOUND`]: a server that neither answers nor closes the
//! connection by then is reported as hanging.

use super::Rng;
use anyhow::{anyhow, Context as _};
use bytes::{BufMut, Bytes};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// Longest a probe may take before the server is reported as hanging. Generous: the verdict is
/// "never answers", not "slow".
pub const PROBE_BOUND: Duration = Duration::from_secs(60);

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Writes `bytes` and then closes the sending side, and reads until the server closes the
/// connection (a reset counts as closed): the number of bytes the server sent. Err if it is
/// still open after [`PROBE_BOUND`].
pub async fn send_and_drain(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<usize> {
    let run = async {
        let mut tcp = TcpStream::connect(addr).await.context("connect")?;
        // The server may close before reading everything: a failed write is an answer.
        if tcp.write_all(bytes).await.is_ok() {
            let _ = tcp.shutdown().await;
        }
        let mut got = 0;
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return Ok(got),
                Ok(n) => got += n,
            }
        }
    };
    tokio::time::timeout(PROBE_BOUND, run)
        .await
        .map_err(|_| anyhow!("{addr}: connection neither answered nor closed in {PROBE_BOUND:?}"))?
}

/// Random bytes, sometimes behind a plausible start (part of the preface, an HTTP/1 line).
pub fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let mut out = match rng.below(4) {
        0 => PREFACE[..rng.below(PREFACE.len())].to_vec(),
        1 => b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(),
        2 => {
            b"POST /esq.v1.EventStore/Append HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec()
        }
        _ => Vec::new(),
    };
    let n = *rng.pick(&[0, 1, 9, 100, 4096, 70_000]);
    out.extend_from_slice(&rng.bytes(n));
    out
}

/// The preface, usually an empty SETTINGS frame, then random frames: random types (the ten of
/// RFC 9113 and unknown ones), flags, stream ids (0, odd, even, the reserved bit) and lengths
/// (sometimes not matching the payload, sometimes over the maximum frame size).
pub fn random_frames(rng: &mut Rng) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    if !rng.one_in(5) {
        frame(&mut out, 0x4, 0, 0, &[]);
    }
    for _ in 0..1 + rng.below(8) {
        let ty = if rng.one_in(5) {
            rng.below(256) as u8
        } else {
            rng.below(10) as u8
        };
        let flags = rng.below(256) as u8;
        let stream = match rng.below(5) {
            0 => 0,
            1 => 1,
            2 => 1 + 2 * rng.below(100) as u32,
            3 => 2,
            _ => rng.next_u64() as u32,
        };
        let n = *rng.pick(&[0, 1, 4, 5, 8, 9, 64, 1000]);
        let payload = rng.bytes(n);
        if rng.one_in(4) {
            // A length that lies.
            let len = *rng.pick(&[0u32, 1, 16_385, 0xff_ffff]);
            out.put_uint(u64::from(len), 3);
            out.put_u8(ty);
            out.put_u8(flags);
            out.put_u32(stream);
            out.extend_from_slice(&payload);
        } else {
            frame(&mut out, ty, flags, stream, &payload);
        }
    }
    out
}

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.put_uint(payload.len() as u64, 3);
    out.put_u8(ty);
    out.put_u8(flags);
    out.put_u32(stream);
    out.extend_from_slice(payload);
}

/// A broken gRPC request body (length-prefixed messages) around `message`, and the extra
/// request headers that go with it, and what was done (for the report).
pub fn broken_body(
    rng: &mut Rng,
    message: &[u8],
) -> (Bytes, Vec<(&'static str, String)>, &'static str) {
    let mut out = Vec::new();
    let mut headers = Vec::new();
    let what = match rng.below(9) {
        0 => {
            out.put_u8(1);
            out.put_u32(message.len() as u32);
            out.extend_from_slice(message);
            "compressed flag without grpc-encoding"
        }
        1 => {
            out.put_u8(0);
            out.put_u32(message.len() as u32 + 1 + rng.below(1000) as u32);
            out.extend_from_slice(message);
            "length prefix past the end"
        }
        2 => {
            out.put_u8(0);
            out.put_u32(*rng.pick(&[u32::MAX, (5 << 20) + 1, 64 << 20]));
            out.extend_from_slice(&message[..message.len().min(100)]);
            "oversized length prefix"
        }
        3 => {
            let prefix = [0u8, 0, 0, 0, 1];
            out.extend_from_slice(&prefix[..rng.below(5)]);
            "truncated length prefix"
        }
        4 => {
            for _ in 0..2 + rng.below(3) {
                out.put_u8(0);
                out.put_u32(message.len() as u32);
                out.extend_from_slice(message);
            }
            "several messages"
        }
        5 => {
            out.put_u8(*rng.pick(&[2u8, 0x80, 0xff]));
            out.put_u32(message.len() as u32);
            out.extend_from_slice(message);
            "unknown flag byte"
        }
        6 => {
            out.put_u8(1);
            out.put_u32(message.len() as u32);
            out.extend_from_slice(message);
            headers.push((
                "grpc-encoding",
                (*rng.pick(&["gzip", "deflate", "zstd", "identity", "br", "snappy"])).to_owned(),
            ));
            "grpc-encoding with a body that is not compressed that way"
        }
        7 => {
            out.put_u8(0);
            out.put_u32(message.len() as u32);
            out.extend_from_slice(message);
            headers.push((
                "grpc-timeout",
                (*rng.pick(&[
                    "0n",
                    "1n",
                    "99999999H",
                    "-1S",
                    "1",
                    "abc",
                    "100000000S",
                    "5m",
                ]))
                .to_owned(),
            ));
            "hostile grpc-timeout"
        }
        _ => {
            let n = rng.below(40);
            out.extend_from_slice(&rng.bytes(n));
            "random body"
        }
    };
    (Bytes::from(out), headers, what)
}

/// What the server answered to a gRPC request over HTTP/2.
#[derive(Debug, PartialEq, Eq)]
pub enum GrpcEnding {
    /// A gRPC status and its message (from the headers of a trailers-only answer, or the
    /// trailers).
    Status(Code, String),
    /// An HTTP status other than 200 without a gRPC status.
    Http(u16),
    /// The stream or the connection was reset or closed without a status.
    Reset,
    /// An OK response whose stream was still open and silent after
    /// [`STREAM_IDLE`](super::STREAM_IDLE) (a live subscription): the call was answered.
    Live,
}

/// Sends one gRPC request to `path` over a fresh HTTP/2 connection with `body` as its raw body
/// and `extra` headers, and reads the answer (at most 1 MiB of response body is read).
pub async fn grpc_request(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> anyhow::Result<GrpcEnding> {
    let run = async {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        let (client, connection) = h2::client::handshake(tcp).await.context("handshake")?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let ending = exchange(client, addr, path, body, extra).await;
        driver.abort();
        ending
    };
    tokio::time::timeout(PROBE_BOUND, run)
        .await
        .map_err(|_| anyhow!("{addr}{path}: no answer in {PROBE_BOUND:?}"))?
}

async fn exchange(
    client: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> anyhow::Result<GrpcEnding> {
    let Ok(mut client) = client.ready().await else {
        return Ok(GrpcEnding::Reset);
    };
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        req = req.header(*name, value.as_str());
    }
    let req = req.body(()).context("request")?;
    let Ok((response, mut send)) = client.send_request(req, false) else {
        return Ok(GrpcEnding::Reset);
    };
    // Flow control may hold back a large body: send what the server grants, chunk by chunk.
    let mut rest = body;
    while !rest.is_empty() {
        send.reserve_capacity(rest.len());
        let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => n,
            // The server answered or reset before taking it all.
            _ => break,
        };
        let chunk = rest.split_to(granted.min(rest.len()));
        if send.send_data(chunk, false).is_err() {
            break;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
    let Ok(response) = response.await else {
        return Ok(GrpcEnding::Reset);
    };
    if let Some(status) = grpc_status(response.headers()) {
        return Ok(status);
    }
    let http = response.status().as_u16();
    let mut body = response.into_body();
    let mut read = 0;
    loop {
        // A live stream (a subscription) answers and then stays silent: that is an answer too.
        let Ok(next) = tokio::time::timeout(super::STREAM_IDLE, body.data()).await else {
            return Ok(GrpcEnding::Live);
        };
        let Some(chunk) = next else { break };
        let Ok(chunk) = chunk else {
            return Ok(GrpcEnding::Reset);
        };
        read += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
        if read > 1 << 20 {
            return Ok(GrpcEnding::Reset);
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => Ok(grpc_status(&trailers).unwrap_or(GrpcEnding::Http(http))),
        Ok(None) if http != 200 => Ok(GrpcEnding::Http(http)),
        _ => Ok(GrpcEnding::Reset),
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<GrpcEnding> {
    let status = tonic::Status::from_header_map(headers)?;
    Some(GrpcEnding::Status(
        status.code(),
        status.message().to_owned(),
    ))
}
