//! Compiles proto/agent.proto into tonic/prost code (client and server).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/agent.proto"], &["proto"])?;
    Ok(())
}
