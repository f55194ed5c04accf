//! Compiles `proto/` with protox (pure Rust: no system protoc needed), writes the descriptor
//! set that gRPC reflection serves, and generates the tonic clients and servers from it.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/esq/v1/eventstore.proto",
    "proto/esq/v1/state.proto",
    "proto/esq/v1/projections.proto",
    "proto/esq/cart/v1/cart.proto",
    "proto/esq/bookshop/v1/bookshop.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("esq_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
