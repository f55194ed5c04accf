//! Structured fuzzing of esq's gRPC API, driven by the descriptor set so a new RPC is covered
//! without editing any test.
//!
//! - [`Schema`] reads every service, method and message of `esq::FILE_DESCRIPTOR_SET`.
//! - [`Generator`] writes protobuf request bodies from a message descriptor by hand (not through
//!   the generated types, so it can put anything on the wire): valid-shaped messages with hostile
//!   values (huge, invalid UTF-8 or unicode-hostile strings, deep JSON, extreme numbers, unknown
//!   enum values, repeated fields with many entries), sometimes broken on the wire (unknown
//!   fields, wrong wire types, truncation, overlong varints, lengths past the end).
//! - [`call`] sends a body to any method as a raw gRPC call and reads a bounded answer.
//! - [`FeedProbe`] counts the events committed since it last looked, through `Subscribe`, so a
//!   test can check that a refused call wrote nothing.
//! - [`wire`] puts raw bytes, HTTP/2 frames and broken gRPC framing on a TCP connection.
//!
//! Everything random comes from one seeded [`Rng`], so a failing case replays from its seed.

use anyhow::{anyhow, Context as _};
use bytes::{Buf, BufMut};
use esq::pb::v1 as pb;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use std::collections::HashMap;
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub mod wire;

/// The statuses a refused or failed call may answer (the documented set of the security policy):
/// never UNKNOWN, INTERNAL or DATA_LOSS for anything a client sends.
pub const DOCUMENTED: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::ResourceExhausted,
    Code::DeadlineExceeded,
    Code::Cancelled,
    Code::Unavailable,
    Code::Unimplemented,
    Code::Unauthenticated,
    Code::PermissionDenied,
];

/// The largest request body the servers decode (`esq_runtime`'s decoding limit).
pub const MAX_BODY: usize = 5 << 20;

/// A small, fast, seeded random number generator (SplitMix64): the same seed gives the same
/// cases on every machine, which is all fuzzing needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// One RPC of the API.
#[derive(Debug, Clone)]
pub struct Method {
    /// The service's full name, e.g. `esq.v1.EventStore`.
    pub service: String,
    /// The method's name, e.g. `Append`.
    pub name: String,
    /// The request message's full name, with a leading dot.
    pub input: String,
    /// The client sends a stream of messages.
    pub client_streaming: bool,
    /// The server answers with a stream of messages.
    pub server_streaming: bool,
}

impl Method {
    /// The HTTP/2 path of the method, `/<service>/<method>`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.name)
    }
}

/// The services, methods and messages of a descriptor set.
#[derive(Debug, Clone)]
pub struct Schema {
    messages: HashMap<String, DescriptorProto>,
    enums: HashMap<String, Vec<i32>>,
    /// Every method of every service whose package starts with `esq.`.
    pub methods: Vec<Method>,
}

impl Schema {
    /// The schema of esq's own API (`esq::FILE_DESCRIPTOR_SET`).
    pub fn esq() -> anyhow::Result<Self> {
        Self::from_descriptor_set(esq::FILE_DESCRIPTOR_SET)
    }

    /// Reads an encoded `FileDescriptorSet`.
    pub fn from_descriptor_set(bytes: &[u8]) -> anyhow::Result<Self> {
        let set = FileDescriptorSet::decode(bytes).context("decoding the descriptor set")?;
        let mut schema = Self {
            messages: HashMap::new(),
            enums: HashMap::new(),
            methods: Vec::new(),
        };
        for file in &set.file {
            let package = file.package();
            let prefix = if package.is_empty() {
                String::new()
            } else {
                format!(".{package}")
            };
            for m in &file.message_type {
                schema.add_message(&prefix, m);
            }
            for e in &file.enum_type {
                schema.enums.insert(
                    format!("{prefix}.{}", e.name()),
                    e.value.iter().map(|v| v.number()).collect(),
                );
            }
            if !package.starts_with("esq.") {
                continue;
            }
            for s in &file.service {
                for m in &s.method {
                    schema.methods.push(Method {
                        service: format!("{package}.{}", s.name()),
                        name: m.name().to_owned(),
                        input: m.input_type().to_owned(),
                        client_streaming: m.client_streaming(),
                        server_streaming: m.server_streaming(),
                    });
                }
            }
        }
        for m in &schema.methods {
            if !schema.messages.contains_key(&m.input) {
                return Err(anyhow!("{}: request type {} not found", m.path(), m.input));
            }
        }
        Ok(schema)
    }

    fn add_message(&mut self, scope: &str, m: &DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        for nested in &m.nested_type {
            self.add_message(&name, nested);
        }
        for e in &m.enum_type {
            self.enums.insert(
                format!("{name}.{}", e.name()),
                e.value.iter().map(|v| v.number()).collect(),
            );
        }
        self.messages.insert(name, m.clone());
    }

    /// The descriptor of the message named `full_name` (with a leading dot).
    pub fn message(&self, full_name: &str) -> Option<&DescriptorProto> {
        self.messages.get(full_name)
    }
}

/// Words a valid request is likely to hold, so that generated messages get past the first
/// check often enough to reach deeper code.
const WORDS: &[&str] = &[
    "cart",
    "book",
    "fuzz",
    "esq-timeline",
    "cart2",
    "state",
    "authors",
    "sku_sales",
    "ItemAdded",
    "ItemRemoved",
    "CheckedOut",
    "BookCreated",
    "BookUpdated",
    "BookDeleted",
    "application/json",
    "application/octet-stream",
    "sku-1",
    "a",
    "0",
    "{}",
    "{\"sku\":\"s\",\"quantity\":1,\"unit_price_cents\":100}",
    "{\"title\":\"t\",\"author\":\"a\",\"price_cents\":1}",
    "[]",
    "null",
    "eyJ2IjoxLCJzIjpbe31dfQ",
];

/// Text that breaks naive handling of unicode: direction overrides, NUL, combining marks,
/// invisible and non-character code points.
const HOSTILE_TEXT: &[&str] = &[
    "\u{202E}gnp.exe",
    "a\u{0}b",
    "\u{0}",
    "\u{FEFF}cart",
    "\u{200B}",
    "\u{FFFF}\u{FFFE}",
    "\u{10FFFF}",
    "𝕏𝕐",
    "Ω≈ç√",
    "../../etc/passwd",
    "%s%n%x",
    "'; DROP TABLE events; --",
    "{\"a\":",
    "\r\n\r\n",
    "cart\u{0}",
    "ｃａｒｔ",
];

/// Byte sequences that are not UTF-8: stray continuation bytes, a lone lead byte, an encoded
/// surrogate, a code point past U+10FFFF, an overlong encoding.
const INVALID_UTF8: &[&[u8]] = &[
    &[0xff, 0xfe],
    &[0xc3],
    &[0xed, 0xa0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xc0, 0xaf],
    &[b'c', b'a', b'r', b't', 0x80],
];

/// Writes request bodies; see the module documentation.
pub struct Generator<'s> {
    schema: &'s Schema,
    /// One huge value may still be written in this message (bounds each body's size).
    huge_left: bool,
    /// Whether bodies are sometimes broken on the wire ([`mutate`]).
    mutations: bool,
    /// This request is broken on the wire (when `mutations`).
    broken: bool,
    /// One value in this many is hostile, the others plausible for their field (chosen per
    /// request, so some requests are nearly valid and reach deep into the services).
    hostility: usize,
}

/// Deepest nesting of messages the generator writes (the API's requests are shallow; deep
/// nesting is sent as JSON text and through wire-level mutations).
const MAX_DEPTH: usize = 6;

impl<'s> Generator<'s> {
    /// A generator over `schema`.
    pub fn new(schema: &'s Schema) -> Self {
        Self {
            schema,
            huge_left: false,
            mutations: true,
            broken: false,
            hostility: 2,
        }
    }

    /// A generator that writes only well-formed bodies (hostile values, valid wire format).
    pub fn well_formed(schema: &'s Schema) -> Self {
        Self {
            mutations: false,
            ..Self::new(schema)
        }
    }

    /// A request body for `method`. `allow_huge` lets one value of up to a little over
    /// [`MAX_BODY`] into it.
    pub fn request(&mut self, rng: &mut Rng, method: &Method, allow_huge: bool) -> Vec<u8> {
        self.huge_left = allow_huge;
        self.hostility = *rng.pick(&[1, 3, 8, 30, 1000]);
        // One request in three is broken on the wire, at the top or in nested messages.
        self.broken = self.mutations && rng.one_in(3);
        let mut body = self.message(rng, &method.input, 0);
        if self.broken && rng.one_in(2) {
            mutate(rng, &mut body);
        }
        body
    }

    fn message(&mut self, rng: &mut Rng, type_name: &str, depth: usize) -> Vec<u8> {
        let Some(desc) = self.schema.message(type_name) else {
            // A type outside the set: any bytes.
            let n = rng.below(16);
            return rng.bytes(n);
        };
        let desc = desc.clone();
        let mut out = Vec::new();
        // Oneof members: usually one, sometimes none or several (the last one wins).
        let mut oneof_set: HashMap<i32, usize> = HashMap::new();
        for field in &desc.field {
            let in_oneof = field.oneof_index.filter(|_| !field.proto3_optional());
            let set = match in_oneof {
                Some(o) => {
                    let count = oneof_set.entry(o).or_default();
                    // Later members get a chance too when an earlier one was skipped.
                    let want = if *count == 0 { 2 } else { 8 };
                    let set = rng.one_in(want);
                    *count += usize::from(set);
                    set
                }
                None => !rng.one_in(16.min(1 + self.hostility)),
            };
            if !set {
                continue;
            }
            self.field(rng, desc.name(), field, depth, &mut out);
        }
        if self.broken && rng.one_in(6) {
            mutate(rng, &mut out);
        }
        out
    }

    fn field(
        &mut self,
        rng: &mut Rng,
        message: &str,
        field: &FieldDescriptorProto,
        depth: usize,
        out: &mut Vec<u8>,
    ) {
        let number = field.number() as u32;
        let repeated = field.label() == Label::Repeated;
        let count = if !repeated {
            1
        } else {
            match rng.below(10) {
                0 => 0,
                1..=4 => 1,
                5 | 6 => 2 + rng.below(3),
                7 => 5 + rng.below(20),
                // Many entries, over the API's counts (500 events, 100 edits) at the top.
                8 if depth <= 1 => *rng.pick(&[101, 501, 1500]),
                _ => 1 + rng.below(3),
            }
        };
        let ty = field.r#type();
        let packable = !matches!(ty, Type::String | Type::Bytes | Type::Message | Type::Group);
        if repeated && packable && count > 0 && rng.one_in(2) {
            // Packed encoding (what proto3 writes); the unpacked form below is accepted too.
            let mut packed = Vec::new();
            for _ in 0..count {
                self.scalar(rng, field, &mut packed);
            }
            put_tag(out, number, 2);
            put_varint(out, packed.len() as u64);
            out.extend_from_slice(&packed);
            return;
        }
        let many = count > 50;
        for _ in 0..count {
            match ty {
                Type::Message | Type::Group => {
                    let body = if depth + 1 >= MAX_DEPTH || (many && rng.one_in(2)) {
                        Vec::new()
                    } else {
                        self.message(rng, field.type_name(), depth + 1)
                    };
                    put_tag(out, number, 2);
                    put_varint(out, body.len() as u64);
                    out.extend_from_slice(&body);
                }
                Type::String | Type::Bytes => {
                    let value = if many {
                        word(rng).into_bytes()
                    } else {
                        self.text(rng, message, field)
                    };
                    put_tag(out, number, 2);
                    put_varint(out, value.len() as u64);
                    out.extend_from_slice(&value);
                }
                _ => {
                    let wire = wire_type(ty);
                    put_tag(out, number, wire);
                    self.scalar(rng, field, out);
                }
            }
        }
    }

    /// A string or bytes value: plausible for its field, or hostile.
    fn text(&mut self, rng: &mut Rng, message: &str, field: &FieldDescriptorProto) -> Vec<u8> {
        let bytes = field.r#type() == Type::Bytes;
        if !rng.one_in(self.hostility) {
            return plausible_text(rng, message, field.name()).into_bytes();
        }
        if self.huge_left && rng.one_in(3) {
            self.huge_left = false;
            let n = *rng.pick(&[600 << 10, (3 << 20) + 1, MAX_BODY - 4096, MAX_BODY + 1024]);
            return match rng.below(3) {
                0 => vec![b'x'; n],
                1 => "\u{202E}é".repeat(n / 4).into_bytes(),
                _ => deep_json(n / 2),
            };
        }
        match rng.below(14) {
            0..=4 => word(rng).into_bytes(),
            5 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&rng.bytes(16));
                uuid::Builder::from_random_bytes(b)
                    .into_uuid()
                    .to_string()
                    .into_bytes()
            }
            6 => rng.pick(HOSTILE_TEXT).as_bytes().to_vec(),
            7 => {
                let mut v = word(rng).into_bytes();
                v.extend_from_slice(INVALID_UTF8[rng.below(INVALID_UTF8.len())]);
                v
            }
            8 => "a\u{301}".repeat(1 + rng.below(300)).into_bytes(),
            // Just over the id limit (128 characters), in ASCII and in multi-byte text.
            9 => ["x".repeat(129), "é".repeat(129), "a".repeat(65)][rng.below(3)]
                .clone()
                .into_bytes(),
            10 => deep_json(*rng.pick(&[65, 200, 10_000])),
            11 if bytes => {
                let n = rng.below(64);
                rng.bytes(n)
            }
            11 => String::new().into_bytes(),
            12 => format!("{{\"k\":{}}}", extreme_number(rng)).into_bytes(),
            _ => vec![b'z'; 1 + rng.below(4096)],
        }
    }

    /// One scalar value of `field` without its tag.
    fn scalar(&mut self, rng: &mut Rng, field: &FieldDescriptorProto, out: &mut Vec<u8>) {
        let ty = field.r#type();
        if !rng.one_in(self.hostility)
            && matches!(ty, Type::Int32 | Type::Int64 | Type::Uint32 | Type::Uint64)
        {
            put_varint(out, plausible_number(rng, field.name()));
            return;
        }
        match ty {
            Type::Double => out.put_f64_le(*rng.pick(&[
                0.0,
                -0.0,
                1.5,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::MAX,
                f64::MIN_POSITIVE,
            ])),
            Type::Float => out.put_f32_le(*rng.pick(&[0.0, f32::NAN, f32::INFINITY, f32::MAX])),
            Type::Fixed64 | Type::Sfixed64 => out.put_u64_le(extreme(rng)),
            Type::Fixed32 | Type::Sfixed32 => out.put_u32_le(extreme(rng) as u32),
            Type::Sint32 | Type::Sint64 => {
                let v = extreme(rng) as i64;
                put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
            }
            Type::Bool => put_varint(out, *rng.pick(&[0, 1, 1, 2, u64::MAX])),
            Type::Enum => {
                let known = self
                    .schema
                    .enums
                    .get(field.type_name())
                    .cloned()
                    .unwrap_or_default();
                let v = if !known.is_empty() && !rng.one_in(4) {
                    i64::from(*rng.pick(&known))
                } else {
                    *rng.pick(&[-1, 99, i64::from(i32::MAX), i64::from(i32::MIN)])
                };
                put_varint(out, v as u64);
            }
            // int32, int64, uint32, uint64; out-of-range varints for the 32-bit ones included.
            _ => put_varint(out, extreme(rng)),
        }
    }
}

/// A value a valid request could carry in the text field `name` of the message `message`.
fn plausible_text(rng: &mut Rng, message: &str, name: &str) -> String {
    let uuid = |rng: &mut Rng| {
        let mut b = [0u8; 16];
        b.copy_from_slice(&rng.bytes(16));
        uuid::Builder::from_random_bytes(b).into_uuid().to_string()
    };
    let pick = |rng: &mut Rng, items: &[&str]| (*rng.pick(items)).to_owned();
    match name {
        "isbn" | "last" => pick(
            rng,
            &["978-0-441-47812-5", "0-8044-2957-x", "9780441478125"],
        ),
        "event_id" | "command_id" => uuid(rng),
        "json" => pick(
            rng,
            &[
                "{\"sku\":\"s\",\"quantity\":1,\"unit_price_cents\":100}",
                "{\"title\":\"t\",\"author\":\"a\",\"price_cents\":1}",
                "{\"a\":1}",
                "{}",
            ],
        ),
        "content_type" => pick(rng, &["application/json", "application/octet-stream"]),
        "type" if message == "StreamRef" => pick(rng, &["cart", "book", "fuzz"]),
        "stream_types" => pick(rng, &["cart", "book", "fuzz"]),
        "type" => pick(rng, &["ItemAdded", "BookCreated", "Note"]),
        "event_type" | "event_types" => pick(rng, &["ItemAdded", "BookCreated", "Note"]),
        "stream_type" => pick(rng, &["cart", "book"]),
        "projection" | "name" => pick(rng, &["cart2", "book", "state", "authors", "sku_sales"]),
        n if n.ends_with("token") || n == "after" => String::new(),
        // Ids, skus, authors, titles: a few shared values, so calls meet each other's data.
        _ => format!("fuzz-{}", rng.below(8)),
    }
}

/// A value a valid request could carry in an integer field of this name.
fn plausible_number(rng: &mut Rng, name: &str) -> u64 {
    if name.contains("version") {
        rng.below(4) as u64
    } else if name.contains("seconds") {
        1_750_000_000 + rng.below(100_000_000) as u64
    } else if name.contains("nanos") {
        0
    } else {
        1 + rng.below(100) as u64
    }
}

/// A plausible word, sometimes with a suffix so ids differ between cases.
fn word(rng: &mut Rng) -> String {
    let w = *rng.pick(WORDS);
    if rng.one_in(2) {
        format!("{w}-{}", rng.below(1000))
    } else {
        w.to_owned()
    }
}

/// JSON nested `depth` levels deep (`[[[…]]]`).
fn deep_json(depth: usize) -> Vec<u8> {
    let mut v = vec![b'['; depth];
    v.extend(std::iter::repeat_n(b']', depth));
    v
}

/// Numbers in JSON text that no 64-bit integer or double holds exactly.
const EXTREME_NUMBERS: &[&str] = &[
    "1e999",
    "-1e999",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "1.7976931348623157e309",
    "0.0000000000000000000000000001",
    "-0",
];

fn extreme_number(rng: &mut Rng) -> &'static str {
    EXTREME_NUMBERS[rng.below(EXTREME_NUMBERS.len())]
}

/// An integer that tends to sit at an edge.
fn extreme(rng: &mut Rng) -> u64 {
    match rng.below(12) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => i64::MAX as u64,
        4 => i64::MIN as u64,
        5 => u64::from(u32::MAX),
        6 => (1 << 53) + 1,
        7 => rng.next_u64(),
        8 => 500,
        9 => 501,
        10 => 100_000,
        _ => rng.below(10) as u64,
    }
}

fn wire_type(ty: Type) -> u32 {
    match ty {
        Type::Double | Type::Fixed64 | Type::Sfixed64 => 1,
        Type::Float | Type::Fixed32 | Type::Sfixed32 => 5,
        Type::String | Type::Bytes | Type::Message | Type::Group => 2,
        _ => 0,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, number: u32, wire: u32) {
    put_varint(out, (u64::from(number) << 3) | u64::from(wire));
}

/// Breaks `body` on the wire in one of several ways (some legal: unknown fields must be
/// skipped; most not).
pub fn mutate(rng: &mut Rng, body: &mut Vec<u8>) {
    match rng.below(9) {
        // An unknown field of each legal wire type (must be ignored).
        0 => {
            let number = 1000 + rng.below(1 << 20) as u32;
            match rng.below(4) {
                0 => {
                    put_tag(body, number, 0);
                    put_varint(body, rng.next_u64());
                }
                1 => {
                    put_tag(body, number, 1);
                    body.put_u64_le(rng.next_u64());
                }
                2 => {
                    put_tag(body, number, 2);
                    let n = rng.below(32);
                    let v = rng.bytes(n);
                    put_varint(body, v.len() as u64);
                    body.extend_from_slice(&v);
                }
                _ => {
                    put_tag(body, number, 5);
                    body.put_u32_le(rng.next_u64() as u32);
                }
            }
        }
        // A known field number with the wrong wire type.
        1 => {
            let number = 1 + rng.below(8) as u32;
            put_tag(body, number, *rng.pick(&[0, 1, 5]));
            body.extend_from_slice(&rng.bytes(8));
        }
        // Cut short.
        2 if !body.is_empty() => {
            let at = rng.below(body.len());
            body.truncate(at);
        }
        // An overlong varint.
        3 => {
            put_tag(body, 1 + rng.below(8) as u32, 0);
            body.extend_from_slice(&[0xff; 10]);
            body.push(0x01);
        }
        // A length past the end.
        4 => {
            put_tag(body, 1 + rng.below(8) as u32, 2);
            put_varint(body, 1 << 30);
            body.extend_from_slice(b"short");
        }
        // Group wire types (start without end, end without start) and the unused 6 and 7.
        5 => put_tag(body, 1 + rng.below(8) as u32, *rng.pick(&[3, 4, 6, 7])),
        // Field number 0 and the largest field number.
        6 => {
            put_varint(body, 0);
            put_tag(body, (1 << 29) - 1, 0);
            put_varint(body, 1);
        }
        // Random bytes appended.
        7 => {
            let n = rng.below(64);
            body.extend_from_slice(&rng.bytes(n));
        }
        // A known length-delimited field nested very deep (each level a field 1 holding the
        // next): past every decoder's recursion limit.
        _ => {
            let mut inner = Vec::new();
            for _ in 0..200 {
                let mut outer = Vec::new();
                put_tag(&mut outer, 1, 2);
                put_varint(&mut outer, inner.len() as u64);
                outer.extend_from_slice(&inner);
                inner = outer;
            }
            body.extend_from_slice(&inner);
        }
    }
}

/// A codec that sends and receives raw message bytes, to put any body on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// What a call answered.
#[derive(Debug)]
pub enum Answer {
    /// OK, with this many response messages read (a stream is read up to [`STREAM_READ`]).
    Ok(usize),
    /// A status, before or after some messages.
    Refused(Status),
}

/// Most response messages read from a server stream.
pub const STREAM_READ: usize = 16;
/// A server stream silent for this long is taken as live and idle and the call is cancelled:
/// this bounds how much of a stream is read, it is not a verdict on the server.
pub const STREAM_IDLE: Duration = Duration::from_millis(300);

/// Sends `body` to `method` over `channel` and reads the answer: a unary response, or at most
/// [`STREAM_READ`] messages of a stream (stopping at a silence of [`STREAM_IDLE`]). `token`, if
/// given, goes in `authorization: Bearer …`.
pub async fn call(channel: Channel, method: &Method, body: Vec<u8>, token: Option<&str>) -> Answer {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    if let Err(e) = grpc.ready().await {
        return Answer::Refused(Status::unavailable(format!("not ready: {e}")));
    }
    let path = match PathAndQuery::try_from(method.path()) {
        Ok(p) => p,
        Err(e) => return Answer::Refused(Status::unknown(format!("bad path: {e}"))),
    };
    let with_token = |msg| bearer(tonic::Request::new(msg), token);
    let streaming = if method.client_streaming {
        let req = bearer(tonic::Request::new(futures::stream::iter([body])), token);
        grpc.streaming(req, path, RawCodec).await
    } else if method.server_streaming {
        grpc.server_streaming(with_token(body), path, RawCodec)
            .await
    } else {
        return match grpc.unary(with_token(body), path, RawCodec).await {
            Ok(_) => Answer::Ok(1),
            Err(s) => Answer::Refused(s),
        };
    };
    let mut stream = match streaming {
        Ok(r) => r.into_inner(),
        Err(s) => return Answer::Refused(s),
    };
    let mut read = 0;
    while read < STREAM_READ {
        match tokio::time::timeout(STREAM_IDLE, stream.message()).await {
            Ok(Ok(Some(_))) => read += 1,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(s)) => return Answer::Refused(s),
        }
    }
    Answer::Ok(read)
}

/// `req` with `authorization: Bearer <token>` when a token is given.
pub fn bearer<T>(mut req: tonic::Request<T>, token: Option<&str>) -> tonic::Request<T> {
    if let Some(t) = token {
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}

/// Counts the events committed to the store since it last looked, through
/// `EventStore/Subscribe`: a subscription resumed `after` the last position it saw delivers
/// every event committed since, then its `caught_up` marker (whose position is the next
/// starting point). Exact on `esq dev`, where the change log has an entry for every committed
/// append and an append is answered only after its commit.
pub struct FeedProbe {
    client: pb::event_store_client::EventStoreClient<Channel>,
    position: String,
}

impl FeedProbe {
    /// A probe starting now.
    pub async fn start(channel: Channel) -> anyhow::Result<Self> {
        let mut probe = Self {
            client: pb::event_store_client::EventStoreClient::new(channel)
                .max_decoding_message_size(usize::MAX),
            position: String::new(),
        };
        probe
            .read(pb::subscribe_request::Start::FromNow(()))
            .await?;
        Ok(probe)
    }

    /// How many events were committed since the last call (or the start).
    pub async fn events_since(&mut self) -> anyhow::Result<usize> {
        let after = pb::subscribe_request::Start::After(self.position.clone());
        self.read(after).await
    }

    async fn read(&mut self, start: pb::subscribe_request::Start) -> anyhow::Result<usize> {
        let mut stream = self
            .client
            .subscribe(pb::SubscribeRequest {
                start: Some(start),
                ..Default::default()
            })
            .await
            .context("Subscribe")?
            .into_inner();
        let mut events = 0;
        loop {
            let msg = stream
                .message()
                .await
                .context("Subscribe stream")?
                .ok_or_else(|| anyhow!("Subscribe ended before caught_up"))?;
            match msg.message {
                Some(pb::subscribe_response::Message::Event(_)) => events += 1,
                Some(pb::subscribe_response::Message::CaughtUp(_)) => {
                    self.position = msg.position;
                    return Ok(events);
                }
                None => return Err(anyhow!("Subscribe sent an empty message")),
            }
        }
    }
}

/// The seed and case count of a fuzz run: `ESQ_FUZZ_SEED` and `ESQ_FUZZ_CASES` when set (read by
/// tests, not by libraries), else the defaults given.
pub fn run_params(default_seed: u64, default_cases: usize) -> (u64, usize) {
    let seed = std::env::var("ESQ_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default_seed);
    let cases = std::env::var("ESQ_FUZZ_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default_cases);
    (seed, cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_lists_every_esq_rpc() {
        let schema = Schema::esq().expect("schema");
        let paths: Vec<String> = schema.methods.iter().map(Method::path).collect();
        for p in [
            "/esq.v1.EventStore/Append",
            "/esq.v1.EventStore/Subscribe",
            "/esq.v1.Projections/Verify",
            "/esq.cart.v1.CartCommands/AddItem",
            "/esq.bookshop.v1.BookQueries/ListBooks",
            "/esq.v1.StateQueries/GetState",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
        let subscribe = schema
            .methods
            .iter()
            .find(|m| m.name == "Subscribe")
            .expect("Subscribe");
        assert!(subscribe.server_streaming && !subscribe.client_streaming);
    }

    /// Unmutated bodies are the shape of the request type: the generated types decode most of
    /// them (the rest carry invalid UTF-8 in a string, which prost refuses by design).
    #[test]
    fn generated_bodies_have_the_request_shape() {
        let schema = Schema::esq().expect("schema");
        let append = schema
            .methods
            .iter()
            .find(|m| m.path() == "/esq.v1.EventStore/Append")
            .expect("Append");
        let mut rng = Rng::new(7);
        let (mut decoded, mut with_events) = (0, 0);
        for _ in 0..200 {
            let body = Generator::well_formed(&schema).request(&mut rng, append, false);
            // Any failure to decode is a shape error or invalid UTF-8.
            match pb::AppendRequest::decode(body.as_slice()) {
                Ok(req) => {
                    decoded += 1;
                    with_events += usize::from(!req.events.is_empty());
                }
                Err(e) => assert!(e.to_string().contains("UTF-8"), "{e}"),
            }
        }
        assert!(decoded > 100, "only {decoded} of 200 decoded");
        assert!(with_events > 20, "only {with_events} carried events");
    }

    #[test]
    fn the_same_seed_gives_the_same_bodies() {
        let schema = Schema::esq().expect("schema");
        let bodies = |seed| {
            let mut rng = Rng::new(seed);
            let mut g = Generator::new(&schema);
            schema
                .methods
                .iter()
                .map(|m| g.request(&mut rng, m, false))
                .collect::<Vec<_>>()
        };
        assert_eq!(bodies(42), bodies(42));
        assert_ne!(bodies(42), bodies(43));
    }
}
